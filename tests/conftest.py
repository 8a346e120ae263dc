"""Test setup shared by every test.

* Triton runs on the CPU through its interpreter when there is no GPU: TRITON_INTERPRET=1 must be set
  before triton is imported, so it is set here, before anything imports it.
* Two test-only patches of the triton interpreter (``_patch_triton_interpreter``), so that the CPU runs
  the very kernels a GPU runs: the interpreter tensor's ``__index__`` on a 1-element array (triton < 3.8
  with numpy >= 2.4 cannot ``range()`` over a runtime bound otherwise; triton-lang/triton#9171, fixed in
  3.8 by #9172), and bf16 ``tl.dot`` operands upcast to fp32 (the interpreter multiplies their raw
  uint16 bits); plus a speed-up (no re-patching of triton.language on helper calls inside a kernel).
* With CUDA present, a test that would skip because the triton or cuda backend is missing FAILS, unless
  ``HILT_ALLOW_MISSING_BACKENDS=<comma-separated names>`` allows that backend to be missing
  (:func:`skip_missing_backend`).
* ``assert_close`` reports where and by how much a comparison failed.
"""

from __future__ import annotations

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _patch_triton_interpreter() -> None:
    """Test-only fixes of the triton interpreter (see the module docstring); no-op without it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        import triton.runtime.interpreter as ti
    except Exception:  # triton not importable: the triton tests skip (or fail, see skip_missing_backend)
        return
    if not getattr(ti, "_hilt_patched", False):
        original_patch_tensor = ti._patch_lang_tensor

        def patch_tensor(tensor, scope):
            original_patch_tensor(tensor, scope)
            # int() of a (1,)-shaped array raises with numpy >= 2.4; triton 3.8+ squeezes the same way
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

        original_dot = ti.InterpreterBuilder.create_dot

        def upcast_bf16(h):
            if h.dtype == tl.bfloat16:  # stored as uint16 raw bits: widen them into fp32's top half
                data = (h.data.astype(np.uint32) << 16).view(np.float32)
                return ti.TensorHandle(data, tl.float32)
            return h

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return original_dot(self, upcast_bf16(a), upcast_bf16(b), d, input_precision, max_num_imprecise_acc)

        # Speed only: a @triton.jit helper called inside a running kernel re-patches triton.language on
        # every call (~0.5 ms each, most of the time of a loop calling helpers); the kernel's launch has
        # already patched the same module (``tl``) for hilt's helpers, so skip it for them (not for
        # triton's own jit functions, which patch ``triton.language.core`` too).
        running = [0]
        original_grid_call = ti.GridExecutor.__call__

        def grid_call(self, *args, **kwargs):
            running[0] += 1
            try:
                return original_grid_call(self, *args, **kwargs)
            finally:
                running[0] -= 1

        original_fn_call = ti.InterpretedFunction.__call__

        def fn_call(self, *args, **kwargs):
            if not running[0] or not self.fn.__module__.startswith("hilt_kernels."):
                return original_fn_call(self, *args, **kwargs)
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise ti.InterpreterError(repr(e)) from e

        ti._patch_lang_tensor = patch_tensor
        ti.InterpreterBuilder.create_dot = create_dot
        ti.GridExecutor.__call__ = grid_call
        ti.InterpretedFunction.__call__ = fn_call
        ti._hilt_patched = True


_patch_triton_interpreter()


def allowed_missing_backends() -> set[str]:
    """Backends ``HILT_ALLOW_MISSING_BACKENDS`` (comma-separated, e.g. ``triton,cuda``) lets be missing."""
    return {n.strip() for n in os.environ.get("HILT_ALLOW_MISSING_BACKENDS", "").split(",") if n.strip()}


def skip_missing_backend(name: str, reason: str, allow_module_level: bool = False, has_cuda: bool | None = None):
    """Skip a test because backend ``name`` ("triton" or "cuda") is missing -- or, with CUDA present,
    FAIL it: on a GPU machine a missing kernel backend is a broken install, not a reason to skip,
    unless ``HILT_ALLOW_MISSING_BACKENDS`` names that backend. Every skip for a missing triton or cuda
    backend goes through here."""
    has_cuda = HAS_CUDA if has_cuda is None else has_cuda
    if has_cuda and name not in allowed_missing_backends():
        pytest.fail(
            f"backend {name!r} is missing on a machine with CUDA: {reason} "
            f"(set HILT_ALLOW_MISSING_BACKENDS={name} to skip instead)",
            pytrace=False,
        )
    pytest.skip(reason, allow_module_level=allow_module_level)


def triton_usable() -> bool:
    """Triton kernels can run here: on a GPU, or on the CPU under the interpreter."""
    from hilt_kernels.dispatch import interpreting, triton_status

    return triton_status() is None and (HAS_CUDA or interpreting())


def on_test_device(fn):
    """``fn`` run on the test device: CUDA when present (tensor arguments moved there, results moved
    back to the CPU, autograd flowing through both moves), else unchanged on the CPU."""
    if not HAS_CUDA:
        return fn

    def move(x):
        return x.to("cuda") if isinstance(x, torch.Tensor) else x

    def wrapped(*args, **kwargs):
        out = fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    return wrapped


# The backends the op tests run; a test module may set its own OP_BACKENDS. "reference-math" is the
# reference backend with its fused CPU path switched off (only block_local_attention has one), so both
# of its formulations are checked on CPU.
OP_BACKENDS = ["reference", "triton"]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", getattr(metafunc.module, "OP_BACKENDS", OP_BACKENDS), indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name == "triton" and not triton_usable():
        from hilt_kernels.dispatch import triton_status

        skip_missing_backend("triton", f"triton is not usable here: {triton_status() or 'no GPU and TRITON_INTERPRET != 1'}")
    if name == "reference-math":
        import hilt_kernels.reference.block_local_attention as bla_ref

        monkeypatch.setattr(bla_ref, "FORCE_MATH", True)
        return "reference"
    return name


@pytest.fixture
def nan_fill(monkeypatch):
    """Pre-fill every freshly allocated op output with NaN, so unwritten elements fail."""
    monkeypatch.setenv("HILT_DEBUG_NAN_FILL", "1")


TOLERANCES = {
    # (atol, rtol) for an op in this dtype against the fp64 naive result
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    # 16-bit results against the same op in fp32 on the same (rounded) inputs
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """torch.allclose with a report of the worst element, the mismatch count and NaNs."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if nan_a.any() or nan_e.any():
        raise AssertionError(
            f"{name}: {int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} NaN in expected "
            f"(first NaN at {tuple(torch.nonzero(nan_a | nan_e)[0].tolist())})"
        )
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        worst = torch.nonzero(err == err.max())[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ beyond atol={atol} rtol={rtol}; "
            f"max abs error {err.max().item():.3e} at {tuple(worst)} "
            f"(actual {a[tuple(worst)].item():.6g}, expected {e[tuple(worst)].item():.6g})"
        )
