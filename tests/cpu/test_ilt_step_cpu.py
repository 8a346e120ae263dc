"""The CPU library's fused ILT decoding step (csrc/cpu/ilt_step.cpp via hilt_kernels.cpu.ilt_step)
against the module's forward (PyTorch ops, an independent formulation), on odd shapes; its C ABI's
argument checks; that InterLayerTransformer.step and HILT's decoding take it exactly when they should;
and the same cases under AddressSanitizer + UndefinedBehaviorSanitizer."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from hilt.nn import InterLayerTransformer
from hilt_kernels.cpu import _lib
from hilt_kernels.cpu import ilt_step as cpu_ilt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (d_model, ilt_dim, heads, layers, d_ff): odd sizes, a head dim of 1, no window layer, one MLP unit,
# sizes across the kernel's 64-column chunks
SHAPES = [(48, 32, 2, 2, None), (37, 12, 3, 1, 5), (5, 4, 4, 3, 1), (130, 66, 2, 2, 131), (16, 8, 1, 0, None)]
ATOL, RTOL = 2e-5, 1e-5  # fp32 against the fp32 forward, for outputs of magnitude ~1


def assert_fp32_accurate(got, ref64, ref32, what=""):
    """``got`` (fp32) is as close to the fp64 forward ``ref64`` as PyTorch's fp32 forward ``ref32`` is, up
    to a factor 4 (different summation orders), plus 1e-6 of the output's magnitude."""
    mag = max(1.0, ref64.abs().max().item())
    err, err32 = (got.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert err <= 4 * err32 + 1e-6 * mag, f"{what}: max error {err:.3g} vs fp64, PyTorch fp32's {err32:.3g} (|ref| {mag:.3g})"


def make_ilt(d, I, H, L, F, causal=True, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ilt = InterLayerTransformer(d, ilt_dim=I, n_heads=H, n_layers=L, d_ff=F, dropout=0.0, causal=causal,
                                bias=bias, dtype=dtype).eval()
    with torch.no_grad():  # larger than the init, so every part of the ILT moves the result
        for p in ilt.parameters():
            p.normal_(0, 0.3)
        for m in ilt.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(1.0)
    return ilt


def raw_step(lib, packed, prev, cur, base, out, scale=None, n=None):
    """hilt_ilt_step_f32 called directly (any number of rows, caller's output buffer)."""
    d = packed.d
    return lib.hilt_ilt_step_f32(prev.data_ptr(), cur.data_ptr(), None if base is None else base.data_ptr(),
                                 out.data_ptr(), None if scale is None else scale.data_ptr(),
                                 packed.weights.data_ptr(), prev.numel() // d if n is None else n, d, packed.I,
                                 packed.H, packed.F, packed.L, int(packed.causal))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}-I{}-H{}-L{}-F{}".format(*s))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_step_matches_forward(cpu_library, shape, causal, bias):
    ilt = make_ilt(*shape, causal=causal, bias=bias)
    packed = cpu_ilt.pack(ilt)
    assert packed is not None, cpu_ilt.unavailable_reason(ilt)
    packed.max_tokens = 16
    ilt64 = copy.deepcopy(ilt).double()
    d = shape[0]
    scale = torch.tensor(0.37)
    with torch.no_grad():
        for lead in [(1, 1), (1, 3), (2, 4), (8,), (2, 8)]:  # 1..16 tokens
            prev, cur = torch.randn(*lead, d), torch.randn(*lead, d)
            ref32 = ilt(prev.reshape(-1, 1, d), cur.reshape(-1, 1, d)).reshape(*lead, d)
            ref64 = ilt64(prev.reshape(-1, 1, d).double(), cur.reshape(-1, 1, d).double()).reshape(*lead, d)
            assert_fp32_accurate(packed(prev, cur), ref64, ref32, f"modulation {lead}")
            got = packed(prev, cur, cur, scale)
            assert_fp32_accurate(got, cur + 0.37 * ref64, cur + 0.37 * ref32, f"base + scale * modulation {lead}")
            assert got.data_ptr() != cur.data_ptr()  # a new tensor; cur untouched


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 40])
def test_every_row_written_across_tiles(cpu_library, n):
    """Many rows (tiles of 8 tokens and a partial one) into NaN-filled outputs, with and without a base;
    ``out`` aliasing ``cur`` (in place, as a caller may do) gives the same."""
    ilt = make_ilt(37, 12, 3, 2, 29, seed=n)
    packed = cpu_ilt.pack(ilt)
    prev, cur = torch.randn(n, 37), torch.randn(n, 37)
    scale = torch.tensor(0.5)
    with torch.no_grad():
        ref = ilt(prev[:, None], cur[:, None])[:, 0]
    out = torch.full((n, 37), float("nan"))
    assert raw_step(cpu_library, packed, prev, cur, None, out) == 0
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    out.fill_(float("nan"))
    assert raw_step(cpu_library, packed, prev, cur, cur, out, scale) == 0
    torch.testing.assert_close(out, cur + 0.5 * ref, atol=ATOL, rtol=RTOL)
    inplace = cur.clone()
    assert raw_step(cpu_library, packed, prev, inplace, inplace, inplace, scale) == 0
    torch.testing.assert_close(inplace, out, atol=0, rtol=0)
    assert raw_step(cpu_library, packed, prev, cur, None, out, n=0) == 0  # no rows: nothing to do


def test_c_abi_rejects_bad_sizes(cpu_library):
    ilt = make_ilt(16, 8, 2, 1, None)
    packed = cpu_ilt.pack(ilt)
    x = torch.randn(2, 16)
    out = torch.full((2, 16), 7.0)
    f = cpu_library.hilt_ilt_step_f32
    w = packed.weights.data_ptr()
    for args in [(2, 16, 8, 3, 32, 1),   # heads do not divide ilt_dim
                 (2, 0, 8, 2, 32, 1),    # d_model 0
                 (-1, 16, 8, 2, 32, 1),  # negative rows
                 (2, 16, 8, 2, 0, 1),    # d_ff 0
                 (2, 16, 8, 2, 32, -1)]:  # negative layers
        assert f(x.data_ptr(), x.data_ptr(), None, out.data_ptr(), None, w, *args, 1) == -1, args
    assert f(x.data_ptr(), None, None, out.data_ptr(), None, w, 2, 16, 8, 2, 32, 1, 1) == -1  # NULL input
    assert torch.equal(out, torch.full((2, 16), 7.0))  # nothing written
    assert cpu_library.hilt_ilt_weights_floats(16, 8, 0, 1) == -1
    # the C layout's size equals the Python packer's, over shapes
    for d, I, H, L, F in SHAPES:
        p = cpu_ilt.pack(make_ilt(d, I, H, L, F))
        assert p.weights.numel() == cpu_library.hilt_ilt_weights_floats(d, I, p.F, L)


def test_packed_call_rejects_what_it_cannot_run(cpu_library):
    packed = cpu_ilt.pack(make_ilt(16, 8, 2, 1, None))
    x = torch.randn(3, 16)
    assert packed.accepts(x, x, x)
    cases = {"fp64": (x.double(), x.double(), None), "wrong width": (torch.randn(3, 15),) * 2 + (None,),
             "shape mismatch": (x, torch.randn(4, 16), None), "non-contiguous": (x.t().contiguous().t(), x, None),
             "too many rows": (torch.randn(cpu_ilt.max_tokens() + 1, 16),) * 2 + (None,),
             "base mismatch": (x, x, torch.randn(2, 16))}
    for name, (p, c, b) in cases.items():
        assert not packed.accepts(p, c, b), name
        with pytest.raises(ValueError, match="contiguous fp32 CPU tensors of one shape"):
            packed(p, c, b)


def test_pack_refuses_other_dtypes_and_the_switch(cpu_library, monkeypatch):
    assert "fp32 only" in cpu_ilt.unavailable_reason(make_ilt(16, 8, 2, 1, None, dtype=torch.float64))
    assert cpu_ilt.pack(make_ilt(16, 8, 2, 1, None, dtype=torch.float64)) is None
    monkeypatch.setenv("HILT_CPU_KERNELS", "0")
    assert "HILT_CPU_KERNELS=0" in cpu_ilt.unavailable_reason(make_ilt(16, 8, 2, 1, None))
    assert make_ilt(16, 8, 2, 1, None).step_weights().cpu is None


def test_unbuilt_library_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("HILT_CPU_LIBRARY", str(tmp_path / "missing.so"))
    lib, why = _lib.load()
    assert lib is None and "is not built" in why and "missing.so" in why
    bogus = tmp_path / "bogus.so"
    bogus.write_text("not a library")
    monkeypatch.setenv("HILT_CPU_LIBRARY", str(bogus))
    lib, why = _lib.load()
    assert lib is None and "failed to load" in why


def _count_calls(monkeypatch):
    calls = []
    orig = cpu_ilt.PackedILT.run

    def counting(self, *a, **k):
        calls.append(a[0].shape)
        return orig(self, *a, **k)

    monkeypatch.setattr(cpu_ilt.PackedILT, "run", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_step_takes_the_library_exactly_when_it_can(cpu_library, monkeypatch, dtype):
    """fp32, <= MAX_TOKENS tokens, no grad: the library; more tokens, another dtype, or gradients: the
    PyTorch paths. Every path equals the forward."""
    calls = _count_calls(monkeypatch)
    ilt = make_ilt(40, 24, 3, 2, None, dtype=dtype)
    w = ilt.step_weights()
    assert (w.cpu is not None) == (dtype == torch.float32)
    scale = torch.tensor(0.3, dtype=dtype)
    tol = dict(atol=ATOL, rtol=RTOL) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    expect = 0
    for lead in [(1, 1), (2, 4), (3, 6), (1, 1)]:  # 18 tokens > MAX_TOKENS
        prev, cur = torch.randn(*lead, 40, dtype=dtype), torch.randn(*lead, 40, dtype=dtype)
        with torch.no_grad():
            ref = ilt(prev, cur)
            torch.testing.assert_close(ilt.step(prev, cur, out=cur, scale=scale, weights=w), cur + 0.3 * ref, **tol)
        expect += dtype == torch.float32 and prev.numel() // 40 <= cpu_ilt.max_tokens()
        assert len(calls) == expect, lead
        out = ilt.step(prev, cur, weights=w)  # gradients enabled: the autograd path
        assert out.requires_grad and len(calls) == expect
        torch.testing.assert_close(out.detach(), ref, **tol)


def test_hilt_decoding_uses_the_library_and_matches_without_it(cpu_library, monkeypatch):
    from tests.generation.helpers import hilt_model

    m = hilt_model("rope")
    with torch.no_grad():
        for ilt in m.ilts:  # make the modulation matter
            for p in ilt.parameters():
                p.normal_(0, 0.2)
        m.set_ilt_scale(0.5)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with torch.no_grad():
        full = m(ids).logits
    calls = _count_calls(monkeypatch)

    def decode():
        cache = m.init_cache(1)
        with torch.no_grad():
            logits = [m.forward_step(ids[:, :1], cache).logits]
            for t in range(1, ids.shape[1]):
                logits.append(m.forward_step(ids[:, t:t + 1], cache).logits)
        return torch.cat(logits, 1)

    with_lib = decode()
    assert len(calls) == (m.config.n_layers - 1) * ids.shape[1]
    torch.testing.assert_close(with_lib, full, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("HILT_CPU_KERNELS", "0")
    without = decode()
    assert len(calls) == (m.config.n_layers - 1) * ids.shape[1]  # no new library calls
    torch.testing.assert_close(without, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_lib, without, atol=1e-5, rtol=1e-5)


SANITIZED_CASES = r"""
import torch
from tests.cpu.test_ilt_step_cpu import SHAPES, make_ilt, raw_step, ATOL, RTOL
from hilt_kernels.cpu import _lib, ilt_step as cpu_ilt
lib, why = _lib.load()
assert lib is not None, why
for shape in SHAPES:
    for causal in (True, False):
        ilt = make_ilt(*shape, causal=causal)
        p = cpu_ilt.pack(ilt)
        d = shape[0]
        for n in (1, 8, 17):
            prev, cur = torch.randn(n, d), torch.randn(n, d)
            with torch.no_grad():
                ref = ilt(prev[:, None], cur[:, None])[:, 0]
            out = torch.full((n, d), float("nan"))
            s = torch.tensor(0.25)
            assert raw_step(lib, p, prev, cur, cur, out, s) == 0
            torch.testing.assert_close(out, cur + 0.25 * ref, atol=ATOL, rtol=RTOL)
print("SANITIZED-OK")
"""


def test_under_address_and_undefined_behaviour_sanitizers(cpu_library, tmp_path):
    """The library built with -fsanitize=address,undefined, run on the parity cases (1, 8 and 17 rows of
    every shape, both window modes) in a child python with the sanitizer runtime preloaded: an
    out-of-bounds read or write of any buffer, or undefined behaviour, fails it."""
    from hilt_kernels.cpu._build import find_cxx, sources
    from tests.cuda.emulator import build as emu_build

    cxx = find_cxx()
    if cxx is None or "g++" not in os.path.basename(os.path.realpath(cxx)) and "c++" not in os.path.basename(cxx):
        pytest.skip(f"the sanitizer build needs g++ (compiler here: {cxx})")
    try:
        preload = emu_build.preload("asan")
    except (RuntimeError, subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"g++ ships no AddressSanitizer runtime: {e}")
    so = tmp_path / "_hilt_cpu_asan.so"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all", *sources(), "-o", str(so)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    env = dict(os.environ, LD_PRELOAD=preload, HILT_CPU_LIBRARY=str(so), PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:detect_odr_violation=0:alloc_dealloc_mismatch=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87")
    env.pop("HILT_CPU_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", SANITIZED_CASES], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "SANITIZED-OK" in proc.stdout, (proc.returncode, proc.stdout[-2000:],
                                                                    proc.stderr[-6000:])


def test_nan_stays_in_its_token(cpu_library):
    """A NaN in one token's input makes that token's output NaN (as in the forward), and leaves the other
    tokens of the tile exact: the library's erf and layer norms do not launder NaN into numbers."""
    ilt = make_ilt(37, 12, 3, 2, 29)
    packed = cpu_ilt.pack(ilt)
    prev, cur = torch.randn(5, 37), torch.randn(5, 37)
    prev[2, 7] = float("nan")
    with torch.no_grad():
        ref = ilt(prev[:, None], cur[:, None])[:, 0]
    got = packed(prev, cur)
    assert torch.isnan(ref[2]).all() and torch.isnan(got[2]).all()
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got[keep], ref[keep], atol=ATOL, rtol=RTOL)


def test_tokens_per_call_follow_the_thread_count(cpu_library, monkeypatch):
    """The library runs one thread: with more PyTorch threads, fewer tokens per call go to it."""
    packed = cpu_ilt.pack(make_ilt(16, 8, 2, 1, None))
    for threads, limit in [(1, cpu_ilt.MAX_TOKENS), (2, cpu_ilt.MAX_TOKENS // 2), (64, 1)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert cpu_ilt.max_tokens() == limit
        assert packed.accepts(*(torch.randn(limit, 16),) * 2, None)
        assert not packed.accepts(*(torch.randn(limit + 1, 16),) * 2, None)
