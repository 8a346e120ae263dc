"""Every autotune config the pruners keep, and the GPU path choice, run against the naive fp64 ops.

The triton kernels run here exactly as on a GPU (same thresholds, tiles, runtime-bound loops); the only
difference is which kept config runs: a GPU autotunes, the interpreter takes the first. These tests make
each launch run its i-th kept config (``_launch.pick``) for i = 0, 1, ... until every launch has run all
of its kept configs, and check the results every time. Configs that differ only in num_warps /
num_stages compute the same thing under the interpreter (it ignores both), so they run once here; the
sm_90 compile check (test_triton_compile.py) covers each of them.

On a GPU the same tests run every kept config on the device (the dedicated all-configs GPU test).
"""

from __future__ import annotations

import math

import pytest
import torch

import hilt_kernels
from hilt_kernels.triton import _launch
from tests import naive
from tests.conftest import assert_close, on_test_device, skip_missing_backend, triton_usable
from tests.ops.kept_configs import run_every_kept_config
from tests.ops.test_block_local_attention import make_mask


@pytest.fixture(autouse=True)
def _need_triton():
    if not triton_usable():
        skip_missing_backend("triton", "triton is not usable here")


def _grads(fn, xs, seed=1):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * g).sum().backward()
    return out, [x.grad for x in xs]


def checker(op, ref, masters, dtype, names, atol, rtol):
    """A function checking op in ``dtype`` against ref in fp64 on the same rounded inputs (output and
    gradients under one random output gradient); the expected values are computed once."""
    xs = [m.detach().to(dtype) for m in masters]
    exp, exp_grads = _grads(ref, [x.double() for x in xs])

    def check():
        out, grads = _grads(op, xs)
        assert out.dtype == dtype
        assert_close(out, exp, atol, rtol, "out")
        for n, gr, e in zip(names, grads, exp_grads):
            assert_close(gr, e, atol * 2, rtol * 2, f"d{n}")

    return check


def dense_bla(q, k, v, b, causal, mask):
    """block_local_attention as one dense masked softmax in fp64 (rows without a key give 0)."""
    B, T, H, D = q.shape
    t = torch.arange(T)
    allowed = (t[:, None] // b) == (t[None, :] // b)
    if causal:
        allowed = allowed & (t[None, :] <= t[:, None])
    allowed = allowed[None, None] & ~mask[:, None, None, :]  # (B, 1, T, S)
    s = torch.einsum("bthd,bshd->bhts", q, k) * D**-0.5
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v)


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}

# ---------------------------------------------------------------------------------------------
# block_local_attention: block sizes 8..256, both dtypes (fp16 and fp32 keep other paths/configs)
# ---------------------------------------------------------------------------------------------
BLA_BLOCKS = [8, 16, 24, 32, 64, 128, 256]
BLA_CASES = [(b, dt, causal, 16) for b in BLA_BLOCKS for dt in (torch.float32, torch.float16)
             for causal in ((True, False) if b == 24 else (True,))]
# fp32 with a head dim > 64 has its own kept configs (smaller tiles, the large-path backward)
BLA_CASES += [(16, torch.float32, True, 80), (64, torch.float32, True, 80)]


@pytest.mark.parametrize("b, dtype, causal, D", BLA_CASES,
                         ids=[f"b{b}-{str(dt)[6:]}-{'causal' if c else 'full'}-D{D}" for b, dt, c, D in BLA_CASES])
def test_bla_every_kept_config(monkeypatch, b, dtype, causal, D):
    B, H = 1, (2 if b < 128 else 1)
    T = 3 * b + 5 if b < 128 else b + 40  # several tiles, a short last block
    g = torch.Generator().manual_seed(b)
    masters = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = make_mask("random", B, T, b, seed=b)
    op = on_test_device(lambda q, k, v: hilt_kernels.block_local_attention(
        q, k, v, b, causal=causal, key_padding_mask=mask, backend="triton"))
    ref = lambda q, k, v: dense_bla(q, k, v, b, causal, mask)  # noqa: E731
    ran = run_every_kept_config(monkeypatch, checker(op, ref, masters, dtype, "qkv", *TOL[dtype]))
    assert ran  # at least one kernel launched


# GPU path choice: (dtype, b) -> (forward kernels, backward kernels)
SMALL_FWD, SMALL_BWD = {"_bla_fwd_small"}, {"_bla_bwd_small"}
LARGE_FWD, LARGE_BWD = {"_bla_fwd_large"}, {"_bla_bwd_dq_large", "_bla_bwd_dkdv_large"}
PATHS = [
    (torch.float16, 64, SMALL_FWD, SMALL_BWD),
    (torch.float16, 128, SMALL_FWD, LARGE_BWD),  # small-path forward, large-path backward
    (torch.float16, 129, LARGE_FWD, LARGE_BWD),
    (torch.float32, 32, SMALL_FWD, SMALL_BWD),
    (torch.float32, 64, SMALL_FWD, LARGE_BWD),
    (torch.float32, 65, LARGE_FWD, LARGE_BWD),
]


@pytest.mark.parametrize("dtype, b, fwd, bwd", PATHS, ids=[f"{str(p[0])[6:]}-b{p[1]}" for p in PATHS])
def test_bla_gpu_path_choice(monkeypatch, dtype, b, fwd, bwd):
    """The small path up to b = 128 (16-bit) / 64 (fp32) forward and 64 / 32 backward, as on a GPU."""
    records = []
    monkeypatch.setattr(_launch, "records", records)
    B, T, H, D = 1, b + 7, 1, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    out = hilt_kernels.block_local_attention(q, k, v, b, backend="triton")
    assert {r.name for r in records} == fwd
    records.clear()
    out.float().square().sum().backward()
    assert {r.name for r in records} == bwd
    exp = dense_bla(q.double(), k.double(), v.double(), b, True, torch.zeros(B, T, dtype=torch.bool))
    assert_close(out, exp, *TOL[dtype], "out")


@pytest.mark.parametrize("b", [8, 24, 32, 48])
def test_bla_small_tiles_pack_whole_blocks(monkeypatch, b):
    """Every kept BLOCK_M packs BLOCK_M // b whole blocks (b = 24 in a 32-row tile holds one block,
    in a 128-row tile five): the grid is cdiv(T, (BLOCK_M // b) * b) and the result is exact."""
    records = []
    monkeypatch.setattr(_launch, "records", records)
    B, T, H, D = 1, 5 * b + 3, 1, 8
    g = torch.Generator().manual_seed(b)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float16) for _ in range(3))
    exp = dense_bla(q.double(), k.double(), v.double(), b, True, torch.zeros(B, T, dtype=torch.bool))
    seen = set()

    def one():
        out = hilt_kernels.block_local_attention(q, k, v, b, backend="triton")
        assert_close(out, exp, *TOL[torch.float16], f"out b={b}")

    run_every_kept_config(monkeypatch, one)
    for r in records:
        assert r.name == "_bla_fwd_small"
        bm = r.config.kwargs["BLOCK_M"]
        assert bm >= b
        assert r.grid == (math.ceil(T / ((bm // b) * b)), H, B)
        seen.add(bm)
    assert seen == {bm for bm in (32, 64, 128) if bm >= b}


# ---------------------------------------------------------------------------------------------
# attention_pool, window2_attention, ema_depth_scan
# ---------------------------------------------------------------------------------------------
# per-head values at every block size; shared values (another BLOCK_H, so other kept configs) at four
APOOL_CASES = [(b, False) for b in BLA_BLOCKS] + [(b, True) for b in (8, 24, 64, 256)]


@pytest.mark.parametrize("b, shared", APOOL_CASES, ids=[f"b{b}-{'shared' if s else 'heads'}" for b, s in APOOL_CASES])
def test_apool_every_kept_config(monkeypatch, b, shared):
    B, H, D = 1, 3, 40
    T = b + 3  # a full block and a short one
    g = torch.Generator().manual_seed(b)
    scores = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    values = torch.randn((B, T, D) if shared else (B, T, H, D), generator=g, dtype=torch.float64)
    mask = make_mask("random", B, T, b, seed=b)
    op = on_test_device(lambda s, v: hilt_kernels.attention_pool(s, v, b, key_padding_mask=mask, backend="triton"))
    ref = lambda s, v: naive.attention_pool(s, v, b, key_padding_mask=mask)  # noqa: E731
    run_every_kept_config(monkeypatch, checker(op, ref, [scores, values], torch.float32,
                                               ("scores", "values"), *TOL[torch.float32]))


@pytest.mark.parametrize("D", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("causal", [True, False])
def test_w2a_every_kept_config(monkeypatch, D, causal):
    B, T, H = 1, 5, 2
    g = torch.Generator().manual_seed(D)
    masters = [torch.randn(B, 2, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]
    op = on_test_device(lambda q, k, v: hilt_kernels.window2_attention(q, k, v, causal=causal, backend="triton"))
    ref = lambda q, k, v: naive.window2_attention(q, k, v, causal=causal)  # noqa: E731
    run_every_kept_config(monkeypatch, checker(op, ref, masters, torch.float32, "qkv", *TOL[torch.float32]))


# (values shape, per-channel alpha, init shape, return_all, last-dim slice (2-D mode for scalar alpha))
EMA_CASES = [
    ((3, 4100), False, (4100,), True, False),  # flat: BLOCK 512..4096 all kept
    ((3, 5, 820), False, None, False, False),  # flat, recomputed states
    ((3, 40, 128), True, (128,), True, False),  # 2-D per channel, BLOCK_C = 128
    ((2, 40, 130), True, None, False, False),  # 2-D, two channel tiles
    ((3, 33, 70), False, (70,), True, True),  # 2-D mode with a scalar alpha (sliced last dim)
]


@pytest.mark.parametrize("case", EMA_CASES, ids=[f"{'x'.join(map(str, c[0]))}-{'chan' if c[1] else 'layer'}"
                                                 f"{'-sliced' if c[4] else ''}" for c in EMA_CASES])
def test_ema_every_kept_config(monkeypatch, case):
    shape, per_channel, init_shape, return_all, sliced = case
    g = torch.Generator().manual_seed(0)
    L, C = shape[0], shape[-1]
    values = torch.randn(*shape[:-1], C + (3 if sliced else 0), generator=g, dtype=torch.float64)
    alpha = torch.randn((L, C) if per_channel else (L,), generator=g, dtype=torch.float64)
    masters = [values, alpha] + ([torch.randn(init_shape, generator=g, dtype=torch.float64)] if init_shape else [])

    def cut(v):
        return v[..., :C] if sliced else v

    op = on_test_device(lambda v, a, *i: hilt_kernels.ema_depth_scan(
        cut(v), a, init=i[0] if i else None, return_all=return_all, backend="triton"))
    ref = lambda v, a, *i: naive.ema_depth_scan(cut(v), a, init=i[0] if i else None, return_all=return_all)  # noqa: E731
    names = ("values", "alpha_logits", "init")[: len(masters)]
    ran = run_every_kept_config(monkeypatch, checker(op, ref, masters, torch.float32, names, 1e-4, 1e-4))
    if shape == (3, 4100):
        assert {dict(k)["BLOCK"] for k in ran["_ema_fwd_kernel"]} == {512, 1024, 2048, 4096}
