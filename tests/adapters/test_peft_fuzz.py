"""Property-based tests of the PEFT loader: random configs, random safetensors headers and tensors, garbage bytes.

Whatever the folder holds, `read_peft` (with and without the model's targets) returns a valid adapter or raises
the documented ValueError (PeftFormatError) / FileNotFoundError, within a few seconds; `vllm_problems` returns
a list. In the suite each test runs a bounded number of examples; the recorded fuzz run (docs/RELIABILITY.md,
"PEFT loader and exports") sets HYPERLORA_FUZZ_EXAMPLES (examples per test) and HYPERLORA_FUZZ_REPORT (a JSON
file the counters are written to).
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch

from hyperlora.adapters.peft_io import PeftAdapter, export_peft, read_peft, vllm_problems

import hypothesis  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("HYPERLORA_FUZZ_EXAMPLES", "40"))
HANG_S = 10.0  # an example slower than this counts as a hang (benign reads take milliseconds)
SETTINGS = hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 40,
                               suppress_health_check=list(hypothesis.HealthCheck))
STATS = {"examples": 0, "loaded": 0, "refused": 0, "crashes": 0, "hangs": 0, "max_s": 0.0}

# a 2-layer model's served modules, as the runtime passes them
TARGETS = {f"model.layers.{i}.self_attn.{t}": (16, o) for i in range(2) for t, o in (("q_proj", 16), ("v_proj", 8))}
R = 4


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("HYPERLORA_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps(STATS, indent=2) + "\n")


def _check(d: Path) -> None:
    """The property: each read either loads a consistent adapter or raises a documented error, quickly."""
    for targets in (TARGETS, None):
        t0 = time.perf_counter()
        try:
            ad = read_peft(d, targets=targets, max_rank=8)
        except (ValueError, FileNotFoundError):
            STATS["refused"] += 1
        except Exception:
            STATS["crashes"] += 1
            raise
        else:
            STATS["loaded"] += 1
            assert isinstance(ad, PeftAdapter) and ad.modules and 0 < ad.rank <= 8
            for n, (a, b) in ad.modules.items():
                if targets is not None:
                    assert n in targets and a.shape[1] == targets[n][0] and b.shape[0] == targets[n][1]
                assert a.shape[0] == b.shape[1] and torch.isfinite(a).all() and torch.isfinite(b.float()).all()
        dt = time.perf_counter() - t0
        STATS["max_s"] = max(STATS["max_s"], dt)
        if dt > HANG_S:
            STATS["hangs"] += 1
            raise AssertionError(f"read_peft took {dt:.1f} s")
    problems = vllm_problems(d)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    STATS["examples"] += 1


def _base_dir(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    ads = {n: (torch.randn(R, i, generator=g), torch.randn(o, R, generator=g)) for n, (i, o) in TARGETS.items()}
    return export_peft(ads, root / "a", rank=8, alpha=16)


# ---- strategies ---------------------------------------------------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 40), st.integers(), st.floats(),
                       st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c,
                                                                                             max_size=4)),
                     max_leaves=12)
_REGEX_ALPHABET = "()[]{}.*+?|\\^$0123456789qvkpro_jlayes,=!<:-"
_regexish = st.text(alphabet=_REGEX_ALPHABET, max_size=14)
_words = st.sampled_from(["q_proj", "v_proj", "k_proj", "self_attn.q_proj", "layers.0.self_attn.v_proj",
                          "model.layers.1.self_attn.q_proj", "up_proj", "proj", "all-linear", "ALL-LINEAR", ""])
_module_list = st.lists(st.one_of(_words, _regexish), max_size=4)
_target_modules = st.one_of(_module_list, _words, _regexish, _json)
_layers = st.one_of(st.none(), st.integers(-1, 3), st.lists(st.integers(-1, 3), max_size=3), _json)
_layers_pattern = st.one_of(st.none(), st.sampled_from(["layers", "h", "", "model.layers"]), _regexish,
                            st.lists(st.one_of(_words, _regexish), max_size=2), _json)
_pattern_table = st.one_of(st.none(), st.dictionaries(st.one_of(_words, _regexish),
                                                      st.one_of(st.integers(-1, 9), st.floats(), _json_leaf),
                                                      max_size=3), _json)

CONFIG_FIELDS = {
    "peft_type": st.one_of(st.just("LORA"), st.just("lora"), st.just("IA3"), _json_leaf),
    "r": st.one_of(st.sampled_from([4, 8, 4.0, 0, -4, 16]), _json_leaf),
    "lora_alpha": st.one_of(st.sampled_from([8, 16, 0.5, -3]), _json_leaf),
    "target_modules": _target_modules,
    "exclude_modules": st.one_of(st.none(), _module_list, _regexish, _json),
    "layers_to_transform": _layers,
    "layers_pattern": _layers_pattern,
    "rank_pattern": _pattern_table,
    "alpha_pattern": _pattern_table,
    "use_rslora": st.one_of(st.booleans(), _json_leaf),
    "use_dora": st.one_of(st.just(False), _json_leaf),
    "bias": st.one_of(st.just("none"), st.sampled_from(["all", "lora_only"]), _json_leaf),
    "modules_to_save": st.one_of(st.none(), _json),
    "init_lora_weights": st.one_of(st.sampled_from([True, False, "gaussian", "eva", "pissa", "olora", None]),
                                   _json_leaf),
}
_config = st.fixed_dictionaries({}, optional=CONFIG_FIELDS)

_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "F99", "f32", ""]
_KEYS = ([f"base_model.model.{n}.lora_{w}.weight" for n in TARGETS for w in "AB"]
         + [f"{n}.lora_A.weight" for n in TARGETS]
         + ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", "__metadata__"])


@st.composite
def _tensor_file(draw) -> bytes:
    """A safetensors file: a header of random entries (names, dtypes, shapes, offsets), then random data."""
    entries, data, pos = {}, b"", 0
    for _ in range(draw(st.integers(0, 10))):
        name = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=30)))
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.one_of(st.sampled_from([[R, 16], [16, R], [8, R], [R, 8], [R, 15], [8], []]),
                               st.lists(st.integers(0, 40), max_size=3)))
        size = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(dtype, 1) * math.prod(shape)
        if draw(st.booleans()):
            offsets = [pos, pos + size]
        else:
            offsets = draw(st.lists(st.integers(-2, 200), min_size=0, max_size=3))
        chunk = draw(st.one_of(st.binary(min_size=size, max_size=size), st.just(b"\0" * size),
                               st.just(struct.pack("<f", float("nan")) * (size // 4) + b"\0" * (size % 4))))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        data += chunk
        pos += size
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.just({"format": "pt"}), _json))
    header = json.dumps(entries).encode()
    out = struct.pack("<Q", len(header)) + header + data
    cut = draw(st.one_of(st.none(), st.integers(0, max(len(out), 1))))
    return out if cut is None else out[:cut]


@st.composite
def _mutated(draw, raw: bytes) -> bytes:
    """A valid file with a few random byte edits, a cut or a tail."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["none", "cut", "tail"]))
    if how == "cut":
        b = b[: draw(st.integers(0, len(b)))]
    elif how == "tail":
        b += draw(st.binary(max_size=16))
    return bytes(b)


# ---- tests --------------------------------------------------------------------------------------------

@SETTINGS
@hypothesis.given(edits=_config)
def test_random_config_fields_load_or_raise_the_documented_error(edits):
    with tempfile.TemporaryDirectory() as tmp:
        d = _base_dir(Path(tmp))
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(edits)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        _check(d)


@SETTINGS
@hypothesis.given(data=st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())),
                  where=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
def test_garbage_bytes_in_either_file_raise_the_documented_error(data, where):
    with tempfile.TemporaryDirectory() as tmp:
        d = _base_dir(Path(tmp))
        (d / where).write_bytes(data)
        _check(d)


@SETTINGS
@hypothesis.given(raw=_tensor_file())
def test_random_safetensors_headers_and_tensors_load_or_raise(raw):
    with tempfile.TemporaryDirectory() as tmp:
        d = _base_dir(Path(tmp))
        (d / "adapter_model.safetensors").write_bytes(raw)
        _check(d)


@SETTINGS
@hypothesis.given(st.data())
def test_byte_edits_of_a_valid_folder_load_or_raise(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = _base_dir(Path(tmp))
        where = data.draw(st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]))
        p = d / where
        p.write_bytes(data.draw(_mutated(p.read_bytes())))
        _check(d)
