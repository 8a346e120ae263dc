"""Positional encodings: sinusoidal, learned, and rotary (RoPE)."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "RotaryEmbedding"]


def _check_positions(positions: Tensor, x: Tensor, max_seq_len: int) -> Tensor:
    """Per-token positions (B, T) for x (B, T, C): integers in [0, max_seq_len)."""
    if positions.shape != x.shape[:-1] or positions.dtype not in (torch.long, torch.int32):
        raise ValueError(f"per-token positions must be an integer tensor of shape {tuple(x.shape[:-1])}, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= max_seq_len):
        raise ValueError(f"positions must be in [0, max_seq_len={max_seq_len}), got {int(positions.min())}.."
                         f"{int(positions.max())}")
    return positions


def _check_length(T: int, offset: int, max_seq_len: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + T > max_seq_len:
        raise ValueError(
            f"sequence length {T} (offset {offset}) exceeds max_seq_len={max_seq_len}"
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sin/cos encoding (Vaswani et al.), added to the input.

    ``PE[pos, 2i] = sin(pos / base**(2i/d))``, ``PE[pos, 2i+1] = cos(pos / base**(2i/d))``.
    The table is a non-persistent buffer (not in the ``state_dict``).

    forward(x: (B, T, C), offset=0) -> x + PE[offset:offset+T]
    """

    def __init__(self, d_model: int, max_seq_len: int = 2048, base: float = 10000.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if d_model < 1 or max_seq_len < 1:
            raise ValueError("d_model and max_seq_len must be >= 1")
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.base = float(base)
        self.register_buffer("pe", torch.empty(max_seq_len, d_model, device=device, dtype=dtype),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        pos = torch.arange(self.max_seq_len, dtype=torch.float64).unsqueeze(1)
        i2 = torch.arange(0, self.d_model, 2, dtype=torch.float64)
        freq = torch.exp(-math.log(self.base) * i2 / self.d_model)
        pe = torch.zeros(self.max_seq_len, self.d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : self.d_model // 2]
        if self.pe.device.type != "meta":
            with torch.no_grad():
                self.pe.copy_(pe)

    def forward(self, x: Tensor, offset: Union[int, Tensor] = 0) -> Tensor:
        """``offset``: the first token's position, or a (B, T) LongTensor of every token's own position
        (rows of a ragged batch)."""
        if isinstance(offset, Tensor):
            return x + self.pe[_check_positions(offset, x, self.max_seq_len)].to(x.dtype)
        T = x.shape[-2]
        _check_length(T, offset, self.max_seq_len)
        return x + self.pe[offset:offset + T].to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_seq_len={self.max_seq_len}, base={self.base}"


class LearnedPositionalEncoding(nn.Module):
    """A learned embedding per position, added to the input.

    forward(x: (B, T, C), offset=0) -> x + weight[offset:offset+T]
    """

    def __init__(self, d_model: int, max_seq_len: int = 2048, init_std: float = 0.02,
                 device=None, dtype=None) -> None:
        super().__init__()
        if d_model < 1 or max_seq_len < 1:
            raise ValueError("d_model and max_seq_len must be >= 1")
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: Tensor, offset: Union[int, Tensor] = 0) -> Tensor:
        """``offset``: the first token's position, or a (B, T) LongTensor of every token's own position
        (rows of a ragged batch)."""
        if isinstance(offset, Tensor):
            return x + self.weight[_check_positions(offset, x, self.max_seq_len)]
        T = x.shape[-2]
        _check_length(T, offset, self.max_seq_len)
        return x + self.weight[offset:offset + T]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_seq_len={self.max_seq_len}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.), "rotate half" (GPT-NeoX) convention.

    Applied to queries and keys of shape ``(B, T, H, D)`` (flash-attn layout): the pair
    ``(x[..., i], x[..., i + D/2])`` at position p is rotated by the angle ``p * base**(-2i/D)``.
    cos/sin are computed in float32 (float64 for float64 inputs) on the fly (no length limit, no recompiles).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None, dtype=None) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def reset_parameters(self) -> None:
        """No state: frequencies are recomputed in the working precision (immune to ``.to(bf16)``)."""

    def cos_sin(self, T: int, device, offset: Union[int, Tensor] = 0, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """(T, 1, D) cos and sin (float32, or float64) for positions offset .. offset+T-1; with ``offset`` a
        (B, T) tensor of positions, (B, T, 1, D) for those positions."""
        if isinstance(offset, Tensor):
            pos = offset.to(device=device, dtype=dtype)
        else:
            pos = torch.arange(offset, offset + T, device=device, dtype=dtype)
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=dtype) / self.head_dim)
        ang = pos.unsqueeze(-1) * inv_freq
        ang = torch.cat([ang, ang], dim=-1).unsqueeze(-2)
        return ang.cos(), ang.sin()

    def forward(self, x: Tensor, offset: Union[int, Tensor] = 0) -> Tensor:
        """Rotate ``x`` of shape (..., T, H, D); returns a new tensor in x's dtype. ``offset``: the first
        token's position, or a (B, T) LongTensor of every token's own position (x (B, T, H, D))."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x has head dim {x.shape[-1]}, expected {self.head_dim}")
        T = x.shape[-3]
        if isinstance(offset, Tensor) and (offset.dim() != 2 or x.dim() != 4 or offset.shape != x.shape[:2]):
            raise ValueError(f"per-token positions must be (B, T) = {tuple(x.shape[:2])} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(offset.shape)}")
        ct = torch.promote_types(x.dtype, torch.float32)  # 16-bit inputs computed in fp32
        cos, sin = self.cos_sin(T, x.device, offset, ct)
        xf = x.to(ct)
        half = self.head_dim // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        rot = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rot * sin).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
