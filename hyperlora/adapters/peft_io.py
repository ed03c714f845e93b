"""PEFT interchange: write LoRA adapters as PEFT directories, and read + validate PEFT directories.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module name>.lora_A.weight` [r, d_in] and `...lora_B.weight` [d_out, r]; the layer computes
`y += (alpha / r) * B A x` (`alpha / sqrt(r)` with rsLoRA). GPT-2's Conv1D layers use the same A/B shapes
(PEFT sets fan_in_fan_out for them; only the base weight is transposed).

Export writes what `peft.PeftModel.from_pretrained` loads and what vLLM accepts: a rank among vLLM's
allowed sizes (an adapter of another rank is zero-padded to the next one, alpha scaled to keep alpha / r),
no bias, no DoRA, no modules_to_save. It is all-or-nothing: the files go to a temporary directory beside the
target, which is then renamed into place (a failure leaves the old directory as it was), and a non-empty
directory holding anything but this same adapter is replaced only with overwrite=True.

Import applies exactly the tensors PEFT applies (its target_modules / exclude_modules / layers_to_transform /
layers_pattern rules; keys need the `base_model.model.` prefix) and refuses anything it cannot apply
exactly, with a `PeftFormatError` (a ValueError) naming the file and saying why: files that are not
UTF-8 JSON or valid safetensors, regexes that would backtrack for ever (matching is time-bounded),
pickled weights (a .bin can run arbitrary code when loaded), DoRA, trained biases, modules_to_save, ranks
above the pool's, modules the model does not have, wrong shapes, NaN/Inf. Names, shapes and dtypes are
checked from the safetensors header before any tensor data is read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import re._constants as _re_constants  # re's own parser: what PEFT's re.compile accepts, and how big it is
import re._parser as _re_parser
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import regex  # re-compatible engine with match timeouts, for regexes read from adapter files (transformers needs it)
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from hyperlora._io import atomic_dir
from hyperlora.modeling.targets import is_conv1d, linear_shape, matches_type

__all__ = ["VLLM_RANKS", "PeftAdapter", "PeftFormatError", "export_peft", "write_peft", "export_policy", "read_peft",
           "vllm_problems"]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
PREFIX = "base_model.model."


@dataclass
class PeftAdapter:
    """A validated PEFT LoRA adapter.

    modules: full module name -> (A [r, d_in], B [d_out, r] with the module's scale folded in) (what
    `AdapterPool.write` takes with slot scale 1); raw: name -> (A, B unscaled, scale); rank: the largest r;
    key: sha256 of the config and tensors (a content key for the pool); config: adapter_config.json;
    ignored: tensor keys PEFT ignores (modules the config does not wrap), never read.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    raw: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    key: str
    config: dict[str, Any] = field(repr=False)
    source: str = ""
    ignored: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM allows that is >= rank (ValueError above 512)."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"rank {rank} exceeds vLLM's largest LoRA rank {VLLM_RANKS[-1]}")


def _conv1d_targets(base_model: nn.Module | None, names: Sequence[str]) -> bool:
    if base_model is None:
        return False
    mods = dict(base_model.named_modules())
    return any(is_conv1d(mods[n]) for n in names if n in mods)


def _default_target_modules(names: Sequence[str], base_model: nn.Module | None) -> list[str]:
    """Short names (q_proj, ...), unless in `base_model` they would also match modules the adapter lacks."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if base_model is None:
        return short
    covered = set(names)
    extra = [n for n, m in base_model.named_modules()
             if n and linear_shape(m) is not None and n not in covered and any(matches_type(n, s) for s in short)]
    return short if not extra else sorted(covered)


def export_peft(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: str | Path, *, rank: int,
                alpha: float, target_modules: Sequence[str] | None = None,
                base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False,
                base_model: nn.Module | None = None, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """Write `adapters` ({full module name: (A [r_m, d_in], B [d_out, r_m])}, scale NOT applied) as a PEFT
    LoRA directory with PEFT scale alpha / rank. Modules with r_m < rank, and a rank outside VLLM_RANKS, are
    zero-padded (alpha scaled to keep alpha / rank): the adapter's function is unchanged.

    target_modules: default the modules' short names (full names if those would also match other layers of
    `base_model`). base_model (optional nn.Module): detects GPT-2 Conv1D (fan_in_fan_out) and the model's
    name_or_path. dtype: saved dtype (default: A's). Returns the directory.

    All-or-nothing: both files are written to a temporary directory beside `directory` and renamed into place,
    so a failure leaves `directory` exactly as it was. A `directory` that exists and is not empty is left alone
    if it already holds exactly this adapter; otherwise FileExistsError unless overwrite=True, which replaces it
    whole (no stale files stay) -- only if it looks like an adapter directory (adapter_config.json or
    adapter_model.*, no sub-directories), so a wrong path cannot wipe an unrelated folder.
    """
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError("adapters must be a non-empty dict {module name: (A, B)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    tensors: dict[str, torch.Tensor] = {}
    out_rank = vllm_rank(rank)
    for name, pair in adapters.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"adapters[{name!r}] must be a pair (A, B)")
        a, b = (t.detach().to("cpu") for t in pair)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapters[{name!r}]: need A [r, d_in] and B [d_out, r], got {tuple(a.shape)}, {tuple(b.shape)}")
        r = a.shape[0]
        if r > rank:
            raise ValueError(f"adapters[{name!r}] has rank {r} > rank={rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"adapters[{name!r}] holds NaN or Inf")
        dt = dtype or a.dtype
        a_pad = torch.zeros(out_rank, a.shape[1], dtype=dt)
        b_pad = torch.zeros(b.shape[0], out_rank, dtype=dt)
        a_pad[:r] = a.to(dt)
        b_pad[:, :r] = b.to(dt)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a_pad.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b_pad.contiguous()
    out_alpha = alpha * out_rank / rank
    if float(out_alpha).is_integer():
        out_alpha = int(out_alpha)
    names = list(adapters)
    if base_model is not None:
        mods = dict(base_model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"adapter modules {missing[:4]} are not in base_model; PEFT would not apply them")
        fan_in_fan_out = fan_in_fan_out or _conv1d_targets(base_model, names)
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    tm = list(target_modules) if target_modules is not None else _default_target_modules(names, base_model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": out_rank,
        "lora_alpha": out_alpha,
        "target_modules": tm,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    files = {WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
             CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode("utf-8")}
    d = Path(directory)
    _write_adapter_dir(d, files, overwrite=overwrite)
    return d


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _same_files(d: Path, files: dict[str, bytes]) -> bool:
    present = {p.name: p for p in d.iterdir()}
    return set(present) == set(files) and all(
        present[n].is_file() and not present[n].is_symlink() and present[n].stat().st_size == len(data)
        and present[n].read_bytes() == data for n, data in files.items())


def _write_adapter_dir(d: Path, files: dict[str, bytes], *, overwrite: bool) -> None:
    """Write `files` as directory `d`, all-or-nothing (see export_peft for the overwrite rules)."""
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise FileExistsError(f"{d} exists and is not a directory: export into a new or empty directory")
    if d.is_dir() and any(d.iterdir()):
        if _same_files(d, files):
            return  # this very adapter is already there
        present = sorted(p.name for p in d.iterdir())
        shown = f"{present[:6]}{' ...' if len(present) > 6 else ''}"
        if not overwrite:
            raise FileExistsError(f"{d} already holds {shown}, not this adapter: pass overwrite=True to replace the "
                                  f"directory (it then holds only the new adapter's files), or export elsewhere")
        adapter_files = {CONFIG_NAME, WEIGHTS_NAME, *PICKLE_NAMES}
        if not adapter_files & set(present) or any(p.is_dir() for p in d.iterdir()):
            raise FileExistsError(f"{d} holds {shown}: not an adapter directory (no adapter_config.json / "
                                  f"adapter_model.*, or sub-directories), so overwrite=True does not replace it")
    d.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(d) as tmp:
        for name, data in files.items():
            _write_file(tmp / name, data)


def write_peft(directory: str | Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int,
               lora_alpha: float, base_model: nn.Module | None = None, **kw: Any) -> Path:
    """`export_peft` with the argument order the runtime uses (modules' B already scaled: lora_alpha = rank);
    `overwrite=True` (in kw) replaces a directory holding another adapter."""
    return export_peft(modules, directory, rank=rank, alpha=lora_alpha, base_model=base_model, **kw)


def export_policy(hypernet: Any, task_emb: torch.Tensor, directory: str | Path, *,
                  base_model: nn.Module | None = None, overwrite: bool = False) -> Path:
    """Generate one policy's adapter with `hypernet` (task_emb [1, E]) and write it as a PEFT directory
    (rank = hypernet rank, lora_alpha = the hypernetwork's alpha, so PEFT's scale equals the pool's);
    written all-or-nothing, overwrite as in `export_peft`."""
    if task_emb.dim() == 2 and task_emb.shape[0] != 1:
        raise ValueError(f"export_policy exports one policy: task_emb must be [1, E], got {tuple(task_emb.shape)}")
    with torch.no_grad():
        modules = hypernet.adapters(task_emb)[0]
    cfg = hypernet.config
    return export_peft({n: (a.float(), b.float()) for n, (a, b) in modules.items()}, directory, rank=int(cfg.rank),
                       alpha=float(cfg.lora_alpha), base_model=base_model,
                       base_model_name_or_path=cfg.base_model_name_or_path, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------

MAX_CONFIG_BYTES = 16 << 20   # adapter_config.json is a few KB; a bigger file is refused before it is parsed
MAX_HEADER_BYTES = 16 << 20   # a safetensors header of ~130,000 tensors; safetensors' own limit is 100 MB
MAX_NAME_CHARS = 1024         # a tensor name longer than this is not a module name
MAX_PATTERN_CHARS = 4096      # a regex from a config longer than this is refused unread
REGEX_TIMEOUT_S = 0.25        # one match of a config regex against one module name (benign ones take microseconds)
REGEX_BUDGET_S = 5.0          # all matches of one read_peft call together
MAX_PATTERN_EXPANSION = 100_000  # regex nodes after expanding counted repeats ((a{1000}){1000} = 1e6 is refused)

# safetensors dtypes and their byte sizes (a dtype outside this table is refused); LoRA weights must be floats
_ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

_KEY_RE = re.compile(r"^(?P<name>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_NAMED_KEY_RE = re.compile(r"^(?P<name>.+)\.(?P<which>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
# PEFT's layer-index pattern when layers_pattern is empty (check_target_module_exists): the first numbered segment
_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class PeftFormatError(ValueError):
    """A PEFT directory whose config or weights cannot be read as PEFT reads them, or that hyperlora refuses.

    `path` is the offending file, `problem` what is wrong with it; str() is "<path>: <problem>"."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def _refuse(cond: bool, path: str | Path, problem: str) -> None:
    if cond:
        raise PeftFormatError(path, problem)


def _read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, or PeftFormatError naming the file and the problem (size, UTF-8, JSON)."""
    try:
        size = path.stat().st_size
        _refuse(size > MAX_CONFIG_BYTES, path, f"is {size:,} bytes; an adapter config is a few KB (limit "
                                               f"{MAX_CONFIG_BYTES:,})")
        raw = path.read_bytes()
    except OSError as exc:
        raise PeftFormatError(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PeftFormatError(path, f"is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        config = json.loads(text)
    except RecursionError:
        raise PeftFormatError(path, "is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int() limits on huge numbers
        raise PeftFormatError(path, f"is not valid JSON: {exc}") from None
    _refuse(not isinstance(config, dict), path, "must hold a JSON object")
    return config


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


@dataclass(frozen=True)
class _Header:
    tensors: dict[str, _TensorInfo]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section
    data_len: int    # bytes the tensors need
    file_size: int


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(path: Path) -> _Header:
    """Parse and validate a .safetensors header without reading any tensor data.

    Checks what safetensors checks when it opens a file (header size, UTF-8 JSON object, dtype / shape /
    data_offsets of every entry, tensors stored back to back from offset 0) plus duplicate names; whether the
    data section is complete is left to the caller (`data_start + data_len == file_size`), so that name and
    shape problems are reported first. Raises PeftFormatError naming the file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            _refuse(len(head) < 8, path, f"is {size} bytes: too short for a safetensors file (an 8-byte header "
                                         f"length comes first)")
            n = struct.unpack("<Q", head)[0]
            _refuse(n > MAX_HEADER_BYTES, path, f"declares a {n:,}-byte header (limit {MAX_HEADER_BYTES:,}): not a "
                                                f"LoRA safetensors file")
            _refuse(n > size - 8, path, f"is truncated: it declares a {n:,}-byte header but holds {size - 8:,} bytes "
                                        f"after the length")
            raw = fh.read(n)
    except OSError as exc:
        raise PeftFormatError(path, f"cannot be read ({exc.strerror or exc})") from None
    _refuse(len(raw) != n, path, "is truncated: the header is incomplete")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise PeftFormatError(path, f"header is not valid UTF-8 (byte {exc.start}): not a safetensors file") from None
    except RecursionError:
        raise PeftFormatError(path, "header is not valid JSON: nested too deeply") from None
    except _DuplicateKey as exc:
        raise PeftFormatError(path, f"header lists {str(exc.args[0])[:80]!r} twice") from None
    except ValueError as exc:
        raise PeftFormatError(path, f"header is not valid JSON ({exc}): not a safetensors file") from None
    _refuse(not isinstance(obj, dict), path, "header must be a JSON object: not a safetensors file")
    meta = obj.pop("__metadata__", None)
    _refuse(meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())),
            path, "header's __metadata__ must map strings to strings")
    tensors: dict[str, _TensorInfo] = {}
    for name, entry in obj.items():
        what = f"header entry {name[:80]!r}"
        _refuse(not isinstance(entry, dict), path, f"{what} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        _refuse(not isinstance(dtype, str) or dtype not in _ST_SIZES, path,
                f"{what} has dtype {str(dtype)[:20]!r}, not one of {sorted(_ST_SIZES)}")
        _refuse(not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(s) for s in shape), path,
                f"{what} has shape {str(shape)[:60]}, not a list of at most 8 non-negative ints")
        _refuse(not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                     and offsets[0] <= offsets[1]), path,
                f"{what} has data_offsets {str(offsets)[:60]}, not [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * _ST_SIZES[dtype]
        _refuse(need != offsets[1] - offsets[0], path,
                f"{what}: {dtype} {shape} needs {need:,} bytes but its data_offsets {offsets} span "
                f"{offsets[1] - offsets[0]:,}")
        tensors[name] = _TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        _refuse(info.begin != pos, path, f"tensor {name[:80]!r} starts at byte {info.begin:,} of the data section, "
                                         f"expected {pos:,} (tensors are stored back to back)")
        pos = info.end
    return _Header(tensors=tensors, metadata=dict(meta or {}), data_start=8 + n, data_len=pos, file_size=size)


def _check_data_size(path: Path, h: _Header) -> None:
    have = h.file_size - h.data_start
    _refuse(have < h.data_len, path, f"is truncated: its header's tensors need {h.data_len:,} bytes of data, the file "
                                     f"holds {have:,}")
    _refuse(have > h.data_len, path, f"has {have - h.data_len:,} bytes after its last tensor (safetensors refuses "
                                     f"such a file)")


def _read_tensor(fh: Any, path: Path, h: _Header, key: str) -> torch.Tensor:
    info = h.tensors[key]
    dtype = _ST_FLOATS[info.dtype]
    n = info.end - info.begin
    if n == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(n)
    fh.seek(h.data_start + info.begin)
    _refuse(fh.readinto(buf) != n, path, f"is truncated: tensor {key!r} is incomplete")
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


class _Patterns:
    """Regexes from one adapter config. Syntax is checked with `re` (what PEFT compiles them with); matching runs
    on the `regex` engine (re-compatible) with a time limit per match and for the whole read, so a pattern that
    backtracks exponentially (`(.*.*)*Z`, `(.|.)*[XYZ]`) is refused instead of hanging the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spent = 0.0
        self._compiled: dict[str, Any] = {}

    def compile(self, pattern: str, what: str) -> Any:
        got = self._compiled.get(pattern)
        if got is not None:
            return got
        _refuse(len(pattern) > MAX_PATTERN_CHARS, self.path,
                f"{what}: a {len(pattern):,}-character regex ({pattern[:40]!r}...) is longer than the "
                f"{MAX_PATTERN_CHARS:,} allowed")
        try:
            size = _expansion(_re_parser.parse(pattern))  # re's parser: what PEFT's re.compile accepts
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise PeftFormatError(self.path, f"{what}: {pattern[:200]!r} is not a valid regex ({exc})") from None
        _refuse(size > MAX_PATTERN_EXPANSION, self.path,
                f"{what}: regex {pattern[:200]!r} expands to ~{size:,} nodes (counted repeats multiply), over the "
                f"{MAX_PATTERN_EXPANSION:,} allowed; refused as unsafe")
        try:
            got = regex.compile(pattern)
        except (regex.error, RecursionError, OverflowError, ValueError, MemoryError) as exc:
            raise PeftFormatError(self.path, f"{what}: {pattern[:200]!r} is not a valid regex ({exc})") from None
        self._compiled[pattern] = got
        return got

    def run(self, pattern: str, name: str, what: str, *, full: bool) -> Any:
        compiled = self.compile(pattern, what)
        left = REGEX_BUDGET_S - self.spent
        _refuse(left <= 0, self.path, f"{what}: matching the config's regexes against the model's module names took "
                                      f"over {REGEX_BUDGET_S:g} s; simplify the patterns")
        t0 = time.perf_counter()
        try:
            return (compiled.fullmatch if full else compiled.match)(name, timeout=min(REGEX_TIMEOUT_S, left))
        except TimeoutError:
            raise PeftFormatError(self.path, f"{what}: regex {pattern!r} did not finish within {REGEX_TIMEOUT_S:g} s "
                                             f"on module name {name!r} (it backtracks exponentially); refused as "
                                             f"unsafe, write it without nested repetition") from None
        finally:
            self.spent += time.perf_counter() - t0


_REPEATS = (_re_constants.MAX_REPEAT, _re_constants.MIN_REPEAT, getattr(_re_constants, "POSSESSIVE_REPEAT", None))


def _subpatterns(av: Any) -> Iterator[Any]:
    if isinstance(av, _re_parser.SubPattern):
        yield av
    elif isinstance(av, (list, tuple)):
        for x in av:
            yield from _subpatterns(x)


def _expansion(items: Any) -> int:
    """How many nodes a regex compiles to once counted repeats are written out (the `regex` engine expands
    `x{n}`; nested counts multiply, so a short pattern can need gigabytes)."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            lo, hi, sub = av
            total += max(lo if hi == _re_constants.MAXREPEAT else hi, 1) * max(_expansion(sub), 1)
        else:
            total += 1 + sum(_expansion(s) for s in _subpatterns(av))
        if total > MAX_PATTERN_EXPANSION:
            break
    return total


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class _TargetRule:
    """Which modules a LoRA config wraps, by PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists and
    LoraConfig.__post_init__, PEFT 0.13-0.22); a tensor of a module it does not wrap is ignored by PEFT.

    - exclude_modules (checked first): a str is a regex that must match the whole name; a list excludes a name
      equal to an entry or ending in "." + entry.
    - target_modules: "all-linear" wraps every linear layer but the output head; another str is a regex that must
      match the whole name; a list wraps a name equal to an entry, or ending in "." + entry and, when
      layers_to_transform is set, whose layer index (the number after `layers_pattern`, else the first
      numbered segment after the first two components) is in it.
    - refused where PEFT refuses (layers_to_transform or layers_pattern with a str target_modules,
      layers_pattern without layers_to_transform) or where its result depends on the base model (20+
      target_modules, which PEFT condenses to suffixes, with layers_to_transform on a module named in full)."""

    def __init__(self, config: dict[str, Any], path: Path, patterns: _Patterns) -> None:
        self.path, self.patterns = path, patterns
        tm = config["target_modules"]
        _refuse(not ((isinstance(tm, str) and tm) or (_str_list(tm) and tm)), path,
                f"target_modules must be a non-empty list of module names or a regex string, got {str(tm)[:80]}")
        ex = config.get("exclude_modules")
        _refuse(ex is not None and not isinstance(ex, str) and not _str_list(ex), path,
                f"exclude_modules must be a list of module names, a regex string or null, got {str(ex)[:80]}")
        lt = config.get("layers_to_transform")
        _refuse(lt is not None and not _is_int(lt) and not (isinstance(lt, list) and all(_is_int(i) for i in lt)),
                path, f"layers_to_transform must be an int, a list of ints or null, got {str(lt)[:80]}")
        lp = config.get("layers_pattern")
        _refuse(lp is not None and not isinstance(lp, str) and not _str_list(lp), path,
                f"layers_pattern must be a string, a list of strings or null, got {str(lp)[:80]}")
        self.all_linear = isinstance(tm, str) and tm.lower() == "all-linear"
        _refuse(isinstance(tm, str) and lp is not None, path,
                "layers_pattern cannot be used when target_modules is a str (PEFT refuses this config)")
        _refuse(bool(lp) and lt is None, path,
                "layers_pattern is set but layers_to_transform is not (PEFT refuses this config)")
        _refuse(isinstance(tm, str) and lt is not None, path,
                "layers_to_transform cannot be used when target_modules is a str (PEFT 0.22 refuses this config; "
                "older PEFT ignored the layer filter, and on 20+ all-linear layers applied it): list the modules")
        self.using_layers = lt is not None and (len(lt) != 0 if isinstance(lt, list) else True)
        self.regex = tm if isinstance(tm, str) and not self.all_linear else None
        self.names = set(tm) if isinstance(tm, list) else set()
        self.exclude = ex if ex else None
        self.layers = lt
        self.layer_patterns = ([lp] if isinstance(lp, str) else list(lp)) if lp else []
        if self.regex is not None:
            patterns.compile(self.regex, "target_modules")
        if isinstance(self.exclude, str):
            patterns.compile(self.exclude, "exclude_modules")
        for p in self.layer_patterns:
            patterns.compile(self._layer_regex(p), f"layers_pattern {p[:80]!r}")
        self._cache: dict[str, bool] = {}

    @staticmethod
    def _layer_regex(p: str) -> str:
        return rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."

    def __call__(self, name: str) -> bool:
        got = self._cache.get(name)
        if got is None:
            got = self._cache[name] = self._wraps(name)
        return got

    def _wraps(self, name: str) -> bool:
        ex = self.exclude
        if isinstance(ex, str):
            if self.patterns.run(ex, name, "exclude_modules", full=True):
                return False
        elif ex and (name in ex or any(name.endswith("." + e) for e in ex)):
            return False
        if self.all_linear:
            return True  # the caller knows which modules are served (all linear layers, never the output head)
        if self.regex is not None:
            return bool(self.patterns.run(self.regex, name, "target_modules", full=True))
        if name in self.names:
            _refuse(self.using_layers and len(self.names) >= 20, self.path,
                    f"target_modules names {name!r} in full and layers_to_transform is set: PEFT condenses 20+ "
                    f"target_modules to suffixes first, after which the layer filter may drop it; list fewer modules "
                    f"or drop layers_to_transform")
            return True
        if not any(name.endswith("." + t) for t in self.names):
            return False
        if not self.using_layers:
            return True
        m = None
        if not self.layer_patterns:
            m = _LAYER_RE.match(name)
        else:
            for p in self.layer_patterns:
                m = self.patterns.run(self._layer_regex(p), name, f"layers_pattern {p[:80]!r}", full=False)
                if m is not None:
                    break
        idx = m.group("idx") if m is not None else None
        if idx is None:
            return False
        return int(idx) == self.layers if isinstance(self.layers, int) else int(idx) in self.layers


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pattern_value(patterns: _Patterns, table: dict[str, Any], name: str, default: Any, what: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key): the first key, in file order, matching the end
    of the module name as a regex `(.*\\.)?(key)$`."""
    for key, value in table.items():
        if patterns.run(rf"(.*\.)?({key})$", name, f"{what} key {key[:80]!r}", full=False):
            return value
    return default


def _init_kind(init: Any) -> str | None:
    """How PEFT initialises a wrapped module the file has no tensors for (LoraLayer.update_layer): "zero" (B = 0,
    a no-op: true, "gaussian", "eva"), "random" (false / null: nn.Linear's init for A and B), or None for the
    inits that start from the base weight and may rewrite it (pissa, olora, corda, loftq, ...) and unknown ones."""
    if init is True or init == "eva" or (isinstance(init, str) and init.lower() == "gaussian"):
        return "zero"
    if init is False or init is None:
        return "random"
    return None


def _check_number(value: Any, what: str, path: Path, *, positive_int: bool = False) -> float:
    _refuse(isinstance(value, bool) or not isinstance(value, (int, float)), path,
            f"{what} must be a number, got {str(value)[:80]!r}")
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    _refuse(not finite, path, f"{what} must be finite, got {str(value)[:40]}")
    _refuse(positive_int and (not float(value).is_integer() or value <= 0), path,
            f"{what} must be a positive int, got {value!r}")
    return value


def read_peft(directory: str | Path, *, targets: dict[str, tuple[int, int]] | None = None,
              model_targets: dict[str, tuple[int, int]] | None = None, max_rank: int | None = None) -> PeftAdapter:
    """Read and validate a PEFT LoRA directory for a model whose target modules are `targets`
    ({full name: (d_in, d_out)}; `model_targets` is an alias), applying exactly the tensors PEFT applies.

    PEFT's rules decide which modules the config wraps (target_modules, exclude_modules, layers_to_transform,
    layers_pattern: see `_TargetRule`); tensors of other modules are ignored, as PEFT ignores them (listed in
    `PeftAdapter.ignored`, never read). Refused with PeftFormatError (a ValueError naming the file and the problem)
    or FileNotFoundError, before anything is returned: files that are not UTF-8 JSON / valid safetensors, regexes
    that do not finish in time, keys without the `base_model.model.` prefix or with an adapter name in them (PEFT
    loads those only in some setups), configs PEFT refuses, DoRA, biases, modules_to_save, ranks above max_rank,
    wrapped modules the model (`targets`) does not serve, wrong shapes or dtypes, NaN/Inf. Names, shapes and
    dtypes are checked from the safetensors header before any tensor data is read.

    Without `targets` the model-side checks (modules present, shapes) are skipped and only the adapter's own
    consistency is checked: pass them whenever the adapter is applied to a model. max_rank None = no limit."""
    targets = targets if targets is not None else model_targets
    if targets is not None and not targets:
        raise ValueError("targets is empty: pass {module name: (d_in, d_out)} of the model, or None")
    if max_rank is None:
        max_rank = VLLM_RANKS[-1] * 1024  # effectively unbounded; r must still be a positive int
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {d} does not exist")
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not w_path.is_file():
        pickles = [p for p in PICKLE_NAMES if (d / p).is_file()]
        if pickles:
            raise PeftFormatError(d, f"only {pickles[0]} found; pickled weights are refused because loading a pickle "
                                     f"can run arbitrary code. Convert it where you trust it (load with torch, save "
                                     f"with safetensors.torch.save_file as {WEIGHTS_NAME})")
        raise FileNotFoundError(f"{w_path} is missing: not a PEFT LoRA directory")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: a PEFT adapter needs its config (r, lora_alpha, target_modules)")
    config = _read_config(cfg_path)

    # ---- config ----
    peft_type = str(config.get("peft_type", "LORA"))[:40].upper()
    _refuse(peft_type != "LORA", cfg_path, f"peft_type {peft_type!r} is not LORA; only LoRA adapters can be served")
    for k in ("r", "lora_alpha", "target_modules"):
        _refuse(k not in config, cfg_path, f"required field {k!r} is missing")
    r_default = int(_check_number(config["r"], "r", cfg_path, positive_int=True))
    _refuse(r_default > max_rank, cfg_path, f"r={r_default} exceeds the pool's max_rank={max_rank}; attach with a "
                                            f"larger max_rank")
    alpha_default = float(_check_number(config["lora_alpha"], "lora_alpha", cfg_path))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    _refuse(not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict), cfg_path,
            "rank_pattern and alpha_pattern must be objects")
    patterns = _Patterns(cfg_path)
    for what, table in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k, v in table.items():
            patterns.compile(rf"(.*\.)?({k})$", f"{what} key {k[:80]!r}")
            v = _check_number(v, f"{what}[{k[:80]!r}]", cfg_path, positive_int=what == "rank_pattern")
            _refuse(what == "rank_pattern" and int(v) > max_rank, cfg_path,
                    f"rank_pattern[{k[:80]!r}]={int(v)} exceeds the pool's max_rank={max_rank}")
    _refuse(bool(config.get("use_dora")), cfg_path, "DoRA adapters (use_dora) are not supported: their magnitude "
                                                    "vector rescales the base weight, which a LoRA slot cannot express")
    _refuse(config.get("bias", "none") not in (None, "none"), cfg_path,
            f"bias={str(config.get('bias'))[:40]!r} trains the base model's biases, which a LoRA slot cannot apply; "
            f"only bias='none' adapters are supported")
    _refuse(bool(config.get("lora_bias")), cfg_path, "lora_bias adds a bias to lora_B, which is not supported")
    _refuse(bool(config.get("modules_to_save")), cfg_path,
            f"modules_to_save={str(config.get('modules_to_save'))[:80]} replaces whole modules, which a LoRA slot "
            f"cannot apply")
    for k in ("layer_replication", "target_parameters", "trainable_token_indices"):
        _refuse(bool(config.get(k)), cfg_path, f"{k} is not supported")
    init = config.get("init_lora_weights", True)
    _refuse(_init_kind(init) is None, cfg_path,
            f"init_lora_weights={str(init)[:40]!r} initialises from the base weight (and may rewrite it) when PEFT "
            f"loads the adapter; convert it to a plain LoRA first (PEFT: save_pretrained with "
            f"path_initial_model_for_weight_conversion)")
    use_rslora = bool(config.get("use_rslora"))
    rule = _TargetRule(config, cfg_path, patterns)
    tm = config["target_modules"]
    names_all = list(targets or {})
    if targets is not None:
        if isinstance(tm, list):
            absent = [t for t in tm if not any(matches_type(n, t) for n in names_all)]
            _refuse(bool(absent), cfg_path, f"target_modules {absent} are not among the modules served for this model "
                                            f"(types {sorted({n.rsplit('.', 1)[-1] for n in names_all})}); attach with "
                                            f"those target_modules or use an adapter made for this model")
        wrapped = [n for n in names_all if rule(n)]
        if not wrapped:
            if rule.regex is not None and not rule.exclude:
                raise PeftFormatError(cfg_path, f"target_modules regex {tm!r} matches no module of the model")
            raise PeftFormatError(cfg_path, "target_modules, exclude_modules, layers_to_transform and layers_pattern "
                                            "together select none of the modules served for this model (PEFT refuses "
                                            "such an adapter too)")
    else:
        wrapped = []

    # ---- weights: names, shapes and dtypes from the header, before any data is read ----
    h = _read_header(w_path)
    _refuse(not h.tensors, w_path, "holds no tensors")
    applied: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key in sorted(h.tensors):
        _refuse(len(key) > MAX_NAME_CHARS, w_path, f"tensor name of {len(key):,} characters ({key[:60]!r}...) is not "
                                                   f"a module's weight")
        what = ("a DoRA magnitude vector" if "lora_magnitude_vector" in key else
                "an embedding LoRA" if "lora_embedding" in key else "not a lora_A/lora_B weight")
        if not key.startswith(PREFIX):
            if _KEY_RE.match(key) is None and _NAMED_KEY_RE.match(key) is None:
                raise PeftFormatError(w_path, f"tensor {key!r} is {what}; it cannot be applied by a LoRA slot")
            raise PeftFormatError(w_path, f"tensor {key!r} lacks the {PREFIX!r} prefix: PeftModel.from_pretrained "
                                          f"ignores such keys (it would load the adapter without them) while "
                                          f"transformers' load_adapter applies them; save every key as "
                                          f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        name = key[len(PREFIX):]
        m = _KEY_RE.match(name)
        if m is None:
            named = _NAMED_KEY_RE.match(name)
            if named is not None:
                raise PeftFormatError(w_path, f"tensor {key!r} carries an adapter name ({named['adapter']!r}): PEFT "
                                              f"loads it only into an adapter of that name; save it as "
                                              f"'{PREFIX}{named['name']}.{named['which']}.weight'")
            raise PeftFormatError(w_path, f"tensor {key!r} is {what}; it cannot be applied by a LoRA slot")
        module = m.group("name")
        if not rule(module):
            ignored.append(key)
        elif targets is not None and module not in targets:
            unknown.append(module)
        else:
            applied.setdefault(module, {})[m.group("which")] = key
    if unknown:
        unknown = list(dict.fromkeys(unknown))
        raise PeftFormatError(w_path, f"modules {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not served for "
                                      f"this model (e.g. {names_all[0]!r}); the adapter was made for another model or "
                                      f"other target_modules, and would silently not apply")
    _refuse(not applied, w_path, f"holds no tensors of the modules its config wraps ({len(ignored)} ignored, e.g. "
                                 f"{ignored[0] if ignored else ''!r}); PEFT would load it as a no-op")
    missing = [n for n in wrapped if n not in applied]
    _refuse(bool(missing) and _init_kind(init) == "random", w_path,
            f"modules {missing[:4]} are wrapped by the config but have no tensors, and init_lora_weights={init!r} "
            f"makes PEFT initialise them randomly")
    ranks: dict[str, int] = {}
    for name, ab in applied.items():
        _refuse(set(ab) != {"lora_A", "lora_B"}, w_path,
                f"module {name!r} has {sorted(ab)} but needs lora_A and lora_B")
        ia, ib = h.tensors[ab["lora_A"]], h.tensors[ab["lora_B"]]
        _refuse(len(ia.shape) != 2 or len(ib.shape) != 2, w_path, f"module {name!r} weights must be 2-D")
        d_in, d_out = targets[name] if targets is not None else (ia.shape[1], ib.shape[0])
        r = int(_pattern_value(patterns, rank_pattern, name, r_default, "rank_pattern"))
        _refuse(ia.shape != (r, d_in) or ib.shape != (d_out, r), w_path,
                f"module {name!r} needs lora_A [{r}, {d_in}] and lora_B [{d_out}, {r}] (r from the config), "
                f"got {ia.shape} and {ib.shape}")
        _refuse(ia.dtype not in _ST_FLOATS or ib.dtype not in _ST_FLOATS, w_path,
                f"module {name!r} weights must be float (F16, BF16, F32 or F64), got {ia.dtype} and {ib.dtype}")
        ranks[name] = r
    _check_data_size(w_path, h)

    # ---- data: only the tensors that are applied ----
    hasher = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    loaded: dict[str, torch.Tensor] = {}
    try:
        with open(w_path, "rb") as fh:
            for key in sorted(k for ab in applied.values() for k in ab.values()):
                t = _read_tensor(fh, w_path, h, key)
                loaded[key] = t
                hasher.update(key.encode())
                hasher.update(str(t.dtype).encode())
                hasher.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    except OSError as exc:
        raise PeftFormatError(w_path, f"cannot be read ({exc.strerror or exc})") from None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in applied.items():
        a, b = loaded[ab["lora_A"]], loaded[ab["lora_B"]]
        _refuse(not (torch.isfinite(a).all() and torch.isfinite(b).all()), w_path,
                f"module {name!r} holds NaN or Inf values")
        r = ranks[name]
        alpha = float(_pattern_value(patterns, alpha_pattern, name, alpha_default, "alpha_pattern"))
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        raw[name] = (a, b, scale)
        scaled = (b.to(torch.float32) * scale).to(b.dtype) if b.dtype != torch.float64 else b * scale
        _refuse(not torch.isfinite(scaled).all(), w_path,
                f"module {name!r}: lora_B times lora_alpha / r = {scale:g} overflows {b.dtype} (found by the fuzz run)")
        modules[name] = (a, scaled)
    rank = max(a.shape[0] for a, _, _ in raw.values())
    return PeftAdapter(modules=modules, raw=raw, rank=int(rank), key="peft:" + hasher.hexdigest(), config=config,
                       source=str(d), ignored=ignored)


_VLLM_KEY_RE = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>A|B)\.weight$")


def vllm_problems(directory: str | Path) -> list[str]:
    """What vLLM's LoRA loader would refuse in a PEFT directory (empty list = none found).

    Mirrors the checks vLLM applies (its PEFTHelper and weight-name parsing): safetensors weights, rank in
    VLLM_RANKS (so a server's max_lora_rank can equal it), numeric lora_alpha, bias 'none', no DoRA, no
    modules_to_save, keys `base_model.model.<module>.lora_A|lora_B.weight` only, A [r, d_in] / B [d_out, r].
    Reads only the config and the safetensors header; an unreadable file is reported as a problem."""
    d = Path(directory)
    problems: list[str] = []
    if not (d / WEIGHTS_NAME).is_file():
        return [f"{WEIGHTS_NAME} is missing"]
    try:
        cfg = _read_config(d / CONFIG_NAME)
    except PeftFormatError as exc:
        return [f"{CONFIG_NAME} unreadable: {exc.problem}"]
    r = cfg.get("r")
    if isinstance(r, bool) or r not in VLLM_RANKS:
        problems.append(f"r={r!r} is not one of vLLM's ranks {VLLM_RANKS}")
    if isinstance(cfg.get("lora_alpha"), bool) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        problems.append(f"lora_alpha={cfg.get('lora_alpha')!r} is not a number")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (vLLM needs 'none' unless bias is enabled server-side)")
    if cfg.get("use_dora"):
        problems.append("use_dora=true (DoRA is not supported by vLLM)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save={cfg.get('modules_to_save')!r}")
    if not cfg.get("target_modules"):
        problems.append("target_modules is empty")
    try:
        h = _read_header(d / WEIGHTS_NAME)
        _check_data_size(d / WEIGHTS_NAME, h)
    except PeftFormatError as exc:
        return problems + [f"{WEIGHTS_NAME} unreadable: {exc.problem}"]
    seen: dict[str, set[str]] = {}
    for key, info in h.tensors.items():
        m = _VLLM_KEY_RE.match(key)
        if m is None:
            problems.append(f"tensor {key!r} is not base_model.model.<module>.lora_A|lora_B.weight")
            continue
        shape = info.shape
        seen.setdefault(m.group("name"), set()).add(m.group("which"))
        if len(shape) != 2 or (m.group("which") == "A" and shape[0] != r) or (m.group("which") == "B" and shape[1] != r):
            problems.append(f"tensor {key!r} has shape {shape}, not lora_A [r={r}, d_in] / lora_B [d_out, r={r}]")
    problems += [f"module {n!r} lacks lora_{'B' if ab == {'A'} else 'A'}" for n, ab in seen.items() if ab != {"A", "B"}]
    return problems
