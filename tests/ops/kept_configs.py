"""Run a triton op once per kept autotune config: shared by the interpreter sweep (test_triton_configs.py)
and the GPU test of every kept config (test_triton_gpu.py)."""
from __future__ import annotations


def _tiles(c):
    return tuple(sorted(c.kwargs.items()))


def run_every_kept_config(monkeypatch, fn, tiles_only: bool = True) -> dict:
    """Call ``fn()`` (which checks its own results) once per kept-config index: the i-th call makes every
    launch run its i-th kept config (the last one once it has fewer), until every launch has run all of them.
    ``tiles_only``: configs differing only in num_warps / num_stages count as one (the interpreter ignores
    both); otherwise each config counts. Asserts that every kept config ran; returns {kernel: keys run}."""
    from hilt_kernels.triton import _launch

    key = _tiles if tiles_only else str
    state = {"i": 0, "more": False}
    ran: dict = {}
    kept_all: dict = {}

    def pick(name, kept):
        if tiles_only:  # kept configs with distinct tiles, in the pruner's order
            seen: set = set()
            kept = [c for c in kept if not (_tiles(c) in seen or seen.add(_tiles(c)))]
        kept_all.setdefault(name, set()).update(map(key, kept))
        state["more"] |= state["i"] + 1 < len(kept)
        c = kept[min(state["i"], len(kept) - 1)]
        ran.setdefault(name, set()).add(key(c))
        return c

    monkeypatch.setattr(_launch, "pick", pick)
    while True:
        state["more"] = False
        fn()
        if not state["more"]:
            break
        state["i"] += 1
    assert ran == kept_all, f"configs kept but never run: { {k: kept_all[k] - ran[k] for k in kept_all} }"
    return ran
