"""Hypernetwork checkpoints shipped with the package (safetensors + JSON config + eval report).

`load(model, tokenizer)` returns the shipped hypernetwork for the embedded default model (the policy reader,
see ``default.json``) and its policy encoder (None for the reader), ready for
`hyperlora.attach(model, hypernet, encoder=encode)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

SHIPPED_DIR = Path(__file__).resolve().parent


def default_dir() -> Path | None:
    """The shipped hypernetwork's directory (None if this install carries none)."""
    from hyperlora.training.eval_adapters import find_hypernet_dir

    return find_hypernet_dir(None)


def load(model: Any, tokenizer: Any, path: str | Path | None = None) -> tuple[Any, Callable[[list[str]], Any]]:
    """(hypernet, encode) for `hyperlora.attach(model, hypernet, encoder=encode)` (default: the shipped checkpoint
    named in ``default.json``, the policy reader). A policy reader comes as a ``ReaderHypernet`` with
    ``encode=None`` (it reads the texts itself); a T2L-style ``HyperNetwork`` with the policy encoder it was
    trained with (texts -> [P, E]). Raises FileNotFoundError if there is none."""
    from hyperlora.training.eval_adapters import HypernetSource, find_hypernet_dir

    directory = find_hypernet_dir(path)
    if directory is None:
        raise FileNotFoundError("no hypernetwork checkpoint is shipped in hyperlora/checkpoints/; train one with "
                                "`hyperlora train --config hyperlora/training/configs/cpu.json`")
    src = HypernetSource.from_dir(directory, model, tokenizer)
    return src.hypernet, src.encode
