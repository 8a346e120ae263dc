"""Timing helpers shared by the benchmarks: interleaved rounds, medians, a markdown table."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, min_time: float = 0.05,
                     device: str = "cpu") -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each callable, measured in interleaved rounds.

    Every round times each provider once (repeating it until ``min_time`` seconds have passed), so
    slow drifts of a noisy machine hit every provider alike — the ratios are measured side by side.
    """
    for fn in fns.values():  # warm-up (and compile, for compiled providers)
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            _sync(device)
            while True:
                fn()
                n += 1
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            samples[name].append(elapsed / n * 1e3)
    return {
        k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in samples.items()
    }


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
