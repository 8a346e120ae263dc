"""Input validation shared by the four ops: every error names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"a {t.dim()}-d tensor of shape {tuple(t.shape)}"


def tensor(name: str, t, shape_doc: str, ndims: tuple[int, ...]) -> torch.Tensor:
    """``t`` must be a floating-point tensor with one of ``ndims`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}, got {_describe(t)}")
    return t


def same_shape(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    ref = tensors[0].shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape != ref:
            raise ValueError(f"{n} must have the shape of {names[0]} {tuple(ref)}, got {tuple(t.shape)}")


def same_dtype(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    ref = tensors[0].dtype
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != ref:
            raise TypeError(f"{n} must have the dtype of {names[0]} ({ref}), got {t.dtype}")


def same_device(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    ref = tensors[0].device
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != ref:
            raise ValueError(f"{n} must be on the device of {names[0]} ({ref}), got {t.device}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def scale(value, head_dim: int) -> float:
    """None → head_dim ** -0.5; otherwise a finite real number."""
    if value is None:
        return head_dim ** -0.5
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def key_padding_mask(mask, B: int, T: int, device: torch.device):
    """None, or a (B, T) bool tensor on ``device`` (True = padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, T) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on the inputs' device ({device}), got {mask.device}")
    return mask


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
