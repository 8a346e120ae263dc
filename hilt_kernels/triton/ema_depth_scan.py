"""Triton backend of ``ema_depth_scan`` (contract: ``hilt_kernels/BACKENDS.md``).

How it works
------------
``values`` is ``(L, *S)``; the ``S`` part is handled as ``N = prod(S)`` elements, seen either as one
flat axis (``FLAT`` mode) or as ``(R, C)`` with ``C = S[-1]`` (2-D mode). Each program owns one tile
of ``BLOCK`` elements of that axis and walks the depth axis ``L`` with the state in fp32 registers:

* forward: ``S = (1 - a_l) S + a_l v_l`` for l = 1..L, storing every state (``return_all``) or only
  the last one. ``a_l = sigmoid(alpha_logits_l)`` is computed in fp32 in the kernel, together with
  ``1 - a_l = sigmoid(-logit)`` from one ``exp(-|x|)`` (accurate when the sigmoid saturates).
* backward: one reverse pass over L per tile: ``G = g_l + (1 - a_{l+1}) G``,
  ``dvalues_l = a_l G``, ``dinit = (1 - a_1) G_1`` (fp32), and per-program partial sums of
  ``a_l (1 - a_l) sum(G (v_l - S^{l-1}))`` written to an fp32 buffer ``(programs, L)`` (scalar alpha)
  or ``(row programs, L, C)`` (per-channel alpha), then reduced with ``torch.sum`` over programs:
  deterministic, no atomics. ``S^{l-1}`` is read from the saved states (``states[l-1]``, init or 0
  for l = 1) when the forward returned all of them, else the states are first recomputed by the
  forward kernel into an fp32 scratch buffer ``(L-1, N)``. ``S^{l-1}`` is never rebuilt by dividing
  by ``1 - a`` and no cumprod closed form is used, so saturated logits (+-30, ...) stay finite.

Layouts
-------
* Strides are honoured, no copies, whenever every ``(L, *S)`` tensor (values, grad, states) has
  its ``S`` dims collapsible to one stride (contiguous, sliced along L, stride-0 expanded grads such
  as ``torch.ones(()).expand(L, *S)``) and alpha is a scalar per step: FLAT mode, one flat stride
  per tensor. Otherwise (per-channel alpha, or e.g. a last-dim slice ``x[..., :C]``) the 2-D mode
  needs ``S[:-1]`` collapsible to one stride plus any stride on the last dim; a tensor that fits
  neither is copied with ``.contiguous()`` first (exotic layouts only).
* ``init`` (broadcastable to ``S``; expanded here to a view with stride-0 dims) is read through ``(R, C)``
  strides (in FLAT mode with ``n // C``, ``n % C``, once per tile), never materialised unless its
  ``S[:-1]`` dims cannot be collapsed (then ``.contiguous()``).
* ``alpha_logits`` ``(L,)`` or ``(L, C)`` may have any strides and its own dtype.
* Offsets are 64-bit: no 2**31-element limit.

Tuning
------
On GPU ``triton.autotune`` picks BLOCK (512..4096 elements) and num_warps per (L, N bucket, C tile,
mode, dtypes) among ``CONFIGS`` kept by ``prune_configs``; under ``TRITON_INTERPRET=1`` or
``HILT_TRITON_FIXED_CONFIG=1`` the first kept config runs (``_launch.py``). The dalpha partial
buffer is sized for the smallest BLOCK and sliced to the program count of the grid actually
launched (never to the autotuner's shared ``best_config``, which another thread may have changed).

Limits
------
fp16 / bf16 / fp32 values and alpha (no fp64: the state is fp32). CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``. Saved fp16/bf16 states are used as-is for ``S^{l-1}`` in the dalpha term
(rounded to the values dtype, like the forward output the caller sees). With ``return_all=False``
the backward costs an extra fp32 ``(L-1) * N`` scratch write + read. The loads of step l+1 are
issued by hand before step l's math (Triton does not pipeline these loops). In FLAT mode the one-time
init load goes through ``n // C`` / ``n % C`` (not vectorized; 1/L of the traffic). ``L`` is a
runtime argument (``do_not_specialize``, no recompiles per L), and the depth loops run to it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hilt_kernels._alloc import empty
from hilt_kernels.triton._launch import Tuned

__all__ = ["unsupported", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Autotuned BLOCK values (tile elements) and warps, and the cap on the channel tile of the 2-D mode.
_BLOCKS = (512, 1024, 2048, 4096)
_WARPS = (4, 8)
_BLOCK_C_MAX = 128


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), 1 - sigmoid(x)) in fp32, both accurate when x saturates."""
    e = tl.exp(-tl.abs(x))
    d = 1.0 / (1.0 + e)
    p = e * d
    pos = x >= 0
    return tl.where(pos, d, p), tl.where(pos, p, d)


@triton.jit
def _both(mask, cond):
    """``mask & cond`` for a block mask and a scalar condition. Written as a select because triton
    3.9's interpreter turns ``block_int1 & scalar_int1`` into int32 data that ``tl.load`` rejects
    ("mask has unsupported dtype"); on a GPU both lower to the same predicate."""
    return tl.where(cond, mask, False)


@triton.jit(do_not_specialize=["L"])
def _ema_fwd_kernel(
    V, A, I, O,
    L, N, R, C, n_store,
    v_sl, v_sr, v_sc,
    a_sl, a_sc,
    i_sr, i_sc,
    N_KEY,  # autotune key only (power-of-two bucket of N)
    FLAT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_ALL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid0 = tl.program_id(0)
    if FLAT:
        n = pid0.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        v_ptrs = V + n * v_sc
        o_ptrs = O + n
        if HAS_INIT:
            state = tl.load(I + (n // C) * i_sr + (n % C) * i_sc, mask=mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK], dtype=tl.float32)
        a_ptrs = A
    else:
        pid1 = tl.program_id(1)
        r = pid0.to(tl.int64) * (BLOCK // BLOCK_C) + tl.arange(0, BLOCK // BLOCK_C)[:, None]
        c = pid1.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        cmask = c < C
        mask = (r < R) & cmask
        v_ptrs = V + r * v_sr + c * v_sc
        o_ptrs = O + r * C + c
        if HAS_INIT:
            state = tl.load(I + r * i_sr + c * i_sc, mask=mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK // BLOCK_C, BLOCK_C], dtype=tl.float32)
        if PER_CHANNEL:
            a_ptrs = A + c * a_sc
        else:
            a_ptrs = A

    # software pipelining by hand: step l+1's loads are issued before step l's math and store
    if PER_CHANNEL:
        x = tl.load(a_ptrs, mask=cmask, other=0.0)
    else:
        x = tl.load(a_ptrs)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    for i in range(L):
        has_next = i < L - 1
        v_ptrs += v_sl
        a_ptrs += a_sl
        if PER_CHANNEL:
            x_next = tl.load(a_ptrs, mask=_both(cmask, has_next), other=0.0)
        else:
            x_next = tl.load(a_ptrs, mask=has_next, other=0.0)
        v_next = tl.load(v_ptrs, mask=_both(mask, has_next), other=0.0)
        alpha, oma = _sigmoid_pair(x.to(tl.float32))
        state = oma * state + alpha * v.to(tl.float32)
        if STORE_ALL:
            tl.store(o_ptrs, state.to(O.dtype.element_ty), mask=_both(mask, i < n_store))
            o_ptrs += N
        x = x_next
        v = v_next
    if not STORE_ALL:
        tl.store(o_ptrs, state.to(O.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["L"])
def _ema_bwd_kernel(
    GR, V, A, I, P, DV, DI, DA,
    L, N, R, C,
    g_sl, g_sr, g_sc,
    v_sl, v_sr, v_sc,
    a_sl, a_sc,
    i_sr, i_sc,
    p_sl, p_sr, p_sc,
    N_KEY,
    FLAT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_INIT: tl.constexpr,
    GRAD_ALL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # P holds the previous states: S^{l-1} = P[l-1] for l >= 1 (S^0 = init or 0).
    pid0 = tl.program_id(0)
    last = (L - 1).to(tl.int64)
    if FLAT:
        n = pid0.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        g_ptrs = GR + n * g_sc
        v_ptrs = V + n * v_sc + last * v_sl
        p_ptrs = P + n * p_sc + (last - 1) * p_sl
        o_off = n
        if HAS_INIT:
            init_v = tl.load(I + (n // C) * i_sr + (n % C) * i_sc, mask=mask, other=0.0).to(tl.float32)
        a_ptrs = A + last * a_sl
        da_ptrs = DA + pid0.to(tl.int64) * L + last
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        oma_next = tl.full([], 1.0, tl.float32)
    else:
        pid1 = tl.program_id(1)
        r = pid0.to(tl.int64) * (BLOCK // BLOCK_C) + tl.arange(0, BLOCK // BLOCK_C)[:, None]
        c = pid1.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        cmask = c < C
        mask = (r < R) & cmask
        g_ptrs = GR + r * g_sr + c * g_sc
        v_ptrs = V + r * v_sr + c * v_sc + last * v_sl
        p_ptrs = P + r * p_sr + c * p_sc + (last - 1) * p_sl
        o_off = r * C + c
        if HAS_INIT:
            init_v = tl.load(I + r * i_sr + c * i_sc, mask=mask, other=0.0).to(tl.float32)
        zero = tl.zeros([BLOCK // BLOCK_C, BLOCK_C], dtype=tl.float32)
        if PER_CHANNEL:
            a_ptrs = A + c * a_sc + last * a_sl
            da_ptrs = DA + (pid0.to(tl.int64) * L + last) * C + c
            oma_next = tl.full([1, BLOCK_C], 1.0, tl.float32)
        else:
            a_ptrs = A + last * a_sl
            lin = pid0.to(tl.int64) * tl.num_programs(1) + pid1
            da_ptrs = DA + lin * L + last
            oma_next = tl.full([], 1.0, tl.float32)
    dv_ptrs = DV + o_off + last * N

    if GRAD_ALL:
        g_ptrs += last * g_sl
        G = zero
    else:
        G = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)

    # software pipelining by hand: step l-1's loads are issued before step l's math and stores
    if PER_CHANNEL:
        x = tl.load(a_ptrs, mask=cmask, other=0.0)
    else:
        x = tl.load(a_ptrs)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    p = tl.load(p_ptrs, mask=_both(mask, L > 1), other=0.0)
    if GRAD_ALL:
        g = tl.load(g_ptrs, mask=mask, other=0.0)
    for i in range(L):
        # step l = L - 1 - i (0-based); has_next: step l - 1 exists
        has_next = i < L - 1
        a_ptrs -= a_sl
        v_ptrs -= v_sl
        p_ptrs -= p_sl
        if PER_CHANNEL:
            x_next = tl.load(a_ptrs, mask=_both(cmask, has_next), other=0.0)
        else:
            x_next = tl.load(a_ptrs, mask=has_next, other=0.0)
        v_next = tl.load(v_ptrs, mask=_both(mask, has_next), other=0.0)
        p_next = tl.load(p_ptrs, mask=_both(mask, i < L - 2), other=0.0)
        if GRAD_ALL:
            g_ptrs -= g_sl
            g_next = tl.load(g_ptrs, mask=_both(mask, has_next), other=0.0)

        alpha, oma = _sigmoid_pair(x.to(tl.float32))
        if GRAD_ALL:
            G = g.to(tl.float32) + oma_next * G
        else:
            G = oma_next * G
        prev = p.to(tl.float32)  # S^{l-1} (0 for l = 0 ...)
        if HAS_INIT:
            prev = tl.where(has_next, prev, init_v)  # (... or init)
        tl.store(dv_ptrs, (alpha * G).to(DV.dtype.element_ty), mask=mask)
        t = G * (v.to(tl.float32) - prev)
        if PER_CHANNEL:
            s = tl.sum(t, axis=0, keep_dims=True)
            tl.store(da_ptrs, alpha * oma * s, mask=cmask)
            da_ptrs -= C
        else:
            s = tl.sum(t)
            tl.store(da_ptrs, alpha * oma * s)
            da_ptrs -= 1
        oma_next = oma
        dv_ptrs -= N
        x = x_next
        v = v_next
        p = p_next
        if GRAD_ALL:
            g = g_next
    if HAS_INIT:
        tl.store(DI + o_off, oma_next * G, mask=mask)


def prune_configs(configs, nargs, **kwargs):
    """2-D mode: at least 8 rows per tile (bounds the per-channel dalpha partial buffer); no tile
    (much) larger than the whole problem; no fp32 backward config that spills on sm_90. Smallest
    BLOCK first (the fixed-config choice)."""
    args = {**nargs, **kwargs}
    block_c = args["BLOCK_C"]
    if "GR" in args and args["V"].element_size() == 4:  # fp32 backward: drop the configs that spill
        configs = [c for c in configs
                   if (c.kwargs["BLOCK"], c.num_warps, bool(args["PER_CHANNEL"])) not in _FP32_BWD_SPILLS]
    rows_ok = [cfg for cfg in configs if args["FLAT"] or cfg.kwargs["BLOCK"] >= 8 * block_c] or list(configs)
    size = args["N_KEY"] if args["FLAT"] else triton.next_power_of_2(args["R"]) * block_c
    smallest = min(cfg.kwargs["BLOCK"] for cfg in rows_ok)
    return [cfg for cfg in rows_ok if cfg.kwargs["BLOCK"] <= max(size, smallest)]


# (BLOCK, num_warps, per-channel) of the fp32 backward that spill on sm_90 (ptxas; the 16-bit ones do not)
_FP32_BWD_SPILLS = {(4096, 4, False), (4096, 4, True), (2048, 8, True)}


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in _BLOCKS for w in _WARPS]
_KEY = ["L", "N_KEY", "BLOCK_C", "FLAT", "PER_CHANNEL", "HAS_INIT"]
fwd_kernel = Tuned(_ema_fwd_kernel, CONFIGS, _KEY + ["STORE_ALL"], prune_configs)
bwd_kernel = Tuned(_ema_bwd_kernel, CONFIGS, _KEY + ["GRAD_ALL"], prune_configs)
KERNELS = (fwd_kernel, bwd_kernel)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _collapse(shape, stride):
    """One stride for ``shape`` read as a flat axis, or None when the dims don't collapse."""
    out = None
    inner_size = inner_stride = None
    for size, st in zip(reversed(shape), reversed(stride)):
        if size == 1:
            continue
        if out is None:
            out = st
        elif st != inner_stride * inner_size:
            return None
        inner_size, inner_stride = size, st
    return 1 if out is None else out


def _flat_view(t, lead):
    """(tensor, s_l, s_flat) for FLAT mode; copies to contiguous when the S dims don't collapse."""
    s = _collapse(t.shape[lead:], t.stride()[lead:])
    if s is None:
        t = t.contiguous()
        s = 1
    return t, (t.stride(0) if lead else 0), s


def _rc_view(t, lead):
    """(tensor, s_l, s_r, s_c) for the (R, C) mode; copies when S[:-1] doesn't collapse."""
    shape, stride = t.shape[lead:], t.stride()[lead:]
    if len(shape) == 0:
        return t, (t.stride(0) if lead else 0), 0, 0
    s_r = _collapse(shape[:-1], stride[:-1])
    if s_r is None:
        t = t.contiguous()
        stride = t.stride()[lead:]
        s_r = _collapse(shape[:-1], stride[:-1])
    return t, (t.stride(0) if lead else 0), s_r, stride[-1]


def _geometry(values, alpha_logits):
    L = values.shape[0]
    S = tuple(values.shape[1:])
    N = math.prod(S)
    C = S[-1] if len(S) else 1
    R = N // C if C else 0
    per_channel = alpha_logits.dim() == 2
    return L, S, N, R, C, per_channel


def _block_c(C):
    return min(triton.next_power_of_2(max(C, 1)), _BLOCK_C_MAX)


def _a_strides(alpha_logits):
    if alpha_logits.dim() == 2:
        return alpha_logits.stride(0), alpha_logits.stride(1)
    return alpha_logits.stride(0), 0


def _grid(flat, N, R, C, block_c):
    if flat:
        return lambda meta: (triton.cdiv(N, meta["BLOCK"]),)
    return lambda meta: (triton.cdiv(R, meta["BLOCK"] // block_c), triton.cdiv(C, block_c))


def _run_forward(values, alpha_logits, init, out, store_all, n_store, flat, geo):
    L, S, N, R, C, per_channel = geo
    block_c = 1 if flat else _block_c(C)
    if flat:
        values, v_sl, v_s = _flat_view(values, 1)
        v_sr, v_sc = 0, v_s
    else:
        values, v_sl, v_sr, v_sc = _rc_view(values, 1)
    if init is not None:
        init, _, i_sr, i_sc = _rc_view(init, 0)
    else:
        i_sr = i_sc = 0
    a_sl, a_sc = _a_strides(alpha_logits)
    args = (
        values, alpha_logits, init if init is not None else values, out,
        L, N, R, C, n_store,
        v_sl, v_sr, v_sc, a_sl, a_sc, i_sr, i_sc,
        triton.next_power_of_2(N),
    )
    meta = dict(FLAT=flat, PER_CHANNEL=per_channel, HAS_INIT=init is not None,
                STORE_ALL=store_all, BLOCK_C=block_c)
    fwd_kernel[_grid(flat, N, R, C, block_c)](*args, **meta)


def _flat_ok(tensors_lead):
    return all(_collapse(t.shape[lead:], t.stride()[lead:]) is not None for t, lead in tensors_lead)


def unsupported(values, alpha_logits, init, return_all) -> list[str]:
    """Reasons this backend cannot run the op ([] = supported)."""
    reasons = []
    if values.dtype not in _DTYPES:
        reasons.append(f"values dtype {values.dtype} is not supported (float16, bfloat16, float32)")
    if alpha_logits.dtype not in _DTYPES:
        reasons.append(f"alpha_logits dtype {alpha_logits.dtype} is not supported (float16, bfloat16, float32)")
    if init is not None and init.dtype != values.dtype:
        reasons.append(f"init dtype {init.dtype} differs from values dtype {values.dtype}")
    if alpha_logits.dim() not in (1, 2):
        reasons.append(f"alpha_logits must be (L,) or (L, C), got shape {tuple(alpha_logits.shape)}")
    for name, t in (("values", values), ("alpha_logits", alpha_logits), ("init", init)):
        if t is None:
            continue
        if t.device.type not in ("cuda", "cpu"):
            reasons.append(f"{name} is on {t.device}: needs CUDA (or CPU with TRITON_INTERPRET=1)")
        elif t.device != values.device:
            reasons.append(f"{name} is on {t.device} but values on {values.device}: one device for all")
    return reasons


def forward(values, alpha_logits, init, return_all: bool):
    """All states ``(L, *S)`` (return_all) or the last one ``S``, in values.dtype."""
    geo = _geometry(values, alpha_logits)
    L, S, N, R, C, per_channel = geo
    init = init.expand(S) if init is not None else None
    out = empty((L, *S) if return_all else S, dtype=values.dtype, device=values.device)
    if N == 0 or L == 0:
        return out
    flat = not per_channel and _flat_ok([(values, 1)])
    _run_forward(values, alpha_logits, init, out, return_all, L, flat, geo)
    return out


def backward(grad, values, alpha_logits, init, states, return_all: bool):
    """(dvalues, dalpha_logits fp32, dinit fp32 of shape S or an empty tensor when init is None)."""
    geo = _geometry(values, alpha_logits)
    L, S, N, R, C, per_channel = geo
    init = init.expand(S) if init is not None else None
    dev = values.device
    dvalues = empty(values.shape, dtype=values.dtype, device=dev)
    dinit = (empty(S, dtype=torch.float32, device=dev) if init is not None
             else torch.empty(0, dtype=torch.float32, device=dev))
    if N == 0 or L == 0:
        return dvalues, torch.zeros(alpha_logits.shape, dtype=torch.float32, device=dev), dinit

    use_states = return_all and states is not None
    grad_lead = 1 if return_all else 0
    big = [(values, 1), (grad, grad_lead)] + ([(states, 1)] if use_states else [])
    flat = not per_channel and _flat_ok(big)

    # previous states S^{l-1} = prev[l-1], l >= 1
    if use_states:
        prev = states
    elif L > 1:
        prev = empty((L - 1, *S), dtype=torch.float32, device=dev)  # recomputed fp32 states
        _run_forward(values, alpha_logits, init, prev, True, L - 1, flat, geo)
    else:
        prev = None  # L == 1: only S^0 = init is needed

    block_c = 1 if flat else _block_c(C)
    if flat:
        grad, g_sl, g_s = _flat_view(grad, grad_lead)
        g_sr, g_sc = 0, g_s
        values, v_sl, v_s = _flat_view(values, 1)
        v_sr, v_sc = 0, v_s
        if prev is not None:
            prev, p_sl, p_s = _flat_view(prev, 1)
            p_sr, p_sc = 0, p_s
    else:
        grad, g_sl, g_sr, g_sc = _rc_view(grad, grad_lead)
        values, v_sl, v_sr, v_sc = _rc_view(values, 1)
        if prev is not None:
            prev, p_sl, p_sr, p_sc = _rc_view(prev, 1)
    if prev is None:
        prev, p_sl, p_sr, p_sc = values, 0, 0, 0  # never read (all loads masked off)
    if init is not None:
        init, _, i_sr, i_sc = _rc_view(init, 0)
    else:
        i_sr = i_sc = 0
    a_sl, a_sc = _a_strides(alpha_logits)

    # dalpha partials, sized for the smallest BLOCK any config may use
    min_block = min(c.kwargs["BLOCK"] for c in CONFIGS)
    if flat:
        rows_max = triton.cdiv(N, min_block)
    elif per_channel:
        rows_max = triton.cdiv(R, max(min_block // block_c, 1))
    else:
        rows_max = triton.cdiv(R, max(min_block // block_c, 1)) * triton.cdiv(C, block_c)
    partial = empty((rows_max, L, C) if per_channel else (rows_max, L), dtype=torch.float32, device=dev)

    args = (
        grad, values, alpha_logits, init if init is not None else values, prev, dvalues,
        dinit if init is not None else dvalues, partial,
        L, N, R, C,
        g_sl, g_sr, g_sc, v_sl, v_sr, v_sc, a_sl, a_sc, i_sr, i_sc, p_sl, p_sr, p_sc,
        triton.next_power_of_2(N),
    )
    meta = dict(FLAT=flat, PER_CHANNEL=per_channel, HAS_INIT=init is not None,
                GRAD_ALL=return_all, BLOCK_C=block_c)
    grid = bwd_kernel[_grid(flat, N, R, C, block_c)](*args, **meta)
    # rows of partial the launched programs wrote (per-channel: one per row program)
    rows = grid[0] if (flat or per_channel) else grid[0] * grid[1]
    dalpha = partial[:rows].sum(dim=0)
    return dvalues, dalpha, dinit
