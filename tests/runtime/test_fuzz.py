"""Property-based: random policies() entries (texts with lone surrogates, names, near-names, unloaded names,
None, non-strings) and batch sizes against one long-lived runtime on a 3-slot pool.

Every call either serves the batch or raises one of the documented errors (TypeError, ValueError, KeyError,
PoolFullError) naming the problem; afterwards no slot is left "writing" or in flight, keys are distinct, and
a count mismatch is always an error (issue 19 row 18). 20 examples in the suite; HYPERLORA_FUZZ_EXAMPLES=N
runs the long fuzz recorded in docs/RELIABILITY.md.
"""
from __future__ import annotations

import os

import pytest
import torch

from runtime_helpers import hash_encoder, padded_batch, tiny_hypernet, tiny_model

import hyperlora
from hyperlora.adapters.pool import PoolFullError

# hypothesis is a test-only dependency (the `test` extra): skipped where it is missing.
import hypothesis  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = "HYPERLORA_FUZZ_EXAMPLES" in os.environ
_RT: dict = {}


def _runtime():
    if not _RT:
        model = tiny_model("llama")
        hn = tiny_hypernet(model, ["q_proj", "v_proj"])
        rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=3, max_rank=8, apply_mode="auto")
        q = "model.layers.0.self_attn.q_proj"
        rt.add_adapter("good", {q: (torch.randn(2, 48), torch.randn(48, 2))})
        rt.add_adapter("gone", {q: (torch.randn(2, 48), torch.randn(48, 2))})
        rt.unload_peft("gone")
        _RT.update(model=model, rt=rt, ids={n: padded_batch([3] * n) for n in range(1, 6)})
    return _RT


_text = st.text(max_size=24)
ENTRY = st.one_of(
    st.none(),
    st.sampled_from(["good", "goood", "gone", "legal", "Refuse to discuss pricing.", "Answer in French.",
                     "Escalate any data breach.", "", "   "]),
    st.builds(lambda a, s, b: a + s + b, _text, st.sampled_from(["", " ", "\ud800", "\udfff", " x "]), _text),
    st.integers(-2, 2),
)


@settings(max_examples=int(os.environ.get("HYPERLORA_FUZZ_EXAMPLES", "20")), deadline=10_000 if _FUZZ else None,
          derandomize=not _FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.lists(ENTRY, max_size=5), rows=st.integers(1, 5))
def test_random_entries_serve_or_raise_a_documented_error_and_leak_nothing(entries, rows):
    env = _runtime()
    rt, model = env["rt"], env["model"]
    ids, mask, _ = env["ids"][rows]
    resolved = False
    try:
        with rt.policies(entries) as batch:
            resolved = True
            assert batch.num_rows == len(entries)
            for i, e in enumerate(entries):
                s = int(batch.row_slots[i])
                assert (s == -1) == (e is None)
                assert rt.pool.slot_info(s)["in_flight"] >= 1 if s >= 0 else True
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
            assert len(entries) == rows, "a count mismatch was served"
    except (TypeError, ValueError, KeyError, PoolFullError) as exc:
        assert str(exc)
        if resolved:
            assert isinstance(exc, ValueError) and len(entries) != rows
    infos = [rt.pool.slot_info(s) for s in range(rt.pool.max_adapters)]
    assert all(i["state"] != "writing" and i["in_flight"] == 0 for i in infos), infos
    keys = [i["key"] for i in infos if i["key"] is not None]
    assert len(keys) == len(set(keys))
    assert rt.pool.stats()["used"] == len(keys)
    assert rt._serving == 0
