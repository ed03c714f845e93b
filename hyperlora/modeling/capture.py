"""Capturing what modules of a model receive: the one copy of the forward-hook input capture.

    with InputCapture(model, {"o_proj": "model.layers.29.self_attn.o_proj"}) as inputs:
        model.model(ids)
        x = inputs["o_proj"]          # that module's input [B, T, d_in] in the last forward (detached)

or, where a `with` block does not fit, `cap = InputCapture(...)`; ...; `cap.remove()` (in a `finally`).
Each forward of a captured module overwrites its entry; the hooks are removed on exit, also on an error.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["InputCapture"]


class InputCapture:
    """Forward hooks storing the first positional input of named modules of `model`, detached.

    `names`: key -> full module name (e.g. {"x": "model.layers.29.mlp.down_proj"}); `inputs[key]` holds that
    module's latest input. Raises ValueError naming any name that is not a module of `model` (then no hook
    is registered).
    """

    def __init__(self, model: nn.Module, names: Mapping[str, str]):
        mods = dict(model.named_modules())
        missing = [n for n in names.values() if n not in mods]
        if missing:
            raise ValueError(f"cannot capture the inputs of {missing}: not modules of this {type(model).__name__}")
        self.inputs: dict[str, torch.Tensor] = {}
        self._hooks = [mods[n].register_forward_hook(self._hook(key)) for key, n in names.items()]

    def _hook(self, key: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.inputs[key] = args[0].detach()
        return hook

    def remove(self) -> None:
        """Remove the hooks (idempotent); `inputs` keeps what was captured."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.inputs

    def __exit__(self, *exc: Any) -> None:
        self.remove()
