"""Registration of each backend's forward and backward as private ``torch.library`` custom ops.

For an op with short name ``bla`` this defines, for every backend, ``hilt::bla_fwd_<backend>`` and
``hilt::bla_bwd_<backend>`` with fake (meta) implementations, and connects them with
``register_autograd``: the backward of ``bla_fwd_triton`` is ``bla_bwd_triton`` — the backward runs
on the forward's backend. The implementations import the backend module on first call, so defining
the ops costs nothing and does not import triton.
"""

from __future__ import annotations

from typing import Callable

import torch

from .dispatch import BACKENDS, load_impl


def register_family(
    short: str,
    op: str,
    fwd_schema: str,
    bwd_schema: str,
    fwd_fake: Callable,
    bwd_fake: Callable,
    setup_context: Callable,
    make_backward: Callable[[Callable], Callable],
) -> dict[str, Callable]:
    """Define the custom ops of every backend; returns ``{backend: forward op}``.

    ``make_backward(bwd_op)`` returns the autograd backward ``(ctx, *grads) -> grads of the inputs``
    that calls ``bwd_op`` (the same backend's backward custom op).
    """
    forwards = {}
    for backend in BACKENDS:

        def fwd_impl(*args, _b=backend):
            return load_impl(op, _b).forward(*args)

        def bwd_impl(*args, _b=backend):
            return load_impl(op, _b).backward(*args)

        fwd = torch.library.custom_op(f"hilt::{short}_fwd_{backend}", fwd_impl, mutates_args=(), schema=fwd_schema)
        bwd = torch.library.custom_op(f"hilt::{short}_bwd_{backend}", bwd_impl, mutates_args=(), schema=bwd_schema)
        fwd.register_fake(fwd_fake)
        bwd.register_fake(bwd_fake)
        fwd.register_autograd(make_backward(bwd), setup_context=setup_context)
        forwards[backend] = fwd
    return forwards
