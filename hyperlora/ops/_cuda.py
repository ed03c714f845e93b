"""Thin glue to the CUDA extension: dtype codes, pointers and the current stream of torch tensors."""
from __future__ import annotations

import torch

from hyperlora.ops.backends import cuda_status, BackendUnavailableError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common.h: DType


def extension():
    """The imported hyperlora._C module, or BackendUnavailableError saying why it cannot be used."""
    status = cuda_status()
    if not status["built"]:
        raise BackendUnavailableError(status["reason"])
    from hyperlora import _C  # type: ignore[attr-defined]  # optional: the compiled CUDA extension

    return _C


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(f"the CUDA backend supports float32, float16 and bfloat16, not {t.dtype}") from None


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on `device`, as an int."""
    return int(torch.cuda.current_stream(device).cuda_stream)
