"""``python -m hilt.info`` / ``hilt info``: versions, devices, and what each backend can run here."""

from __future__ import annotations

import platform
import sys

import torch

from hilt_kernels import __version__
from hilt_kernels.dispatch import BACKENDS, CUDA_IN_AUTO, OPS, cuda_status, interpreting, triton_status

# What each backend supports, for the table (the dispatcher checks the same limits per call).
SUPPORT = {
    "reference": ("fp16 bf16 fp32 fp64", "any", "any", "CPU, CUDA, MPS"),
    "triton": ("fp16 bf16 fp32", "1..128 (bla); any (others)", "any", "CUDA (CPU under TRITON_INTERPRET=1)"),
    "cuda": ("fp16 bf16 fp32", "1..128 (bla); <=256/512 (apool)", "any", "CUDA (sm_80, sm_90 builds)"),
}


def backend_availability() -> dict[str, str | None]:
    """{backend: None if usable on this machine, else why not} (device-independent part)."""
    triton = triton_status()
    if triton is None and not torch.cuda.is_available() and not interpreting():
        triton = "importable, but no CUDA device here and TRITON_INTERPRET=1 is not set (CPU tensors need the interpreter)"
    return {"reference": None, "triton": triton, "cuda": cuda_status()}


def report() -> str:
    lines = [f"hilt {__version__}", f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run on the CPU)" if interpreting() else ""))
    except Exception:
        lines.append("triton not installed")
    lines.append(f"CUDA (torch build) {torch.version.cuda or 'none: CPU-only torch build'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("  no CUDA device")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"MPS {'available' if mps is not None and mps.is_available() else 'not available'}")
    lines.append("")
    lines.append("backends:")
    for name, why in backend_availability().items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    from hilt_kernels.cuda._lib import describe as _cuda_describe  # the CUDA library: build, runtime, driver

    lines += ["  " + x for x in _cuda_describe(torch.version.cuda)]
    from hilt_kernels.cpu._lib import describe as _cpu_describe  # the CPU library (fused decoding steps)

    lines += ["  " + x for x in _cpu_describe()]
    lines.append("")
    lines.append(f"  {'backend':<10} {'dtypes':<20} {'head dims':<34} {'block sizes':<14} devices")
    for name in BACKENDS:
        d, h, b, dev = SUPPORT[name]
        lines.append(f"  {name:<10} {d:<20} {h:<34} {b:<14} {dev}")
    lines.append("")
    lines.append("automatic choice: CPU/MPS -> reference; CUDA -> triton when it supports the case, else reference")
    auto = ", ".join(f"{op} ({where})" for op, where in CUDA_IN_AUTO.items()) or "none yet (no recorded GPU run)"
    lines.append(f"cuda backend in the automatic choice for: {auto}")
    lines.append(f"ops: {', '.join(OPS)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="hilt info", description=__doc__).parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
