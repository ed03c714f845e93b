"""hyperlora: policy text -> LoRA adapter by a hypernetwork, many adapters served in one forward pass.

Public names are imported lazily so that `import hyperlora` stays cheap (no transformers import) and
`hyperlora info` works even where an optional dependency is missing.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ops": ("hyperlora.ops", None),
    "PolicyEncoder": ("hyperlora.hypernets.t2l.minilm", "PolicyEncoder"),
    "HyperNetwork": ("hyperlora.hypernets.t2l.hypernet", "HyperNetwork"),
    "HyperNetworkConfig": ("hyperlora.hypernets.t2l.hypernet", "HyperNetworkConfig"),
    "AdapterPool": ("hyperlora.adapters.pool", "AdapterPool"),
    "PoolFullError": ("hyperlora.adapters.pool", "PoolFullError"),
    "attach": ("hyperlora.runtime.runtime", "attach"),
    "Runtime": ("hyperlora.runtime.runtime", "Runtime"),
    "decide": ("hyperlora.decisions.decide", "decide"),
    "Decision": ("hyperlora.decisions.decide", "Decision"),
    "Calibrator": ("hyperlora.decisions.calibration", "Calibrator"),
    "BackendUnavailableError": ("hyperlora.ops.backends", "BackendUnavailableError"),
    "available_backends": ("hyperlora.ops.backends", "available_backends"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'hyperlora' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
