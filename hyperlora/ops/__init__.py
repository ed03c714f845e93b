"""Public, validated ops. Each dispatches to a torch reference, a Triton kernel or the CUDA extension.

- `add_lora`: many materialized LoRA adapters in one batch (SGMV-style), slot -1 = no adapter.
- `generate_lora`: hypernetwork head outputs written straight into adapter-pool slots.
- `latent_lora`: the fused path that applies generated adapters without materializing them.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "add_lora": ("hyperlora.ops.add_lora", "add_lora"),
    "LoraBatchMeta": ("hyperlora.ops.metadata", "LoraBatchMeta"),
    "generate_lora": ("hyperlora.ops.generate_lora", "generate_lora"),
    "latent_lora": ("hyperlora.ops.latent_lora", "latent_lora"),
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'hyperlora.ops' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
