"""Finding and loading hypernetwork checkpoints (the shipped ones live in ``hyperlora/checkpoints/``, data only).

`load(model, tokenizer)` returns the shipped hypernetwork for the embedded default model (the policy reader, see
``checkpoints/default.json``) and its policy encoder (None for the reader), ready for
`hyperlora.attach(model, hypernet, encoder=encode)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from hyperlora.hypernets.reader.reader import ReaderHypernet, is_reader_dir
from hyperlora.hypernets.t2l.hypernet import HyperNetwork
from hyperlora.hypernets.t2l.text_encoders import load_policy_encoder

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
_HN_CONFIG = "config.json"


def find_hypernet_dir(path: str | Path | None = None) -> Path | None:
    """A hypernetwork directory: ``path`` itself, or (default) the shipped ``hyperlora/checkpoints/``.

    Without ``path``, ``hyperlora/checkpoints/default.json`` (``{"default": "<subdirectory>"}``) names the
    shipped default. A directory qualifies if it holds ``config.json`` + safetensors weights; otherwise its subdirectories
    are searched (a directory named ``final`` first, then newest first) so ``checkpoints/<name>/`` and
    ``runs/<name>/final`` layouts work. None if nothing is found.
    """
    root = Path(path) if path is not None else SHIPPED_DIR
    default_file = SHIPPED_DIR / "default.json"
    if path is None and default_file.is_file():  # the shipped default, named explicitly
        root = SHIPPED_DIR / str(json.loads(default_file.read_text())["default"])
    if not root.is_dir():
        if path is not None:
            raise FileNotFoundError(f"hypernetwork directory {str(root)!r} does not exist")
        return None

    def ok(d: Path) -> bool:
        return (d / _HN_CONFIG).is_file() and any(d.glob("*.safetensors")) and "rank" in (d / _HN_CONFIG).read_text()

    if ok(root):
        return root
    # `hyperlora train` writes <out>/final; prefer it over intermediate checkpoints, then the newest
    subs = sorted((d for d in root.rglob("*") if d.is_dir() and ok(d)),
                  key=lambda d: (d.name == "final", d.stat().st_mtime), reverse=True)
    if subs:
        return subs[0]
    if path is not None:
        raise FileNotFoundError(f"{str(root)!r} holds no hypernetwork (config.json + *.safetensors)")
    return None


def load_hypernet(directory: str | Path, model: nn.Module, tokenizer: Any) -> tuple[Any, Callable[[list[str]], Any] | None]:
    """(hypernet, encode) from one checkpoint directory: a ``ReaderHypernet`` with ``encode=None`` for a policy
    reader (it reads the texts itself), else a T2L-style ``HyperNetwork`` with the policy encoder it was trained
    with (texts -> [P, E])."""
    d = Path(directory)
    if is_reader_dir(d):
        return ReaderHypernet.from_dir(d, model, tokenizer), None
    hn = HyperNetwork.from_pretrained(d, model=model).float()
    return hn, load_policy_encoder(d, model, tokenizer).encode


def default_dir() -> Path | None:
    """The shipped hypernetwork's directory (None if this install carries none)."""
    return find_hypernet_dir(None)


def load(model: Any, tokenizer: Any, path: str | Path | None = None) -> tuple[Any, Callable[[list[str]], Any] | None]:
    """(hypernet, encode) for `hyperlora.attach(model, hypernet, encoder=encode)` from ``path`` (default: the
    shipped checkpoint named in ``checkpoints/default.json``, the policy reader). Raises FileNotFoundError if
    there is none."""
    directory = find_hypernet_dir(path)
    if directory is None:
        raise FileNotFoundError("no hypernetwork checkpoint is shipped in hyperlora/checkpoints/; train one with "
                                "`hyperlora train --config hyperlora/training/configs/cpu.json`")
    return load_hypernet(directory, model, tokenizer)
