"""CPU micro-benchmarks of the four ops (pytest-benchmark) and smoke tests of the benchmark scripts.

    pytest benchmarks/ --benchmark-only                 # the benchmarks alone (each ~1 s)
    pytest benchmarks/                                  # benchmarks + harness smoke tests (about a minute)
    pytest benchmarks/ --benchmark-disable              # every benchmark body run once: a quick check

Not part of the project's normal ``pytest`` run (pyproject's testpaths = ["tests"]). No timing is asserted
anywhere: the smoke tests check that the scripts run, check correctness, and write their files.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402
import bench_attention  # noqa: E402
import bench_small_ops  # noqa: E402

import hilt_kernels  # noqa: E402

pytest.importorskip("pytest_benchmark")

B, T, H, D = 1, 512, 4, 64


def _qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, H, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


# ----------------------------------------------------------------------------- pytest-benchmark entries
@pytest.mark.parametrize("b", [8, 32, 128])
@pytest.mark.parametrize("provider", ["hilt reference", "sdpa block views"])
def test_bla_fwd(benchmark, provider, b):
    benchmark.group = f"block_local_attention fwd b={b}"
    q, k, v = _qkv()
    fn = (lambda: hilt_kernels.block_local_attention(q, k, v, b, backend="reference")) if provider == "hilt reference" \
        else (lambda: bench_attention.sdpa_block_views(q, k, v, b, True))
    with torch.no_grad():
        out = benchmark(fn)
    assert out.shape == (B, T, H, D)


@pytest.mark.parametrize("b", [8, 128])
@pytest.mark.parametrize("provider", ["hilt reference", "sdpa block views"])
def test_bla_fwd_bwd(benchmark, provider, b):
    benchmark.group = f"block_local_attention fwd+bwd b={b}"
    q, k, v = _qkv(requires_grad=True)
    do = torch.randn(B, T, H, D)
    op = (lambda: hilt_kernels.block_local_attention(q, k, v, b, backend="reference")) if provider == "hilt reference" \
        else (lambda: bench_attention.sdpa_block_views(q, k, v, b, True))
    grads = benchmark(lambda: torch.autograd.grad(op(), (q, k, v), do))
    assert len(grads) == 3


def test_attention_pool_fwd_bwd(benchmark):
    benchmark.group = "small ops fwd+bwd"
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, H, generator=g, requires_grad=True)
    v = torch.randn(B, T, H, D, generator=g, requires_grad=True)
    do = torch.randn(B, T // 8, H, D, generator=g)
    benchmark(lambda: torch.autograd.grad(hilt_kernels.attention_pool(s, v, 8, backend="reference"), (s, v), do))


def test_window2_attention_fwd_bwd(benchmark):
    benchmark.group = "small ops fwd+bwd"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, T, 2, D, generator=g, requires_grad=True) for _ in range(3))
    do = torch.randn(B, 2, T, 2, D, generator=g)
    benchmark(lambda: torch.autograd.grad(hilt_kernels.window2_attention(q, k, v, backend="reference"), (q, k, v), do))


def test_ema_depth_scan_fwd_bwd(benchmark):
    benchmark.group = "small ops fwd+bwd"
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(12, B, T, 128, generator=g, requires_grad=True)
    a = torch.randn(12, generator=g, requires_grad=True)
    do = torch.randn(12, B, T, 128, generator=g)
    benchmark(lambda: torch.autograd.grad(hilt_kernels.ema_depth_scan(vals, a, backend="reference"), (vals, a), do))


# ----------------------------------------------------------------------------- harness checks (no timing asserted)
@pytest.mark.parametrize("T_", [1, 7, 64, 100])
@pytest.mark.parametrize("b", [1, 8, 32, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_unmasked_pairs_exact(T_, b, causal):
    t = torch.arange(T_)
    allowed = (t[:, None] // b) == (t[None, :] // b)
    if causal:
        allowed &= t[None, :] <= t[:, None]
    assert bench_attention.unmasked_pairs(T_, b, causal) == int(allowed.sum())


def test_bytes_moved_matches_design():
    # DESIGN.md: forward 8·D bytes per token·head in 16-bit; backward 16·D (+ the fp32 lse)
    assert bench_attention.bytes_moved(1, 1, 1, 64, 2, "fwd") == 8 * 64
    assert bench_attention.bytes_moved(1, 1, 1, 64, 2, "bwd") == 16 * 64 + 4
    assert bench_attention.bytes_moved(2, 3, 4, 64, 4, "fwd") == 2 * 3 * 4 * 16 * 64


@pytest.mark.parametrize("causal", [True, False])
def test_plain_providers_match_reference(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 45, 3, 16, generator=g) for _ in range(3))  # T not a multiple of b
    ref = hilt_kernels.block_local_attention(q, k, v, 8, causal=causal, backend="reference")
    for fn in (bench_attention.sdpa_block_views, bench_attention.naive_eager):
        torch.testing.assert_close(fn(q, k, v, 8, causal), ref, atol=1e-5, rtol=1e-5)


def test_small_ops_math_matches_reference():
    g = torch.Generator().manual_seed(2)
    s, v = torch.randn(2, 32, 3, generator=g), torch.randn(2, 32, 3, 8, generator=g)
    vs = torch.randn(2, 32, 5, generator=g)
    for vals in (v, vs):  # per-head and shared values
        torch.testing.assert_close(bench_small_ops.apool_math(s, vals, 8), hilt_kernels.attention_pool(s, vals, 8),
                                   atol=1e-5, rtol=1e-5)
    q, k, w = (torch.randn(2, 2, 5, 3, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(bench_small_ops.w2a_math(q, k, w), hilt_kernels.window2_attention(q, k, w), atol=1e-5,
                               rtol=1e-5)
    x, a, ac = torch.randn(4, 2, 3, 6, generator=g), torch.randn(4, generator=g), torch.randn(4, 6, generator=g)
    for alpha in (a, ac):  # per-layer and per-channel alpha
        torch.testing.assert_close(bench_small_ops.ema_math(x, alpha), hilt_kernels.ema_depth_scan(x, alpha), atol=1e-5,
                                   rtol=1e-5)


def test_summarize_and_rotation():
    s = tm.summarize([3.0, 1.0, 2.0, 4.0])
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0 and s["max_ms"] == 4.0 and s["q1_ms"] <= s["q3_ms"]
    seen = []
    f = tm.rotating(lambda x: seen.append(x), [(1,), (2,), (3,)])
    for _ in range(4):
        f()
    assert seen == [1, 2, 3, 1]


TINY = ["--seq-len", "64", "--batch", "1", "--heads", "2", "--head-dims", "16", "--block-sizes", "8", "32",
        "--rounds", "1", "--min-time", "0", "--no-flex"]


def test_bench_attention_script_runs(tmp_path, capsys):
    assert bench_attention.main(TINY + ["--causal", "both", "--out", str(tmp_path), "--tag", "t"]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["finished"] and doc["environment"]["torch"] == torch.__version__
    assert "command" in doc["environment"] and "date" in doc["environment"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"hilt reference", "sdpa block views", "naive eager"}
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd+bwd"}
    for r in ok:
        assert r["median_ms"] > 0 and r["GB/s"] > 0 and r["TFLOP/s"] > 0 and r["fwd_rel_err"] <= r["tol"]
    skipped = {r["provider"] for r in doc["results"] if r["status"] == "skipped"}
    assert "hilt cuda" in skipped and "flex attention" in skipped
    assert (tmp_path / "t.md").exists() and (tmp_path / "t.png").exists()
    assert "sdpa block views" in capsys.readouterr().out


def test_bench_attention_reports_wrong_provider_as_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_attention, "naive_eager", lambda q, k, v, b, causal: q * 1.0)
    assert bench_attention.main(TINY + ["--out", str(tmp_path), "--tag", "f", "--no-plot",
                                        "--providers", "hilt reference", "sdpa block views", "naive eager"]) == 0
    doc = json.loads((tmp_path / "f.json").read_text())
    naive = [r for r in doc["results"] if r["provider"] == "naive eager"]
    assert naive and all(r["status"] == "FAILED" and "median_ms" not in r for r in naive)
    assert all(r["status"] == "ok" for r in doc["results"] if r["provider"] == "sdpa block views")


def test_bench_small_ops_script_runs(tmp_path):
    assert bench_small_ops.main(["--quick", "--rounds", "1", "--min-time", "0", "--out", str(tmp_path),
                                        "--tag", "s", "--ops", "window2_attention", "ema_depth_scan"]) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"window2_attention", "ema_depth_scan"}
    assert all(r["GB/s"] > 0 for r in ok)


def test_bench_models_script_runs(tmp_path):
    import bench_models

    assert bench_models.main(["--quick", "--seq-lens", "32", "--tokens-per-step", "64", "--d-model", "32",
                              "--n-heads", "2", "--n-layers", "2", "--rounds", "1", "--out", str(tmp_path),
                              "--tag", "m"]) == 0
    doc = json.loads((tmp_path / "m.json").read_text())
    assert {r["model"] for r in doc["results"] if r.get("tokens_per_s")} == {"GPT", "HILT", "BlockHierarchicalLM",
                                                                            "LFormer"}
