"""GPU-only checks of the triton backend: realistic shapes, bf16, tile sizes the interpreter does not
enforce, and torch.compile of the triton ops. All skip without CUDA (the CPU runs the same kernels
through the interpreter in the per-op tests, at tiny shapes)."""

from __future__ import annotations

import pytest
import torch

import hilt_kernels
from tests.conftest import HAS_CUDA, assert_close
from tests.ops.kept_configs import run_every_kept_config

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU-only triton tests)")

TOL = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2), torch.float32: (2e-3, 2e-3)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _grads(fn, xs):
    """Output and input gradients under one fixed fp32 random output gradient (the same for every dtype)."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
    out.backward(g.to(out.dtype))
    return out, [x.grad for x in xs]


def _compare(fn_triton, fn_ref, xs, dtype, name):
    """The triton op in ``dtype`` against the reference op in fp32 on the same (rounded) inputs."""
    atol, rtol = TOL[dtype]
    out, grads = _grads(fn_triton, xs)
    out_r, grads_r = _grads(fn_ref, [x.float() for x in xs])
    assert_close(out, out_r, atol, rtol, f"{name} out")
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        assert_close(g, gr, atol * 2, rtol * 2, f"{name} grad {i}")


# (dtype, block_size, head_dim, causal): both kernel paths (whole blocks packed per tile; FA2-style tiles
# within a block), padded head dims, every dtype — few enough autotune keys for the GPU suite's time budget.
BLA_CASES = [
    (torch.bfloat16, 8, 64, True),
    (torch.float16, 16, 80, False),
    (torch.bfloat16, 32, 128, True),
    (torch.bfloat16, 64, 64, False),
    (torch.float16, 128, 64, True),
    (torch.bfloat16, 256, 32, True),
    (torch.float32, 16, 64, True),
    (torch.float32, 128, 128, False),
]


@pytest.mark.parametrize("dtype, block_size, head_dim, causal", BLA_CASES,
                         ids=[f"{str(c[0])[6:]}-b{c[1]}-D{c[2]}-{'causal' if c[3] else 'full'}" for c in BLA_CASES])
def test_block_local_attention_large(dtype, block_size, head_dim, causal):
    torch.manual_seed(0)
    B, T, H = 2, 1000, 4  # T not a multiple of any block size
    q, k, v = (torch.randn(B, T, H, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.rand(B, T, device="cuda") < 0.1
    mask[0, :block_size] = True  # a fully padded block
    kw = dict(causal=causal, key_padding_mask=mask)
    _compare(lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, block_size, backend="triton", **kw),
             lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, block_size, backend="reference", **kw),
             [q, k, v], dtype, f"bla b={block_size} D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "heads"])
def test_attention_pool_large(dtype, shared):
    torch.manual_seed(0)
    B, T, H, C = 2, 1000, 8, 768
    scores = torch.randn(B, T, H, device="cuda", dtype=dtype)
    values = torch.randn((B, T, C) if shared else (B, T, H, 64), device="cuda", dtype=dtype)
    mask = torch.rand(B, T, device="cuda") < 0.1
    _compare(lambda s, v: hilt_kernels.attention_pool(s, v, 8, key_padding_mask=mask, backend="triton"),
             lambda s, v: hilt_kernels.attention_pool(s, v, 8, key_padding_mask=mask, backend="reference"),
             [scores, values], dtype, "apool")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_window2_attention_large(dtype, causal):
    torch.manual_seed(0)
    qkv = torch.randn(4, 2, 2048, 3, 2, 64, device="cuda", dtype=dtype)
    _compare(lambda x: hilt_kernels.window2_attention(*x.unbind(3), causal=causal, backend="triton"),
             lambda x: hilt_kernels.window2_attention(*x.unbind(3), causal=causal, backend="reference"),
             [qkv], dtype, "w2a")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_channel", [True, False])
def test_ema_depth_scan_large(dtype, per_channel):
    torch.manual_seed(0)
    values = torch.randn(12, 4, 1000, 128, device="cuda", dtype=dtype)
    alpha = torch.randn((12, 128) if per_channel else (12,), device="cuda")
    init = torch.randn(128, device="cuda", dtype=dtype)
    _compare(lambda v, a, i: hilt_kernels.ema_depth_scan(v, a, init=i, backend="triton"),
             lambda v, a, i: hilt_kernels.ema_depth_scan(v, a.float(), init=i, backend="reference"),
             [values, alpha, init], dtype, "ema")


@pytest.mark.parametrize("op", ["bla", "apool", "w2a", "ema"])
def test_compile_fullgraph_triton(op):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    fns = {
        "bla": (lambda q, k, v: hilt_kernels.block_local_attention(q, k, v, 16, backend="triton"),
                [torch.randn(2, 256, 4, 64, device=dev, dtype=dt) for _ in range(3)]),
        "apool": (lambda s, v: hilt_kernels.attention_pool(s, v, 8, backend="triton"),
                  [torch.randn(2, 256, 4, device=dev, dtype=dt), torch.randn(2, 256, 128, device=dev, dtype=dt)]),
        "w2a": (lambda q, k, v: hilt_kernels.window2_attention(q, k, v, backend="triton"),
                [torch.randn(2, 2, 256, 2, 64, device=dev, dtype=dt) for _ in range(3)]),
        "ema": (lambda v, a: hilt_kernels.ema_depth_scan(v, a, backend="triton"),
                [torch.randn(6, 2, 256, 64, device=dev, dtype=dt), torch.randn(6, device=dev)]),
    }
    fn, xs = fns[op]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a).float().square().sum(), fullgraph=True)
    a = [x.detach().clone().requires_grad_() for x in xs]
    b = [x.detach().clone().requires_grad_() for x in xs]
    compiled(*a).backward()
    fn(*b).float().square().sum().backward()
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(x.grad, y.grad, 1e-2, 1e-2, f"{op} compiled grad {i}")


# Every kept config (num_warps / num_stages included: they matter on a GPU) at representative shapes, one
# test per op. The rest of the GPU suite runs with HILT_TRITON_FIXED_CONFIG=1 (first kept config only).
ALL_CONFIG_CASES = {
    "bla": [(torch.bfloat16, 64, 64), (torch.bfloat16, 256, 128), (torch.float32, 32, 64), (torch.float32, 128, 128)],
    "apool": [(torch.bfloat16, 8, True), (torch.float32, 128, False)],
    "w2a": [(torch.bfloat16, 64), (torch.float32, 128)],
    "ema": [(torch.bfloat16, False), (torch.float32, True)],
}


@pytest.mark.parametrize("op", list(ALL_CONFIG_CASES))
def test_every_kept_config_on_gpu(monkeypatch, op):
    torch.manual_seed(0)
    for case in ALL_CONFIG_CASES[op]:
        dtype = case[0]
        if op == "bla":
            _, b, D = case
            xs = [torch.randn(2, 4 * b + 7, 2, D, device="cuda", dtype=dtype) for _ in range(3)]
            mask = torch.rand(2, 4 * b + 7, device="cuda") < 0.1
            fns = [lambda q, k, v, be: hilt_kernels.block_local_attention(q, k, v, b, key_padding_mask=mask, backend=be)]
        elif op == "apool":
            _, b, shared = case
            xs = [torch.randn(2, 4 * b + 3, 8, device="cuda", dtype=dtype),
                  torch.randn((2, 4 * b + 3, 256) if shared else (2, 4 * b + 3, 8, 64), device="cuda", dtype=dtype)]
            fns = [lambda s, v, be: hilt_kernels.attention_pool(s, v, b, backend=be)]
        elif op == "w2a":
            _, D = case
            xs = [torch.randn(2, 2, 300, 4, D, device="cuda", dtype=dtype) for _ in range(3)]
            fns = [lambda q, k, v, be: hilt_kernels.window2_attention(q, k, v, backend=be)]
        else:
            _, per_channel = case
            xs = [torch.randn(6, 3, 700, 128, device="cuda", dtype=dtype),
                  torch.randn((6, 128) if per_channel else (6,), device="cuda")]
            fns = [lambda v, a, be: hilt_kernels.ema_depth_scan(v, a, backend=be)]
        fn = fns[0]
        run_every_kept_config(monkeypatch, lambda: _compare(lambda *a: fn(*a, "triton"), lambda *a: fn(*a, "reference"),
                                                            xs, dtype, f"{op} {case}"), tiles_only=False)
