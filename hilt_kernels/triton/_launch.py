"""How every hilt triton kernel is launched: autotuning, the one fixed-config hook, the device guard.

A kernel wrapped with :class:`Tuned` keeps its module-level config list and prune function. On a GPU
it is ``triton.autotune``d over the configs the pruner keeps. Under ``TRITON_INTERPRET=1`` (the
interpreter cannot time configs) or with ``HILT_TRITON_FIXED_CONFIG=1`` (a GPU test run that must
not compile every config) a launch runs the FIRST config the pruner keeps: the same pruner, the same
kernel source, the same runtime-bound loops as an autotuned GPU launch. :func:`fixed_config` is the
only place in ``hilt_kernels.triton`` that looks at the interpreter.

Test hooks (module attributes, patched by tests only):

* ``pick``: ``None`` or ``callable(kernel_name, kept_configs) -> Config``; when set, every tuned
  launch runs the config it returns (one of the kept ones), on a GPU too.
* ``records``: ``None`` or a list; every launch appends a :class:`Launch` (kernel name, config run,
  configs kept, grid launched).

Every launch runs under ``torch.cuda.device(<device of the first tensor argument>)``: triton launches
on the current CUDA device, not on the tensors' device. The launched grid is checked against the
hardware limits (x < 2**31, y and z <= 65,535) before anything runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import triton

__all__ = ["Tuned", "launch", "fixed_config", "device_guard", "Launch", "GRID_X_MAX", "GRID_YZ_MAX"]

GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535

pick = None  # test hook, see the module docstring
records = None  # test hook, see the module docstring


@dataclass
class Launch:
    """One kernel launch as seen by the ``records`` hook."""

    name: str
    config: triton.Config | None  # None: autotuned (the autotuner chose) or an untuned kernel
    kept: list = field(default_factory=list)
    grid: tuple = ()
    device: torch.device | None = None


def fixed_config() -> bool:
    """True when tuned kernels run their first kept config instead of autotuning."""
    return os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("HILT_TRITON_FIXED_CONFIG") == "1"


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("a triton launch needs at least one tensor argument")


def check_grid(grid, name: str) -> tuple:
    """The grid as a 3-tuple of ints, or a ValueError naming the kernel and the axis over its limit."""
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    if g[0] > GRID_X_MAX or g[1] > GRID_YZ_MAX or g[2] > GRID_YZ_MAX:
        raise ValueError(f"{name}: grid {g} exceeds the CUDA limits (x <= {GRID_X_MAX}, y and z <= {GRID_YZ_MAX})")
    return g


def _grid_recorder(grid, name, launched):
    def grid_fn(meta):
        g = check_grid(grid(meta) if callable(grid) else grid, name)
        launched.append(g)
        return g

    return grid_fn


def _execute(fn, grid_fn, args, kwargs):
    """The triton call itself (tests may replace it to intercept launches without running them)."""
    fn[grid_fn](*args, **kwargs)


def _record(name, config, kept, launched, device):
    if records is not None:
        records.append(Launch(name, config, list(kept), launched[-1] if launched else (), device))


class Tuned:
    """A ``@triton.jit`` kernel with its config list and prune function (see the module docstring).

    ``prune(configs, named_args, **kwargs)`` follows ``triton.autotune``'s ``early_config_prune``:
    ``named_args`` are the positional arguments by name, ``kwargs`` the keyword (constexpr) ones.
    """

    def __init__(self, fn, configs, key, prune):
        self.fn = fn
        self.name = fn.__name__
        self.configs = list(configs)
        self.prune = prune
        self.autotuned = triton.autotune(configs=self.configs, key=key,
                                         prune_configs_by={"early_config_prune": prune})(fn)

    def kept(self, args, kwargs) -> list:
        """The configs the pruner keeps for a launch with these arguments (runs on the CPU)."""
        kept = list(self.prune(self.configs, dict(zip(self.fn.arg_names, args)), **kwargs))
        if not kept:
            raise RuntimeError(f"{self.name}: the pruner kept no config")
        return kept

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs) -> tuple:
        """Launch; returns the grid actually launched (x, y, z)."""
        launched: list = []
        grid_fn = _grid_recorder(grid, self.name, launched)
        device = _device_of(args)
        kept: list = []
        config = None
        with device_guard(device):
            if pick is not None or fixed_config():
                kept = self.kept(args, kwargs)
                config = pick(self.name, kept) if pick is not None else kept[0]
                _execute(self.fn, grid_fn, args, {**kwargs, **config.all_kwargs()})
            else:
                _execute(self.autotuned, grid_fn, args, kwargs)
        _record(self.name, config, kept, launched, device)
        return launched[-1]


def launch(kernel, grid, *args, **kwargs) -> tuple:
    """Launch an untuned kernel under the device guard; returns the grid launched."""
    launched: list = []
    device = _device_of(args)
    with device_guard(device):
        _execute(kernel, _grid_recorder(grid, kernel.__name__, launched), args, kwargs)
    _record(kernel.__name__, None, [], launched, device)
    return launched[-1]
