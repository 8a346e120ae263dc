"""Backend choice for the four ops.

* ``backend="reference" | "triton" | "cuda"`` is a demand: if that backend cannot run the call, a
  :class:`BackendUnavailableError` lists every reason why.
* ``HILT_BACKEND=<name>`` is a preference: if it cannot run the call, hilt warns once (per op,
  backend and reason) and falls back to the automatic choice.
* Automatic: CPU/MPS tensors → ``reference``; CUDA tensors → ``triton`` when it is importable and
  supports the case, else ``reference``. ``cuda`` joins the automatic choice only for the ops in
  :data:`CUDA_IN_AUTO`, whose GPU tests were recorded passing and which measured faster than triton.

The choice is made in Python **before** any custom op is called, so ``backend="triton"`` also runs
on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

__all__ = [
    "BACKENDS",
    "OPS",
    "CUDA_IN_AUTO",
    "BackendUnavailableError",
    "backend_reasons",
    "choose_backend",
    "load_impl",
    "triton_status",
    "cuda_status",
]

BACKENDS = ("reference", "triton", "cuda")
OPS = ("block_local_attention", "attention_pool", "window2_attention", "ema_depth_scan")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# op -> where and when the cuda backend was recorded passing its GPU tests and faster than triton.
# Empty: no GPU run of the CUDA kernels has been recorded yet.
CUDA_IN_AUTO: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """A demanded backend cannot run this call; the message lists every reason."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when triton can run the kernels, else why not: triton does not import, or (under
    ``TRITON_INTERPRET=1``) its interpreter cannot run loops with runtime bounds, which is the case
    for triton < 3.8 with numpy >= 2.4 (triton-lang/triton#9171, fixed in triton 3.8)."""
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    if interpreting():
        import numpy

        if _version(triton.__version__) < (3, 8) and _version(numpy.__version__) >= (2, 4):
            from hilt_kernels.triton._probe import runtime_loop_works

            if not runtime_loop_works():  # unless something (a test shim) fixed the interpreter
                return (
                    f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run loops with "
                    f"runtime bounds under numpy {numpy.__version__} (triton-lang/triton#9171, fixed in "
                    "triton 3.8): install triton>=3.8 or numpy<2.4 to run the triton kernels on the CPU"
                )
    return None


def cuda_status() -> str | None:
    """None when the compiled CUDA library loads, else why not."""
    from hilt_kernels.cuda import unavailable_reason

    return unavailable_reason()


@functools.lru_cache(maxsize=None)
def _load(op: str, backend: str) -> ModuleType | str:
    try:
        return importlib.import_module(f"hilt_kernels.{backend}.{op}")
    except Exception as e:
        return f"hilt_kernels.{backend}.{op} failed to import ({type(e).__name__}: {e})"


def load_impl(op: str, backend: str) -> ModuleType:
    """The module holding ``forward``/``backward`` of ``op`` for ``backend`` (imported on first use)."""
    mod = _load(op, backend)
    if isinstance(mod, str):
        raise BackendUnavailableError(mod)
    return mod


def backend_reasons(op: str, backend: str, tensors: tuple[torch.Tensor, ...], args: tuple) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` on these inputs (empty: it can).

    ``tensors`` are the floating-point inputs; ``args`` the backend forward's arguments.
    """
    if backend == "reference":
        return []
    reasons: list[str] = []
    device = tensors[0].device.type
    status = triton_status() if backend == "triton" else cuda_status()
    if status:
        reasons.append(status)
    if device == "cuda":
        pass
    elif backend == "triton" and device == "cpu":
        if not interpreting():
            reasons.append(
                "the tensors are on the CPU and TRITON_INTERPRET=1 is not set "
                "(triton kernels need CUDA tensors, or the interpreter, set before importing triton)"
            )
    else:
        reasons.append(f"the {backend} kernels need CUDA tensors, got {device} tensors")
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in KERNEL_DTYPES})
    if bad:
        reasons.append(f"dtype {', '.join(bad)} is not supported (float16, bfloat16, float32)")
    if not status:
        mod = _load(op, backend)
        if isinstance(mod, str):
            reasons.append(mod)
        else:
            reasons.extend(mod.unsupported(*args))
    return reasons


_warned: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _auto(op: str, tensors, args) -> str:
    if tensors[0].device.type != "cuda":
        return "reference"
    if op in CUDA_IN_AUTO and not backend_reasons(op, "cuda", tensors, args):
        return "cuda"
    if not backend_reasons(op, "triton", tensors, args):
        return "triton"
    return "reference"


def choose_backend(op: str, backend: str | None, tensors: tuple[torch.Tensor, ...], args: tuple) -> str:
    """The backend that runs this call (see the module docstring for the rules)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        reasons = backend_reasons(op, backend, tensors, args)
        if reasons:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run this call:\n  - " + "\n  - ".join(reasons)
            )
        return backend
    preferred = os.environ.get("HILT_BACKEND", "").strip()
    if preferred and preferred != "auto":
        if preferred not in BACKENDS:
            _warn_once(("bad-env", preferred), f"HILT_BACKEND={preferred!r} is not one of {BACKENDS}; ignoring it")
        else:
            reasons = backend_reasons(op, preferred, tensors, args)
            if not reasons:
                return preferred
            fallback = _auto(op, tensors, args)
            _warn_once(
                (op, preferred, tuple(reasons)),
                f"{op}: HILT_BACKEND={preferred!r} cannot run this call, using {fallback!r}:\n  - "
                + "\n  - ".join(reasons),
            )
            return fallback
    return _auto(op, tensors, args)
