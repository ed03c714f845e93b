"""Issue 19 rows 2, 14, 17: hostile PEFT folders get a PeftFormatError (a ValueError) naming the file and the
problem, quickly, without reading tensor data they do not need.

Row 2: regexes from adapter_config.json (rank_pattern / alpha_pattern keys, target_modules, exclude_modules,
layers_pattern) are untrusted; `re` backtracks exponentially on `(.*.*)*Z` (load_peft never returned). The
calls that could hang run in a subprocess with a timeout, so the old code fails these tests instead of hanging.
Row 14: truncated / random / empty / huge-header safetensors and deep, non-UTF-8 or oversized configs raised
SafetensorError / RecursionError / UnicodeDecodeError without the file's path.
Row 17: a big tensor under a module the model lacks was read and hashed whole before the refusal.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperlora.adapters.peft_io import PeftFormatError, export_peft, read_peft
from hyperlora.modeling.targets import find_targets

TYPES = ["q_proj", "v_proj"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture(scope="module")
def targets():
    return find_targets(tiny_llama(), TYPES)


def _adapter(d, targets, rank=4):
    g = torch.Generator().manual_seed(0)
    ads = {n: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)) for n, (i, o) in targets.items()}
    export_peft(ads, d, rank=8, alpha=16)
    return d


def _edit_config(d, **changes):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


_CHILD = """
import json, sys, time
from hyperlora.adapters.peft_io import read_peft
targets = {k: tuple(v) for k, v in json.loads(sys.argv[1]).items()}
for d in sys.argv[2:]:
    t0 = time.perf_counter()
    try:
        ad = read_peft(d, targets=targets, max_rank=8)
        out = {"ok": True, "ranks": {n: a.shape[0] for n, (a, b, s) in ad.raw.items()},
               "scales": {n: s for n, (a, b, s) in ad.raw.items()}}
    except Exception as exc:
        out = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    out["wall"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
"""

BAD = "(.|.)*[XYZ]"  # exponential in `re` and in `regex` too
REGEX_CASES = {
    "(.*.*)*Z in rank_pattern and alpha_pattern": {"rank_pattern": {"(.*.*)*Z": 4}, "alpha_pattern": {"(.*.*)*Z": 3}},
    "(.*.*)*Z in target_modules": {"target_modules": "(.*.*)*Z"},
    "rank_pattern": {"rank_pattern": {BAD: 4}},
    "alpha_pattern": {"alpha_pattern": {BAD: 4}},
    "target_modules": {"target_modules": BAD},
    "exclude_modules": {"exclude_modules": BAD},
    "layers_pattern": {"layers_pattern": BAD, "layers_to_transform": [0]},
}


@pytest.fixture(scope="module")
def regex_results(tmp_path_factory, targets):
    """read_peft on every REGEX_CASES folder in one fresh interpreter, killed after 120 s: `re`'s matching cannot
    be interrupted in-process, so the old code makes these tests fail instead of hanging the suite."""
    root = tmp_path_factory.mktemp("regex")
    dirs = {}
    for i, (case, edits) in enumerate(REGEX_CASES.items()):
        dirs[case] = _adapter(root / f"c{i}", targets)
        _edit_config(dirs[case], **edits)
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(targets), *map(str, dirs.values())],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"read_peft did not return within 120 s (finished {len(done.splitlines())} of {len(dirs)} cases)")
    lines = out.strip().splitlines()[-len(dirs):]
    return {case: (dirs[case], json.loads(line)) for case, line in zip(dirs, lines)}


def test_exponential_rank_pattern_returns_with_peft_semantics(regex_results):
    """`(.*.*)*Z` matches no module name: PEFT's answer is 'default rank and alpha'; we give it without
    backtracking (the old reader never returned)."""
    d, got = regex_results["(.*.*)*Z in rank_pattern and alpha_pattern"]
    assert got["ok"], got
    assert set(got["ranks"].values()) == {8} and set(got["scales"].values()) == {16 / 8}
    assert got["wall"] < 10


def test_exponential_target_modules_regex_is_refused_by_name(regex_results):
    d, got = regex_results["(.*.*)*Z in target_modules"]
    assert not got["ok"] and got["type"] == "PeftFormatError", got
    assert str(d / "adapter_config.json") in got["message"] and "target_modules regex '(.*.*)*Z'" in got["message"]


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
                                   "layers_pattern"])
def test_regex_that_backtracks_in_any_engine_times_out_with_a_named_error(field, regex_results):
    """Bounded by the per-match timeout and refused naming the file, the field and the pattern."""
    d, got = regex_results[field]
    assert not got["ok"] and got["type"] == "PeftFormatError", got
    msg = got["message"]
    assert msg.startswith(str(d / "adapter_config.json")) and field in msg and BAD in msg and "did not finish" in msg
    assert got["wall"] < 10


@pytest.mark.parametrize("pattern,match", [
    ("(?:a{60000}){60000}", "expands to"),  # the regex engine would expand this to 3.6e9 nodes (MemoryError)
    ("q" * 5000, "longer than the 4,096 allowed"),
    ("(unclosed", "is not a valid regex"),
])
def test_oversized_or_invalid_pattern_is_refused_before_matching(pattern, match, tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    _edit_config(d, rank_pattern={pattern: 4})
    with pytest.raises(PeftFormatError, match=match) as err:
        read_peft(d, targets=targets, max_rank=8)
    assert err.value.path == str(d / "adapter_config.json") and "rank_pattern key" in str(err.value)


def test_benign_patterns_keep_peft_semantics(tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    _edit_config(d, rank_pattern={r"layers\.1\.self_attn\.v_proj": 4}, target_modules=r".*\.(q|v)_proj")
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    k = "base_model.model.model.layers.1.self_attn.v_proj"
    t[f"{k}.lora_A.weight"] = t[f"{k}.lora_A.weight"][:4]
    t[f"{k}.lora_B.weight"] = t[f"{k}.lora_B.weight"][:, :4].contiguous()
    save_file(t, str(p))
    ad = read_peft(d, targets=targets, max_rank=8)
    assert ad.raw["model.layers.1.self_attn.v_proj"][0].shape[0] == 4
    assert ad.raw["model.layers.0.self_attn.v_proj"][0].shape[0] == 8


# ---------------------------------------------------------------------------------------------------------
# row 14: hostile files
# ---------------------------------------------------------------------------------------------------------

def _valid_bytes(targets):
    g = torch.Generator().manual_seed(0)
    from safetensors.torch import save

    t = {}
    for n, (i, o) in targets.items():
        t[f"base_model.model.{n}.lora_A.weight"] = torch.randn(8, i, generator=g)
        t[f"base_model.model.{n}.lora_B.weight"] = torch.randn(o, 8, generator=g)
    return save(t)


def _header(obj) -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h


def _weights_cases(targets):
    good = _valid_bytes(targets)
    n = struct.unpack("<Q", good[:8])[0]
    return {
        "zero-length": (b"", "too short for a safetensors file"),
        "random bytes": (bytes(range(256)) * 40, "declares a"),
        "truncated in the header": (good[: 8 + n // 2], "is truncated"),
        "truncated in the data": (good[:-100], "is truncated: its header's tensors need"),
        "trailing bytes": (good + b"\0" * 7, "bytes after its last tensor"),
        "huge header length": (struct.pack("<Q", 1 << 40) + b"{}", "declares a 1,099,511,627,776-byte header"),
        "header not UTF-8": (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "header is not valid UTF-8"),
        "header not JSON": (struct.pack("<Q", 5) + b"{nope", "header is not valid JSON"),
        "header nested": (struct.pack("<Q", 100000) + b"[" * 100000, "nested too deeply"),
        "header a list": (_header([1, 2]), "header must be a JSON object"),
        "unknown dtype": (_header({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
                          "has dtype 'F99'"),
        "offsets too short": (_header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}) + b"\0" * 4,
                              "needs 16 bytes but its data_offsets"),
        "negative shape": (_header({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "has shape"),
        "overlapping": (_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
                        "stored back to back"),
        "duplicate names": (struct.pack("<Q", 2) + b"{}"[:0] + b"{}", None),  # placeholder, replaced below
        "bad metadata": (_header({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
        "no tensors": (_header({}), "holds no tensors"),
    }


def test_hostile_safetensors_get_a_named_error(tmp_path, targets):
    cases = _weights_cases(targets)
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    cases["duplicate names"] = (struct.pack("<Q", len(dup)) + dup + b"\0" * 4, "lists 'a' twice")
    for what, (data, match) in cases.items():
        d = _adapter(tmp_path / what.replace(" ", "_"), targets)
        w = d / "adapter_model.safetensors"
        w.write_bytes(data)
        with pytest.raises(PeftFormatError) as err:
            read_peft(d, targets=targets, max_rank=8)
        assert err.value.path == str(w) and str(err.value).startswith(str(w)), what
        assert match in str(err.value), (what, str(err.value))


@pytest.mark.parametrize("what,data,match", [
    ("deep nesting", b"[" * 200000, "nested too deeply"),
    ("invalid UTF-8", b'{"r": 8, "name": "\xff\xfe"}', r"is not valid UTF-8 \(byte 18"),
    ("not JSON", b"{'r': 8}", "is not valid JSON"),
    ("a list", b"[1, 2]", "must hold a JSON object"),
    ("huge int", b'{"r": ' + b"9" * 5000 + b"}", "is not valid JSON"),
    ("infinite r", b'{"r": 1e999, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r must be finite"),
    ("huge int alpha", b'{"r": 8, "lora_alpha": ' + b"9" * 4000 + b', "target_modules": ["q_proj"]}',
     "lora_alpha must be finite"),
    ("oversized", b" " * (17 << 20) + b"{}", "an adapter config is a few KB"),
])
def test_hostile_config_gets_a_named_error(what, data, match, tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    c = d / "adapter_config.json"
    c.write_bytes(data)
    with pytest.raises(PeftFormatError, match=match) as err:
        read_peft(d, targets=targets, max_rank=8)
    assert err.value.path == str(c) and str(err.value).startswith(str(c)), what


# ---------------------------------------------------------------------------------------------------------
# row 17: names and shapes come from the header, before any tensor data is read
# ---------------------------------------------------------------------------------------------------------

BIG = 64 << 20  # bytes of the big tensor


def _with_big_tensor(d, module: str) -> None:
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(8, BIG // 32)
    t[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(32, 8)
    save_file(t, str(p))


def _peak(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - returned for the caller to check
            out = exc
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_big_tensor_of_a_module_the_model_lacks_is_refused_without_reading_it(tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    _with_big_tensor(d, "model.layers.9.self_attn.q_proj")  # q_proj is wrapped; the model has 2 layers
    peak, err = _peak(lambda: read_peft(d, targets=targets, max_rank=8))
    assert isinstance(err, PeftFormatError) and "model.layers.9.self_attn.q_proj" in str(err), err
    assert "not served for this model" in str(err)
    assert peak < BIG // 8, f"peak Python allocation {peak:,} bytes: the tensor was read"
    # the data section is never touched: cut it off and the refusal is the same
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - BIG // 2])
    with pytest.raises(PeftFormatError, match=r"modules \['model\.layers\.9\.self_attn\.q_proj'\] are not served"):
        read_peft(d, targets=targets, max_rank=8)


def test_big_tensor_of_an_unwrapped_module_is_ignored_unread(tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    _with_big_tensor(d, "model.layers.0.mlp.up_proj")  # not in target_modules: PEFT ignores it
    peak, ad = _peak(lambda: read_peft(d, targets=targets, max_rank=8))
    assert not isinstance(ad, Exception), ad
    assert set(ad.modules) == set(targets) and len(ad.ignored) == 2
    assert peak < BIG // 8, f"peak Python allocation {peak:,} bytes: the ignored tensor was read"


def test_wrong_shape_is_refused_from_the_header_even_if_the_data_is_cut(tmp_path, targets):
    d = _adapter(tmp_path / "a", targets)
    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 31)
    save_file(t, str(p))
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(PeftFormatError, match=r"needs lora_A \[8, 32\]"):
        read_peft(d, targets=targets, max_rank=8)
