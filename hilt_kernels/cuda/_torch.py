"""Torch-side helpers shared by the CUDA backend's op modules (dtype tags, stream, pointers)."""

from __future__ import annotations

import os

import torch

from . import _lib

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def tag(dtype: torch.dtype) -> int:
    try:
        return _TAGS[dtype]
    except KeyError:
        raise TypeError(f"the CUDA backend does not support dtype {dtype} (float32, float16, bfloat16)") from None


def ptr(t: torch.Tensor | None):
    """The data pointer (None = NULL) of a tensor."""
    return None if t is None else (t.data_ptr() or None)


def emulated() -> bool:
    """True under ``HILT_CUDA_EMULATOR=1``: the library is the CPU emulator build of csrc/ (tests/cuda/emulator)
    and the tensors are CPU tensors."""
    return os.environ.get("HILT_CUDA_EMULATOR", "") == "1"


def launch_ctx(t: torch.Tensor) -> tuple[int, int | None]:
    """(device index, current stream handle) for launching on ``t``'s device.

    Under the emulator (:func:`emulated`): (``$HILT_CUDA_EMULATOR_DEVICE`` or 0, stream 0); the CPU
    tensors' pointers are passed as they are."""
    if emulated():
        return int(os.environ.get("HILT_CUDA_EMULATOR_DEVICE", "0")), None
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return dev, torch.cuda.current_stream(t.device).cuda_stream or None


def mask_arg(key_padding_mask: torch.Tensor | None):
    """(uint8 zero-copy view of the bool mask, its int64 stride array) or (None, None)."""
    if key_padding_mask is None:
        return None, None
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    elif m.dtype != torch.uint8:
        m = (m != 0).view(torch.uint8)
    return m, _lib.strides(m)


def dtype_reasons(*named) -> list[str]:
    return [f"{name} dtype {t.dtype} is not supported by the CUDA backend (float32, float16, bfloat16)"
            for name, t in named if t is not None and t.dtype not in DTYPES]


def call(fn_name: str, *args) -> None:
    lib = _lib.get()
    rc = getattr(lib, fn_name)(*args)
    _lib.check(lib, rc, fn_name)
