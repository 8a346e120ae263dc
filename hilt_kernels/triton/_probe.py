"""Can this triton interpreter run a loop whose bounds are runtime values?

triton < 3.8 with numpy >= 2.4 cannot (triton-lang/triton#9171: ``int()`` of a 1-element array),
and every hilt triton kernel has such loops. :func:`runtime_loop_works` runs a tiny kernel with one
on the CPU (only call it with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _runtime_loop(X, n, BLOCK: tl.constexpr):
    # sums rows 0, 2, ... of X (n rows of BLOCK) into row 0: a loop with a runtime bound and step
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, 2):
        acc += tl.load(X + i * BLOCK + tl.arange(0, BLOCK))
    tl.store(X + tl.arange(0, BLOCK), acc)


def runtime_loop_works() -> bool:
    """True when the interpreter runs ``_runtime_loop`` correctly on a CPU tensor."""
    x = torch.ones(5, 4)
    try:
        _runtime_loop[(1,)](x, 5, 4)
    except Exception:
        return False
    return bool(torch.all(x[0] == 3.0))
