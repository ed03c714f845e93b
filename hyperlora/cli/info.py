"""`hyperlora info`: versions, GPU visibility and backend availability, for bug reports and slow runs."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Any

import hyperlora
from hyperlora.ops.backends import available_backends


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def collect() -> dict[str, Any]:
    """Everything `hyperlora info` reports, as a JSON-ready dict."""
    import torch

    from hyperlora.ops import _cpu_kernel

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "hyperlora": hyperlora.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "triton", "transformers", "peft", "safetensors", "numpy")},
        "gpu": {"visible": bool(gpus), "devices": gpus,
                "torch_cuda": getattr(torch.version, "cuda", None)},
        "backends": available_backends(),
        "cpu_kernel": _cpu_kernel.status(),
        "torch_threads": torch.get_num_threads(),
    }


def format_text(info: dict[str, Any]) -> str:
    lines = [f"hyperlora {info['hyperlora']}  (python {info['python']}, {info['platform']})", "versions:"]
    lines += [f"  {k:<13}{v or 'not installed'}" for k, v in info["versions"].items()]
    gpu = info["gpu"]
    lines.append(f"gpu: {', '.join(gpu['devices']) if gpu['visible'] else 'none visible'}"
                 f" (torch built for CUDA {gpu['torch_cuda'] or '-'})")
    lines.append("backends:")
    for name, st in info["backends"].items():
        state = "available" if st["available"] else "unavailable"
        extra = ""
        if name == "cuda":
            extra = f" built={st['built']}" + (f" archs={','.join('sm_' + a for a in st['archs'])}" if st["built"] else "")
        if name == "triton" and st.get("version"):
            extra = f" version={st['version']}" + (" (interpreter)" if st.get("interpreter") else "")
        lines.append(f"  {name:<7}{state}{extra}" + (f"  -- {st['reason']}" if st.get("reason") else ""))
    ck = info.get("cpu_kernel")
    if ck is not None:  # the torch backend's CPU kernel extension (hyperlora._cpu)
        lines.append("  cpu kernel (torch backend): " + (f"built, {ck['isa']}" if ck["built"] else
                                                          f"not built -- {ck['reason']}"))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
