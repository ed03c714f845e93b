"""What every benchmark records about the machine it ran on (results are only comparable on the same one)."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(device: torch.device | str | None = None) -> dict:
    """Platform, versions, threads, CPU model, 1-minute load average (shared machines skew CPU timings)
    and, for a CUDA device, the GPU's name and Triton's version."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu_model()}
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" or dev is None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info
