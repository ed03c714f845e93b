"""PEFT interchange: write LoRA adapters as PEFT directories, and read + validate PEFT directories.

A PEFT LoRA directory is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module name>.lora_A.weight` [r, d_in] and `...lora_B.weight` [d_out, r]; the layer computes
`y += (alpha / r) * B A x` (`alpha / sqrt(r)` with rsLoRA). GPT-2's Conv1D layers use the same A/B shapes
(PEFT sets fan_in_fan_out for them; only the base weight is transposed).

Export writes what `peft.PeftModel.from_pretrained` loads and what vLLM accepts: a rank among vLLM's
allowed sizes (an adapter of another rank is zero-padded to the next one, alpha scaled to keep alpha / r),
no bias, no DoRA, no modules_to_save. Import refuses anything it cannot apply exactly, with a message that
says why: pickled weights (a .bin can run arbitrary code when loaded), DoRA, trained biases,
modules_to_save, ranks above the pool's, modules the model does not have, wrong shapes, NaN/Inf.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.modeling.targets import linear_shape, matches_type

__all__ = ["VLLM_RANKS", "PeftAdapter", "export_peft", "write_peft", "export_policy", "read_peft", "vllm_problems"]

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
    key: sha256 of the config and tensors (a content key for the pool); config: adapter_config.json.
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    raw: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int
    key: str
    config: dict[str, Any] = field(repr=False)
    source: str = ""


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
    return any(type(mods.get(n)).__name__ == "Conv1D" for n in names)


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
                base_model: nn.Module | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `adapters` ({full module name: (A [r_m, d_in], B [d_out, r_m])}, scale NOT applied) as a PEFT
    LoRA directory with PEFT scale alpha / rank. Modules with r_m < rank, and a rank outside VLLM_RANKS, are
    zero-padded (alpha scaled to keep alpha / rank): the adapter's function is unchanged.

    target_modules: default the modules' short names (full names if those would also match other layers of
    `base_model`). base_model (optional nn.Module): detects GPT-2 Conv1D (fan_in_fan_out) and the model's
    name_or_path. dtype: saved dtype (default: A's). Returns the directory.
    """
    from safetensors.torch import save_file

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
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return d


def write_peft(directory: str | Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int,
               lora_alpha: float, base_model: nn.Module | None = None, **kw: Any) -> Path:
    """`export_peft` with the argument order the runtime uses (modules' B already scaled: lora_alpha = rank)."""
    return export_peft(modules, directory, rank=rank, alpha=lora_alpha, base_model=base_model, **kw)


def export_policy(hypernet: Any, task_emb: torch.Tensor, directory: str | Path, *,
                  base_model: nn.Module | None = None) -> Path:
    """Generate one policy's adapter with `hypernet` (task_emb [1, E]) and write it as a PEFT directory
    (rank = hypernet rank, lora_alpha = the hypernetwork's alpha, so PEFT's scale equals the pool's)."""
    if task_emb.dim() == 2 and task_emb.shape[0] != 1:
        raise ValueError(f"export_policy exports one policy: task_emb must be [1, E], got {tuple(task_emb.shape)}")
    with torch.no_grad():
        modules = hypernet.adapters(task_emb)[0]
    cfg = hypernet.config
    return export_peft({n: (a.float(), b.float()) for n, (a, b) in modules.items()}, directory, rank=int(cfg.rank),
                       alpha=float(cfg.lora_alpha), base_model=base_model,
                       base_model_name_or_path=cfg.base_model_name_or_path)


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^(?P<name>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches if it matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_number(value: Any, what: str, *, positive_int: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"adapter_config.json: {what} must be a number, got {value!r}")
    if positive_int and (not float(value).is_integer() or value <= 0):
        raise ValueError(f"adapter_config.json: {what} must be a positive int, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"adapter_config.json: {what} must be finite, got {value!r}")
    return value


def _refuse(cond: bool, why: str) -> None:
    if cond:
        raise ValueError(why)


def read_peft(directory: str | Path, *, targets: dict[str, tuple[int, int]] | None = None,
              model_targets: dict[str, tuple[int, int]] | None = None, max_rank: int | None = None) -> PeftAdapter:
    """Read and validate a PEFT LoRA directory for a model whose target modules are `targets`
    ({full name: (d_in, d_out)}; `model_targets` is an alias). Every check runs before anything is returned;
    failures raise ValueError / FileNotFoundError saying what is wrong and, where there is one, the fix.

    Without `targets` the model-side checks (modules present, shapes) are skipped and only the adapter's own
    consistency is checked: pass them whenever the adapter is applied to a model. max_rank None = no limit."""
    from safetensors import safe_open

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
            raise ValueError(f"{d}: only {pickles[0]} found; pickled weights are refused because loading a pickle can "
                             f"run arbitrary code. Convert it where you trust it (load with torch, save with "
                             f"safetensors.torch.save_file as {WEIGHTS_NAME})")
        raise FileNotFoundError(f"{w_path} is missing: not a PEFT LoRA directory")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: a PEFT adapter needs its config (r, lora_alpha, target_modules)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")

    # ---- config ----
    peft_type = str(config.get("peft_type", "LORA")).upper()
    _refuse(peft_type != "LORA", f"{cfg_path}: peft_type {peft_type!r} is not LORA; only LoRA adapters can be served")
    for k in ("r", "lora_alpha", "target_modules"):
        _refuse(k not in config, f"{cfg_path}: required field {k!r} is missing")
    r_default = int(_check_number(config["r"], "r", positive_int=True))
    _refuse(r_default > max_rank, f"{cfg_path}: r={r_default} exceeds the pool's max_rank={max_rank}; attach with a "
                                  f"larger max_rank")
    alpha_default = float(_check_number(config["lora_alpha"], "lora_alpha"))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    _refuse(not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict),
            f"{cfg_path}: rank_pattern and alpha_pattern must be objects")
    for k, v in rank_pattern.items():
        v = int(_check_number(v, f"rank_pattern[{k!r}]", positive_int=True))
        _refuse(v > max_rank, f"{cfg_path}: rank_pattern[{k!r}]={v} exceeds the pool's max_rank={max_rank}")
    for k, v in alpha_pattern.items():
        _check_number(v, f"alpha_pattern[{k!r}]")
    _refuse(bool(config.get("use_dora")), f"{cfg_path}: DoRA adapters (use_dora) are not supported: their magnitude "
                                          f"vector rescales the base weight, which a LoRA slot cannot express")
    _refuse(config.get("bias", "none") not in (None, "none"),
            f"{cfg_path}: bias={config.get('bias')!r} trains the base model's biases, which a LoRA slot cannot apply; "
            f"only bias='none' adapters are supported")
    _refuse(bool(config.get("lora_bias")), f"{cfg_path}: lora_bias adds a bias to lora_B, which is not supported")
    _refuse(bool(config.get("modules_to_save")),
            f"{cfg_path}: modules_to_save={config.get('modules_to_save')} replaces whole modules, which a LoRA slot "
            f"cannot apply")
    for k in ("layer_replication", "target_parameters", "trainable_token_indices"):
        _refuse(bool(config.get(k)), f"{cfg_path}: {k} is not supported")
    use_rslora = bool(config.get("use_rslora"))
    tm = config["target_modules"]
    names_all = list(targets or {})
    if targets is None:
        _refuse(not (isinstance(tm, str) and tm) and not (isinstance(tm, (list, tuple)) and tm),
                f"{cfg_path}: target_modules must be a non-empty list or a regex string, got {tm!r}")
    elif isinstance(tm, str):
        _refuse(not any(re.fullmatch(tm, n) for n in names_all),
                f"{cfg_path}: target_modules regex {tm!r} matches no module of the model")
    elif isinstance(tm, (list, tuple)) and tm:
        absent = [t for t in tm if not any(matches_type(n, str(t)) for n in names_all)]
        _refuse(bool(absent), f"{cfg_path}: target_modules {absent} are not among the modules served for this model "
                              f"(types {sorted({n.rsplit('.', 1)[-1] for n in names_all})}); attach with those "
                              f"target_modules or use an adapter made for this model")
    else:
        raise ValueError(f"{cfg_path}: target_modules must be a non-empty list or a regex string, got {tm!r}")

    # ---- weights ----
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    hasher = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    with safe_open(str(w_path), framework="pt") as f:
        keys = sorted(f.keys())
        _refuse(not keys, f"{w_path} holds no tensors")
        for key in keys:
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _KEY_RE.match(name)
            if m is None:
                what = ("a DoRA magnitude vector" if "lora_magnitude_vector" in key else
                        "an embedding LoRA" if "lora_embedding" in key else "not a lora_A/lora_B weight")
                raise ValueError(f"{w_path}: tensor {key!r} is {what}; it cannot be applied by a LoRA slot")
            t = f.get_tensor(key)
            pairs.setdefault(m.group("name"), {})[m.group("which")] = t
            hasher.update(key.encode())
            hasher.update(str(t.dtype).encode())
            hasher.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    unknown = [n for n in pairs if targets is not None and n not in targets]
    if unknown:
        raise ValueError(f"{w_path}: modules {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not served for "
                         f"this model (e.g. {names_all[0]!r}); the adapter was made for another model or other "
                         f"target_modules, and would silently not apply")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    raw: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, ab in pairs.items():
        _refuse(set(ab) != {"lora_A", "lora_B"}, f"{w_path}: module {name!r} has {sorted(ab)} but needs lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        _refuse(a.dim() != 2 or b.dim() != 2, f"{w_path}: module {name!r} weights must be 2-D")
        d_in, d_out = targets[name] if targets is not None else (a.shape[1], b.shape[0])
        r = int(_pattern_value(rank_pattern, name, r_default))
        _refuse(tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r),
                f"{w_path}: module {name!r} needs lora_A [{r}, {d_in}] and lora_B [{d_out}, {r}] (r from the config), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}")
        _refuse(not a.is_floating_point() or not b.is_floating_point(), f"{w_path}: module {name!r} weights must be float")
        _refuse(not (torch.isfinite(a).all() and torch.isfinite(b).all()),
                f"{w_path}: module {name!r} holds NaN or Inf values")
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        raw[name] = (a, b, scale)
        modules[name] = (a, (b.to(torch.float32) * scale).to(b.dtype) if b.dtype != torch.float64 else b * scale)
    rank = max(a.shape[0] for a, _, _ in raw.values())
    return PeftAdapter(modules=modules, raw=raw, rank=int(rank), key="peft:" + hasher.hexdigest(), config=config,
                       source=str(d))


_VLLM_KEY_RE = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>A|B)\.weight$")


def vllm_problems(directory: str | Path) -> list[str]:
    """What vLLM's LoRA loader would refuse in a PEFT directory (empty list = none found).

    Mirrors the checks vLLM applies (its PEFTHelper and weight-name parsing): safetensors weights, rank in
    VLLM_RANKS (so a server's max_lora_rank can equal it), numeric lora_alpha, bias 'none', no DoRA, no
    modules_to_save, keys `base_model.model.<module>.lora_A|lora_B.weight` only, A [r, d_in] / B [d_out, r]."""
    from safetensors import safe_open

    d = Path(directory)
    problems: list[str] = []
    if not (d / WEIGHTS_NAME).is_file():
        return [f"{WEIGHTS_NAME} is missing"]
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{CONFIG_NAME} unreadable: {exc}"]
    r = cfg.get("r")
    if r not in VLLM_RANKS:
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
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        seen: dict[str, set[str]] = {}
        for key in f.keys():
            m = _VLLM_KEY_RE.match(key)
            if m is None:
                problems.append(f"tensor {key!r} is not base_model.model.<module>.lora_A|lora_B.weight")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            seen.setdefault(m.group("name"), set()).add(m.group("which"))
            if len(shape) != 2 or (m.group("which") == "A" and shape[0] != r) or (m.group("which") == "B" and shape[1] != r):
                problems.append(f"tensor {key!r} has shape {shape}, not lora_A [r={r}, d_in] / lora_B [d_out, r={r}]")
        problems += [f"module {n!r} lacks lora_{'B' if ab == {'A'} else 'A'}" for n, ab in seen.items() if ab != {"A", "B"}]
    return problems
