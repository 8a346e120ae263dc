"""Timing helpers shared by the benchmarks.

* :func:`time_interleaved` — host clock, interleaved rounds (CPU; also usable on CUDA, with a sync per call).
* :func:`time_cuda` — CUDA events around a run of calls, interleaved rounds (GPU).
* :func:`time_providers` — picks one of the two by device.
* :func:`rotating` — a callable cycling through several input copies (so caches don't flatter small sizes).
* :func:`copies_for` — how many input copies that takes for a working set.
* :func:`copy_bandwidth` — the machine's measured copy bandwidth (bytes read + written per second).
* :func:`peak_memory_mib` — peak memory of one call (CUDA only).
* :func:`environment` — device name, versions, command and date, for the JSON files.
* :func:`markdown_table`, :func:`fmt` — output.

Every timer returns ``{name: {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "rounds"}}``; the spread is
over rounds (each round's value is the mean of a run of back-to-back calls lasting at least ``min_time``).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles (ms) of per-round samples."""
    v = sorted(samples_ms)
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {"median_ms": statistics.median(v), "min_ms": v[0], "max_ms": v[-1], "q1_ms": q1, "q3_ms": q3,
            "rounds": len(v)}


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, min_time: float = 0.05,
                     device: str = "cpu", warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median and spread (ms) of each callable, measured in interleaved rounds with the host clock.

    Every round times each provider once (repeating it until ``min_time`` seconds have passed), so
    slow drifts of a noisy machine hit every provider alike — the ratios are measured side by side.
    """
    for fn in fns.values():  # warm-up (and compile, for compiled providers)
        for _ in range(warmup):
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
    return {k: summarize(v) for k, v in samples.items()}


def time_cuda(fns: dict[str, Callable[[], object]], rounds: int = 10, min_time: float = 0.02,
              warmup: int = 3, max_calls: int = 2000) -> dict[str, dict[str, float]]:
    """Like :func:`time_interleaved`, but timed with CUDA events (no host sync inside a run).

    Each provider is warmed up, then the number of back-to-back calls per run is chosen so that a run
    lasts about ``min_time`` seconds; every round times one run of each provider in turn.
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)  # ms
        calls[name] = int(min(max_calls, max(1, math.ceil(min_time * 1e3 / one))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls[name]):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / calls[name])
    return {k: {**summarize(v), "calls_per_round": calls[k]} for k, v in samples.items()}


def time_providers(fns: dict[str, Callable[[], object]], device: str, rounds: int, min_time: float,
                   warmup: int | None = None):
    """CUDA events on a GPU, the host clock elsewhere; interleaved rounds either way."""
    if not fns:
        return {}
    if device == "cuda":
        return time_cuda(fns, rounds=rounds, min_time=min_time, warmup=3 if warmup is None else warmup)
    return time_interleaved(fns, rounds=rounds, min_time=min_time, device=device,
                            warmup=2 if warmup is None else warmup)


def time_providers_safely(builders: dict[str, Callable[[], Callable[[], object]]], device: str, rounds: int,
                          min_time: float, warmup: int | None = None):
    """Like :func:`time_providers`, but each entry is a *builder* of the timed callable, and a provider whose
    building or running raises is left out and reported: returns (timings, fns, {name: reason}).

    All providers are first timed together (interleaved); if that raises, each is timed on its own."""
    fns, failed = {}, {}
    for name, build in builders.items():
        try:
            fns[name] = build()
        except Exception as e:  # noqa: BLE001 - reported, the others go on
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    try:
        return time_providers(fns, device, rounds, min_time, warmup), fns, failed
    except Exception:  # noqa: BLE001 - find the culprit: time them one by one
        pass
    timings = {}
    for name in list(fns):
        try:
            timings.update(time_providers({name: fns[name]}, device, rounds, min_time, warmup))
        except Exception as e:  # noqa: BLE001
            failed[name] = f"timing: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            del fns[name]
    return timings, fns, failed


def rotating(fn: Callable[..., object], arg_sets: Sequence[tuple]) -> Callable[[], object]:
    """A no-argument callable that calls ``fn(*arg_sets[i])`` with i cycling through the copies."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(arg_sets)
        return fn(*arg_sets[i])

    return call


@functools.lru_cache(maxsize=None)
def cache_bytes(device: str) -> int:
    """Size of the last-level cache that repeated calls could hit: L2 on a GPU, L3 (or a guess) on a CPU."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def copies_for(working_set_bytes: int, device: str, max_copies: int = 4) -> int:
    """Input copies to rotate among so that consecutive calls don't find their inputs in cache:
    1 when the working set is already over twice the cache, else enough to cover 3× the cache."""
    c = cache_bytes(device)
    if working_set_bytes >= 2 * c:
        return 1
    return int(min(max_copies, max(2, math.ceil(3 * c / max(working_set_bytes, 1)))))


def copy_bandwidth(device: str, nbytes: int | None = None, rounds: int = 5) -> dict[str, float]:
    """Measured copy bandwidth in GB/s, counting bytes read plus bytes written (``y.copy_(x)``).

    GPU: a 1 GiB device-to-device copy timed with CUDA events. CPU: a 256 MiB tensor ``copy_``
    (well past the last-level cache) timed with the host clock. The median over ``rounds``.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    fns = {"copy": lambda: y.copy_(x)}
    t = time_providers(fns, device, rounds=rounds, min_time=0.05 if device == "cuda" else 0.2)["copy"]
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    gbs = 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9
    return {"GB/s": gbs, "bytes": nbytes, "median_ms": t["median_ms"]}


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory (MiB) allocated during one call of ``fn``, above what was allocated before it (its
    outputs, saved tensors and workspace; the inputs are not counted). None off CUDA."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _git_commit() -> str | None:
    """The checkout's commit, read from .git files (no git command)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = os.path.join(root, ".git")
    try:
        if os.path.isfile(git):  # a worktree: "gitdir: <path>"
            with open(git) as f:
                git = f.read().split(":", 1)[1].strip()
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if head.startswith("ref:"):
            ref = head.split(None, 1)[1]
            path = os.path.join(git, ref)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()
            return None
        return head
    except (OSError, IndexError):
        return None


def environment(device: str, argv: Sequence[str] | None = None) -> dict[str, object]:
    """What a results file needs to be read later: device, versions, command, date."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any broken install counts as absent
        triton_version = None
    try:
        import hilt_kernels

        hilt_version = hilt_kernels.__version__
    except Exception:  # noqa: BLE001
        hilt_version = None
    argv = list(sys.argv if argv is None else argv)
    env = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "hilt": hilt_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "command": "python " + " ".join(argv),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "HILT_BACKEND": os.environ.get("HILT_BACKEND"),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update({"sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                    "gpu_memory_GiB": round(p.total_memory / 2**30, 1), "l2_bytes": cache_bytes("cuda")})
    return env


def environment_line(env: dict) -> str:
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    return (f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}{cuda}; {env['date']}; "
            f"command: `{env['command']}`")


def fmt(x: object, digits: int = 3) -> str:
    """Numbers for tables: None -> '-', else ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64,
             "float64": torch.float64}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(table)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


# Relative-error tolerances (‖out − ref‖ / ‖ref‖ against an fp32 reference) for the correctness gate that runs
# before any provider is timed; gradients get twice as much.
REL_TOL = {torch.float32: 2e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 2.5e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (NaN anywhere gives NaN, which fails every ``err <= tol`` check)."""
    o, r = out.detach().double(), ref.detach().double()
    if o.shape != r.shape:
        return float("nan")
    num = (o - r).norm().item()
    den = r.norm().item()
    return num / den if den > 0 else num


def json_default(o: object):
    """json.dump fallback: dtypes and devices as strings."""
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ----------------------------------------------------------------------------- correctness gate and modes
def reference_outputs(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor | None,
                      diff_idx: Sequence[int]):
    """``fn`` on fp32 copies of the floating inputs: (out, grads of inputs[diff_idx]) (grads None without
    grad_out)."""
    leaves = [x.detach().float() if x.is_floating_point() else x for x in inputs]
    for i in diff_idx if grad_out is not None else ():
        leaves[i].requires_grad_()
    with torch.set_grad_enabled(grad_out is not None):
        out = fn(*leaves)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, [leaves[i] for i in diff_idx], grad_out.float())
    return out.detach(), [g.detach() for g in grads]


def check_against(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor | None, ref_out,
                  ref_grads, dtype: torch.dtype, diff_idx: Sequence[int]) -> dict:
    """Relative errors of ``fn``'s output (and gradients, when ``grad_out`` is given) against the fp32
    reference, with ok flags (tolerance :data:`REL_TOL` of ``dtype``; twice that for gradients).

    The forward is checked without autograd; an exception there propagates (the caller reports the provider
    FAILED). A backward that raises NotImplementedError (e.g. FlexAttention on the CPU) is recorded as
    ``bwd_unsupported``: the provider is still timed forward-only."""
    tol = REL_TOL[dtype]
    with torch.no_grad():
        out = fn(*[x.detach().clone() for x in inputs])
    res: dict[str, object] = {"tol": tol, "fwd_rel_err": rel_err(out, ref_out)}
    res["fwd_ok"] = res["fwd_rel_err"] <= tol
    if grad_out is not None:
        leaves = [x.detach().clone() for x in inputs]
        for i in diff_idx:
            leaves[i].requires_grad_()
        try:
            out = fn(*leaves)
            grads = torch.autograd.grad(out, [leaves[i] for i in diff_idx], grad_out)
        except NotImplementedError as e:
            res["bwd_ok"] = False
            res["bwd_unsupported"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            return res
        errs = [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        res["bwd_rel_err"] = float("nan") if any(math.isnan(e) for e in errs) else max(errs)
        res["bwd_ok"] = res["bwd_rel_err"] <= 2 * tol
    return res


def verdict(check: dict, mode: str) -> tuple[str, str | None]:
    """("ok" | "skipped" | "FAILED", reason) of a checked provider for one mode."""
    if check.get("status") in ("skipped", "FAILED"):
        return check["status"], check.get("reason")
    if not check.get("fwd_ok"):
        return "FAILED", f"output rel err {fmt(check.get('fwd_rel_err'))} > tol {check.get('tol')}"
    if mode == "fwd":
        return "ok", None
    if check.get("bwd_unsupported"):
        return "skipped", f"no backward here ({check['bwd_unsupported']})"
    if not check.get("bwd_ok"):
        return "FAILED", f"gradient rel err {fmt(check.get('bwd_rel_err'))} > tol {2 * check.get('tol', 0)}"
    return "ok", None


def mode_callable(fn: Callable, input_sets: Sequence[Sequence[torch.Tensor]],
                  grad_outs: Sequence[torch.Tensor], mode: str, diff_idx: Sequence[int]) -> Callable[[], object]:
    """A no-argument callable timing ``mode`` of ``fn``, rotating over the input copies.

    fwd: under no_grad. fwd+bwd: forward, then ``autograd.grad`` of the inputs ``diff_idx``. bwd: the
    forward graph of each copy is built once here (outside the timing) and kept (``retain_graph``) for
    repeated backward passes.
    """
    if mode == "fwd":

        def fwd(*xs):
            with torch.no_grad():
                return fn(*xs)

        return rotating(fwd, [tuple(s) for s in input_sets])
    sets = []
    for s, g in zip(input_sets, grad_outs):
        xs = [x.detach() for x in s]
        for i in diff_idx:
            xs[i].requires_grad_()
        sets.append((tuple(xs), g))
    if mode == "fwd+bwd":

        def step(xs, g):
            return torch.autograd.grad(fn(*xs), [xs[i] for i in diff_idx], g)

        return rotating(step, sets)
    if mode != "bwd":
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    graphs = [(fn(*xs), [xs[i] for i in diff_idx], g) for xs, g in sets]

    def bwd(out, leaves, g):
        return torch.autograd.grad(out, leaves, g, retain_graph=True)

    return rotating(bwd, graphs)


def mode_ok(check: dict, mode: str) -> bool:
    return verdict(check, mode)[0] == "ok"


def allow_repeated_compiled_backward() -> None:
    """Timing a backward on its own replays it on a retained graph (``retain_graph=True``), which the
    donated-buffer optimization of compiled backwards (torch >= 2.6) refuses. Switch that optimization off
    (it saves memory, not time) before anything is compiled."""
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except Exception:  # noqa: BLE001 - older torch: nothing to switch off
        pass
