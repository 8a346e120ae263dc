"""Reference backend of block_local_attention: vectorized PyTorch, no loop over tokens or blocks.

Two formulations, chosen per device (both checked against naive loops in the tests):

* ``fused CPU``: one call of ATen's CPU flash-attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp) on
  per-block views ``(B*nb, H, b, D)`` of the inputs, and its backward. This is the same kernel that
  ``F.scaled_dot_product_attention`` runs on CPU, so the reference costs what the best plain-torch
  formulation costs (the performance target of DESIGN.md).
* ``math``: batched matmuls over the blocks, ``(B, H, nb, b, b)`` scores, softmax in fp32 (fp64 for
  fp64). Used on CUDA/MPS and wherever the fused kernel is unavailable.

Neither builds a T×T matrix. T is padded to a multiple of the block size; the padded keys are masked.
The log-sum-exp is +inf for a query with no valid key (see BACKENDS.md), whose output is 0.
"""

from __future__ import annotations

import math

import torch

from ._common import compute_dtype, pad_dim

__all__ = ["forward", "backward", "use_fused_cpu"]

_FUSED_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Tests flip this to exercise the math formulation on CPU too.
FORCE_MATH = False


def use_fused_cpu(x: torch.Tensor) -> bool:
    """True when the fused CPU kernel serves this input (CPU tensor, ATen op present)."""
    return x.device.type == "cpu" and _FUSED_FWD is not None and _FUSED_BWD is not None and not FORCE_MATH


# ----------------------------------------------------------------------------- shared helpers
def _num_blocks(T: int, b: int) -> int:
    return -(-T // b)


def _block_view(x: torch.Tensor, b: int, nb: int) -> torch.Tensor:
    """(B, T, H, D) -> (B*nb, H, b, D), padding T to nb*b with zeros (a view when no pad is needed)."""
    B, T, H, D = x.shape
    x = pad_dim(x, 1, nb * b)
    return x.reshape(B * nb, b, H, D).transpose(1, 2)


def _unblock(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B*nb, H, b, D) -> contiguous (B, T, H, D)."""
    N, H, b, D = x.shape
    return x.transpose(1, 2).reshape(B, -1, H, D)[:, :T].contiguous() if N else x.new_empty(B, T, H, D)


def _key_valid(B: int, T: int, b: int, nb: int, kpm, device) -> torch.Tensor:
    """(B or 1, nb, b) bool: key exists (inside T) and is not padding."""
    inside = (torch.arange(nb * b, device=device) < T).view(1, nb, b)
    if kpm is None:
        return inside
    return inside & ~pad_dim(kpm, 1, nb * b, value=True).view(B, nb, b)


def _query_has_key(key_valid: torch.Tensor, causal: bool, T: int) -> torch.Tensor:
    """(B or 1, T) bool: the query sees at least one valid key."""
    n, nb, b = key_valid.shape
    if causal:
        seen = key_valid.to(torch.int32).cumsum(-1) > 0
    else:
        seen = key_valid.any(-1, keepdim=True).expand(n, nb, b)
    return seen.reshape(n, nb * b)[:, :T]


# ----------------------------------------------------------------------------- fused CPU path
def _additive_mask(key_valid, B, nb, b, dtype):
    mask = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    mask = mask.masked_fill(~key_valid, float("-inf"))
    return mask.expand(B, nb, b).reshape(B * nb, 1, 1, b)


def _needs_mask(T, b, causal, kpm) -> bool:
    # Causal: keys past T come after every real query, so only padding needs a mask.
    return kpm is not None or (not causal and T % b != 0)


def _fused_forward(q, k, v, b, causal, scale, kpm):
    B, T, H, D = q.shape
    nb = _num_blocks(T, b)
    mask = None
    if _needs_mask(T, b, causal, kpm):
        mask = _additive_mask(_key_valid(B, T, b, nb, kpm, q.device), B, nb, b, q.dtype)
    qb, kb, vb = (_block_view(x, b, nb) for x in (q, k, v))
    out, lse = _FUSED_FWD(qb, kb, vb, 0.0, causal, attn_mask=mask, scale=scale)
    out = _unblock(out, B, T)
    lse = lse.view(B, nb, H, b).transpose(1, 2).reshape(B, H, nb * b)[:, :, :T].contiguous()
    lse = lse.to(compute_dtype(q.dtype))
    if kpm is not None:
        has_key = _query_has_key(_key_valid(B, T, b, nb, kpm, q.device), causal, T)  # (B, T)
        out.masked_fill_(~has_key[:, :, None, None], 0)
        lse.masked_fill_(~has_key[:, None, :], math.inf)
    return out, lse


def _fused_backward(dout, q, k, v, out, lse, b, causal, scale, kpm):
    B, T, H, D = q.shape
    nb = _num_blocks(T, b)
    mask = None
    if _needs_mask(T, b, causal, kpm):
        mask = _additive_mask(_key_valid(B, T, b, nb, kpm, q.device), B, nb, b, q.dtype)
    qb, kb, vb, ob = (_block_view(x, b, nb) for x in (q, k, v, out))
    gb = _block_view(dout.to(q.dtype), b, nb)
    # Padded query rows get lse = +inf: their probabilities, hence their contributions, are 0.
    lse_b = pad_dim(lse.float() if q.dtype != torch.float64 else lse, 2, nb * b, value=math.inf)
    lse_b = lse_b.view(B, H, nb, b).transpose(1, 2).reshape(B * nb, H, b)
    dq, dk, dv = _FUSED_BWD(gb, qb, kb, vb, ob, lse_b, 0.0, causal, attn_mask=mask, scale=scale)
    return _unblock(dq, B, T), _unblock(dk, B, T), _unblock(dv, B, T)


# ----------------------------------------------------------------------------- math path
def _blocks(x, b, nb, dtype):
    """(B, T, H, D) -> (B, H, nb, b, D) in ``dtype``, T padded to nb*b."""
    B, T, H, D = x.shape
    x = pad_dim(x.to(dtype), 1, nb * b)
    return x.view(B, nb, b, H, D).permute(0, 3, 1, 2, 4)


def _unblocks(x, T, dtype):
    """(B, H, nb, b, D) -> contiguous (B, T, H, D) in ``dtype``."""
    B, H, nb, b, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, nb * b, H, D)[:, :T].to(dtype).contiguous()


def _allowed(B, T, b, nb, causal, kpm, device):
    """(B or 1, 1, nb, b_q, b_k) bool: which (query, key) pairs of each block interact."""
    allowed = _key_valid(B, T, b, nb, kpm, device)[:, None, :, None, :]
    if causal:
        allowed = allowed & torch.ones(b, b, dtype=torch.bool, device=device).tril()
    return allowed


def _math_forward(q, k, v, b, causal, scale, kpm):
    B, T, H, D = q.shape
    nb = _num_blocks(T, b)
    cd = compute_dtype(q.dtype)
    qb, kb, vb = (_blocks(x, b, nb, cd) for x in (q, k, v))
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    s = s.masked_fill(~_allowed(B, T, b, nb, causal, kpm, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key is valid
    lse = lse.masked_fill(lse == -math.inf, math.inf)
    p = torch.exp(s - lse[..., None])  # exactly 0 on rows with lse = +inf
    out = _unblocks(torch.matmul(p, vb), T, q.dtype)
    lse = lse.reshape(B, H, nb * b)[:, :, :T].contiguous()
    return out, lse


def _math_backward(dout, q, k, v, out, lse, b, causal, scale, kpm):
    B, T, H, D = q.shape
    nb = _num_blocks(T, b)
    cd = compute_dtype(q.dtype)
    qb, kb, vb, ob, gb = (_blocks(x, b, nb, cd) for x in (q, k, v, out, dout))
    lse_b = pad_dim(lse.to(cd), 2, nb * b, value=math.inf).view(B, H, nb, b)
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    s = s.masked_fill(~_allowed(B, T, b, nb, causal, kpm, q.device), float("-inf"))
    p = torch.exp(s - lse_b[..., None])
    dv = torch.matmul(p.transpose(-1, -2), gb)
    dp = torch.matmul(gb, vb.transpose(-1, -2))
    delta = (gb * ob).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kb)
    dk = torch.matmul(ds.transpose(-1, -2), qb)
    return _unblocks(dq, T, q.dtype), _unblocks(dk, T, q.dtype), _unblocks(dv, T, q.dtype)


# ----------------------------------------------------------------------------- backend contract
def forward(q, k, v, block_size: int, causal: bool, scale: float, key_padding_mask):
    """Returns ``(out (B, T, H, D) in q.dtype, lse (B, H, T) fp32/fp64)``; see BACKENDS.md."""
    if use_fused_cpu(q):
        return _fused_forward(q, k, v, block_size, causal, scale, key_padding_mask)
    return _math_forward(q, k, v, block_size, causal, scale, key_padding_mask)


def backward(dout, q, k, v, out, lse, block_size: int, causal: bool, scale: float, key_padding_mask):
    """Returns ``(dq, dk, dv)``, each (B, T, H, D) in q.dtype; see BACKENDS.md."""
    if use_fused_cpu(q):
        return _fused_backward(dout, q, k, v, out, lse, block_size, causal, scale, key_padding_mask)
    return _math_backward(dout, q, k, v, out, lse, block_size, causal, scale, key_padding_mask)
