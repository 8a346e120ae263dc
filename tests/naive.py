"""Independent naive implementations of the four ops, written with explicit loops in float64.

They share no code with hilt_kernels; the tests use them (and autograd through them) as the
expected values for every backend.
"""

from __future__ import annotations

import torch


def block_local_attention(q, k, v, block_size, causal=True, scale=None, key_padding_mask=None):
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    rows = []
    for b in range(B):
        per_t = []
        for t in range(T):
            keys = [
                s
                for s in range(T)
                if s // block_size == t // block_size
                and (not causal or s <= t)
                and not (key_padding_mask is not None and bool(key_padding_mask[b, s]))
            ]
            if not keys:
                per_t.append(torch.zeros(H, D, dtype=torch.float64))
                continue
            idx = torch.tensor(keys)
            scores = torch.einsum("hd,shd->hs", q[b, t], k[b, idx]) * scale  # (H, S)
            w = torch.softmax(scores, dim=-1)
            per_t.append(torch.einsum("hs,shd->hd", w, v[b, idx]))
        rows.append(torch.stack(per_t) if per_t else torch.zeros(0, H, D, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, T, H, D, dtype=torch.float64)


def attention_pool(scores, values, block_size, key_padding_mask=None):
    scores, values = scores.to(torch.float64), values.to(torch.float64)
    B, T, H = scores.shape
    nb = (T + block_size - 1) // block_size
    D = values.shape[-1]
    out = []
    for b in range(B):
        blocks = []
        for n in range(nb):
            heads = []
            for h in range(H):
                toks = [
                    t
                    for t in range(n * block_size, min(T, (n + 1) * block_size))
                    if not (key_padding_mask is not None and bool(key_padding_mask[b, t]))
                ]
                if not toks:
                    heads.append(torch.zeros(D, dtype=torch.float64))
                    continue
                idx = torch.tensor(toks)
                w = torch.softmax(scores[b, idx, h], dim=0)
                vals = values[b, idx, h] if values.dim() == 4 else values[b, idx]
                heads.append((w[:, None] * vals).sum(0))
            blocks.append(torch.stack(heads))
        out.append(torch.stack(blocks) if blocks else torch.zeros(0, H, D, dtype=torch.float64))
    return torch.stack(out) if out else torch.zeros(0, nb, H, D, dtype=torch.float64)


def window2_attention(q, k, v, causal=True, scale=None):
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    B, W, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, 2, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for i in range(2):
                    seen = [0] if (causal and i == 0) else [0, 1]
                    s = torch.stack([q[b, i, t, h] @ k[b, j, t, h] for j in seen]) * scale
                    w = torch.softmax(s, dim=0)
                    out[b, i, t, h] = sum(w[n] * v[b, j, t, h] for n, j in enumerate(seen))
    return out


def ema_depth_scan(values, alpha_logits, init=None, return_all=True):
    values, alpha_logits = values.to(torch.float64), alpha_logits.to(torch.float64)
    L = values.shape[0]
    state = torch.zeros(values.shape[1:], dtype=torch.float64)
    if init is not None:
        state = state + init.to(torch.float64)
    states = []
    for l in range(L):
        alpha = torch.sigmoid(alpha_logits[l])  # () or (C,), broadcasts over the last dim
        state = (1 - alpha) * state + alpha * values[l]
        states.append(state)
    return torch.stack(states) if return_all else states[-1]
