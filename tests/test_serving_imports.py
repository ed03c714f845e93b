"""Serving the shipped policy reader never imports training, evaluation, the task generator or the CLI.

Checked in a fresh interpreter (nothing imported by other tests), with a fresh ``HYPERLORA_CACHE`` for the
reply-format compiler's statistics: with them cached, the compiler would skip the code that computes them,
which is where serving used to reach into the task generator and ``evaluation.scoring``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

FORBIDDEN = ("hyperlora.training", "hyperlora.evaluation", "hyperlora.tasks.generator", "hyperlora.cli")

# one policy of every kind the shipped reader serves: the reader's own adapter (topic / routing), a compiled
# threshold rule, a compiled reply prefix, a compiled sign-off
POLICIES = ["Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'.",
            "Answer 'review' if the transfer is over $500; otherwise 'approve'.",
            "Start every reply with 'Noted:'.",
            "End every reply with the sign-off '-- Care'."]

_SERVE = r"""
import json, sys
import torch
import hyperlora
from hyperlora.hypernets.checkpoints import load
from hyperlora.modeling.base_model import load_base_model

torch.set_num_threads(2)
policies = json.loads(sys.argv[1])
model, tok = load_base_model()
hypernet, encode = load(model, tok)
rules = hypernet.rules(policies)
rt = hyperlora.attach(model, hypernet, encoder=encode, max_adapters=len(policies), max_rank=hypernet.config.rank)
try:
    ids = tok(["Ticket: my card was charged twice."] * len(policies), return_tensors="pt").input_ids
    with torch.no_grad():
        with rt.policies(policies):
            served = model(input_ids=ids).logits
        with rt.policies([None] * len(policies)):
            base = model(input_ids=ids).logits
finally:
    rt.detach()
print("RESULT " + json.dumps({
    "package": hyperlora.__file__,
    "rules": [r if r is None else r[0] for r in rules],
    "changed": [not torch.equal(served[i], base[i]) for i in range(len(policies))],
    "finite": bool(torch.isfinite(served).all()),
    "modules": sorted(m for m in sys.modules if m.startswith("hyperlora")),
}))
"""


def _link_model_cache(tmp: Path) -> None:
    """A fresh cache dir that still finds the dequantized embedded model (saves 10-20 s of conversion)."""
    from hyperlora.modeling.base_model import DEFAULT_MODEL_ID, cache_dir

    have = cache_dir() / DEFAULT_MODEL_ID
    if have.is_dir():
        (tmp / DEFAULT_MODEL_ID).symlink_to(have, target_is_directory=True)


@pytest.mark.slow
def test_serving_every_rule_kind_imports_no_training_evaluation_generator_or_cli():
    from hyperlora.hypernets.checkpoints import default_dir

    if default_dir() is None:
        pytest.fail("no hypernetwork is shipped in hyperlora/checkpoints/")
    # a private temp dir, not tmp_path: pytest sessions running beside this one may prune old tmp_path roots
    cache = Path(tempfile.mkdtemp(prefix="hyperlora-serving-"))
    try:
        _link_model_cache(cache)
        env = {**os.environ, "HYPERLORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", _SERVE, json.dumps(POLICIES)], env=env, capture_output=True,
                              text=True, timeout=1800)
        stats = sorted(p.name.split("-")[0] for p in (cache / "reply_prefix").glob("*.pt"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    # every rule kind was really served, and each changed its row's forward pass
    assert res["rules"] == [None, "threshold", "prefix", "signoff"], res["rules"]
    assert all(res["changed"]) and res["finite"], res
    # the compiler computed its statistics in this run (nothing was read from an old cache)
    assert stats == ["background", "signoff"], stats
    loaded = [m for m in res["modules"] if m.startswith(FORBIDDEN)]
    assert not loaded, f"serving imported {loaded} (package {res['package']})"
