"""Generation benchmark: cached decoding speed and cache size of GPT, HILT, BlockHierarchicalLM and LFormer.

All four models use RoPE and are matched once, at the 4k context, to GPT's parameter count with the ablation's
matcher (:func:`hilt.training.ablate.matched_model_configs`, RoPE instead of a learned position table); the same weights'
shapes serve every context (RoPE has no table). For each context and batch size: a random prompt of
``context - 256`` tokens is prefilled (timed apart, in chunks of ``--prefill-chunk`` tokens), then
``--new-tokens`` greedy tokens are decoded one step at a time, the models **interleaved step by step** (so a
noisy, shared machine slows them alike). Reported: decode tokens/s (batch x steps / decode seconds), ms per
step, prefill seconds, cache bytes (every buffer the cache holds). The uncached path (``model(window)`` over the
whole context) is timed for ``--uncached-steps`` steps at the contexts of ``--uncached-contexts`` (batch 1).

``--hilt-protocol``: the README's HILT-vs-GPT decoding measurement (d_model 128, 4 layers, context 256, ilt_dim
64, a 32-token prompt, 200 new tokens, greedy, 1 thread, both eager, interleaved runs, median of 5), with HILT's
ILT step path and with the ILTs' module forward (the previous path) for comparison.

    python benchmarks/bench_generate.py                                # 1k/4k/8k x batch 1/16 + HILT protocol
    python benchmarks/bench_generate.py --contexts 4096 --batches 16   # one cell
    python benchmarks/bench_generate.py --quick                        # tiny smoke run

Writes <out>/<tag>.json, .md and .png (default benchmarks/results/generate_cpu.*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as tm  # noqa: E402

from hilt.training import ablate  # noqa: E402
from hilt.models.registry import build_model  # noqa: E402
from hilt.generate import generate  # noqa: E402
from hilt.models import GPT, HILT, GPTConfig, HILTConfig  # noqa: E402

MODELS = ("gpt", "hilt", "block", "lformer")
NAMES = {"gpt": "GPT", "hilt": "HILT", "block": "BlockHierarchicalLM", "lformer": "LFormer"}


def matched_configs(d_model: int, n_layers: int, context: int) -> tuple[dict, dict, int]:
    """Every model with RoPE, sized to GPT's parameter count at ``context`` the way the ablation's matcher
    does it (:func:`hilt.training.ablate.matched_model_configs`: the closest width, then the ``d_ff`` that closes the
    gap), the widths restricted to even head dims (RoPE needs them)."""
    def shape(m, d):
        return dict(ablate._shape(m, d, n_layers, context), pos_encoding="rope")

    target = ablate.count_parameters("gpt", shape("gpt", d_model))
    configs, counts = {}, {}
    for m in MODELS:
        if m == "gpt":
            cfg = shape(m, d_model)
        else:
            widths = range(2 * ablate.N_HEADS, 3 * d_model + 1, 2 * ablate.N_HEADS)
            d = min(widths, key=lambda w: abs(ablate.count_parameters(m, shape(m, w)) - target))
            cfg = shape(m, d)
            a0 = ablate.count_parameters(m, dict(cfg, d_ff=4 * d))
            b = ablate.count_parameters(m, dict(cfg, d_ff=4 * d + 1)) - a0
            if b > 0:
                cfg["d_ff"] = int(min(8 * d, max(2 * d, round(4 * d + (target - a0) / b))))
        configs[m], counts[m] = cfg, ablate.count_parameters(m, cfg)
    return configs, counts, target


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    return sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))


@torch.no_grad()
def decode_cell(models: dict, context: int, batch: int, new_tokens: int, prefill_chunk: int, seed: int = 0) -> dict:
    """Prefill each model's cache with the same prompt, then decode ``new_tokens`` steps interleaved."""
    prompt_len = max(1, context - 256)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (batch, prompt_len), generator=g)
    caches, nxt, res = {}, {}, {}
    for name, m in models.items():
        cache = m.init_cache(batch)
        t0 = time.perf_counter()
        for s in range(0, prompt_len, prefill_chunk):
            logits = m.forward_step(prompt[:, s:s + prefill_chunk], cache).logits
        res[name] = {"prefill_s": time.perf_counter() - t0, "decode_s": 0.0, "cache_bytes": cache_bytes(cache)}
        caches[name], nxt[name] = cache, logits[:, -1:].argmax(-1)
    names = list(models)
    for step in range(new_tokens):
        order = names[step % len(names):] + names[:step % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            logits = models[name].forward_step(nxt[name], caches[name]).logits
            nxt[name] = logits[:, -1:].argmax(-1)
            res[name]["decode_s"] += time.perf_counter() - t0
    for name, r in res.items():
        r["tokens_per_s"] = batch * new_tokens / r["decode_s"]
        r["ms_per_step"] = 1e3 * r["decode_s"] / new_tokens
        r["prefill_tokens"] = prompt_len
    del caches
    return res


@torch.no_grad()
def scaling_cell(kind: str, config: dict, contexts: list, batch: int, new_tokens: int, prefill_chunk: int) -> dict:
    """One model type at several contexts, decoded **interleaved step by step across the contexts** (so the
    context scaling is not confounded by the machine's load drifting between cells)."""
    models = {}
    for ctx in contexts:
        torch.manual_seed(0)
        models[ctx] = build_model(kind, dict(config, max_seq_len=ctx)).eval()
    g = torch.Generator().manual_seed(0)
    caches, nxt, res = {}, {}, {}
    for ctx, m in models.items():
        prompt = torch.randint(0, 256, (batch, max(1, ctx - 256)), generator=g)
        cache = m.init_cache(batch)
        t0 = time.perf_counter()
        for s in range(0, prompt.shape[1], prefill_chunk):
            logits = m.forward_step(prompt[:, s:s + prefill_chunk], cache).logits
        res[ctx] = {"prefill_s": time.perf_counter() - t0, "decode_s": 0.0, "cache_bytes": cache_bytes(cache)}
        caches[ctx], nxt[ctx] = cache, logits[:, -1:].argmax(-1)
    keys = list(models)
    for step in range(new_tokens):
        for ctx in keys[step % len(keys):] + keys[:step % len(keys)]:
            t0 = time.perf_counter()
            nxt[ctx] = models[ctx].forward_step(nxt[ctx], caches[ctx]).logits[:, -1:].argmax(-1)
            res[ctx]["decode_s"] += time.perf_counter() - t0
    for r in res.values():
        r["tokens_per_s"] = batch * new_tokens / r["decode_s"]
    return res


@torch.no_grad()
def uncached_cell(models: dict, context: int, batch: int, steps: int) -> dict:
    """``model(window)`` over a full context window, ``steps`` times per model, interleaved; median."""
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, 256, (batch, context), generator=g)
    times = {n: [] for n in models}
    for _ in range(steps):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(window).logits[:, -1].argmax(-1)
            times[name].append(time.perf_counter() - t0)
    return {n: {"ms_per_step": 1e3 * statistics.median(t), "tokens_per_s": batch / statistics.median(t),
                "steps": steps} for n, t in times.items()}


@torch.no_grad()
def _encoder_op_window_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """The previous ILT step's window layer (until issue 13 item 4): x (N, 2, I) through PyTorch's fused
    pre-LN encoder-layer op with the 2x2 causal mask."""
    a, m = layer.attn, layer.mlp
    mask = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]], dtype=x.dtype) if a.causal else None
    return torch._transformer_encoder_layer_fwd(
        x, a.d_model, a.n_heads, a.qkv.weight, a.qkv.bias, a.out_proj.weight, a.out_proj.bias, True, True,
        layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
        m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, mask, 0 if mask is not None else None)


def _encoder_op_step(ilt, prev, cur, out, scale):
    """The previous ILT step path: one proj_in over both rows, one fused encoder-layer op per window layer."""
    I = ilt.ilt_dim
    x = torch.nn.functional.linear(torch.stack((prev, cur), dim=-2), ilt.proj_in.weight, ilt.proj_in.bias)
    x = torch.nn.functional.layer_norm(x + ilt.window_emb, (I,), ilt.norm.weight, ilt.norm.bias, ilt.norm.eps)
    lead = x.shape[:-2]
    x = x.reshape(-1, 2, I)
    for layer in ilt.layers:
        x = _encoder_op_window_layer(layer, x)
    mod = torch.nn.functional.linear(x.mean(-2).view(*lead, I), ilt.proj_out.weight, ilt.proj_out.bias)
    return torch.addcmul(out, scale, mod)


def hilt_protocol(runs: int = 5, new_tokens: int = 200) -> dict:
    """README size, 1 thread, interleaved generate() runs: GPT, HILT (its decoding path: the CPU library's
    fused ILT step when built), HILT with the ILT step as PyTorch ops (the library off), HILT with the
    previous step path (fused encoder-layer op per window layer), HILT (module ILTs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        kw = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=256, dropout=0.0)
        gpt = GPT(GPTConfig(**kw)).eval()
        hilt = HILT(HILTConfig(**kw, ilt_dim=64, ilt_dropout=0.0)).eval()

        class ModuleILT(HILT):  # an earlier step path: each ILT's module forward
            def _step_layers(self, h, cache, pos, ragged=None):
                for i, layer in enumerate(self.layers):
                    new = layer.forward_cached(h, cache.k[i], cache.v[i], pos, ragged)
                    if i >= 1:
                        new = new + self.ilt_scale.to(new.dtype) * self.ilts[i - 1](h, new)
                    h = new
                return h

        class EncoderOpILT(HILT):  # the previous step path
            def _step_layers(self, h, cache, pos, ragged=None):
                for i, layer in enumerate(self.layers):
                    new = layer.forward_cached(h, cache.k[i], cache.v[i], pos, ragged)
                    if i >= 1:
                        new = _encoder_op_step(self.ilts[i - 1], h, new, new, self.ilt_scale)
                    h = new
                return h

        class TorchOpsILT(HILT):  # the packed-weights ILT step as PyTorch ops (the CPU library not used)
            def init_cache(self, *a, **k):
                cache = super().init_cache(*a, **k)
                for w in cache.ilt_weights:
                    w.cpu = None
                return cache

        ops = TorchOpsILT(HILTConfig(**kw, ilt_dim=64, ilt_dropout=0.0)).eval()
        ops.load_state_dict(hilt.state_dict())
        old = ModuleILT(HILTConfig(**kw, ilt_dim=64, ilt_dropout=0.0)).eval()
        old.load_state_dict(hilt.state_dict())
        enc = EncoderOpILT(HILTConfig(**kw, ilt_dim=64, ilt_dropout=0.0)).eval()
        enc.load_state_dict(hilt.state_dict())
        prompt = list(range(32, 64))
        ref = generate(hilt, prompt, 50, temperature=0)
        for other in (ops, old, enc):
            assert torch.equal(ref, generate(other, prompt, 50, temperature=0))
        from hilt_kernels.cpu import unavailable_reason

        library = unavailable_reason() or "used"
        models = {"gpt": gpt, "hilt": hilt, "hilt_torch_ops": ops, "hilt_encoder_op": enc, "hilt_module_ilts": old}
        tps = {k: [] for k in models}
        for name, m in models.items():  # warm-up
            generate(m, prompt, 20, temperature=0)
        for _ in range(runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                generate(m, prompt, new_tokens, temperature=0)
                tps[name].append(new_tokens / (time.perf_counter() - t0))
        ratios = {k: [h / g for h, g in zip(tps[k], tps["gpt"])] for k in models if k != "gpt"}
        return {"tokens_per_s": tps, "median_tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
                "cpu_library": library, "ratios_per_run": ratios,
                "median_ratio": {k: statistics.median(v) for k, v in ratios.items()}, "runs": runs,
                "new_tokens": new_tokens, "threads": 1}
    finally:
        torch.set_num_threads(n)


def ragged_protocol(runs: int = 3, new_tokens: int = 64, n_prompts: int = 16) -> dict:
    """Prompts of 16 different lengths (8, 15, ..., 113 tokens) at the README size (context 256), 1 thread,
    greedy: generate() in one left-padded batch (the ragged cache) against the same model decoding them in
    batches of equal length (here: one at a time), interleaved runs. Same tokens both ways (checked)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=256, dropout=0.0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (8 + 7 * i,), generator=g).tolist() for i in range(n_prompts)]
        out = {"new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts], "runs": runs, "models": {}}
        for name, cls, cfg in (("gpt", GPT, GPTConfig(**kw)), ("hilt", HILT, HILTConfig(**kw, ilt_dim=64, ilt_dropout=0.0))):
            torch.manual_seed(0)
            model = cls(cfg).eval()

            class Grouped(cls):  # the same model without the ragged cache: batches of equal length
                supports_ragged_cache = False

            grouped = Grouped(cfg).eval()
            grouped.load_state_dict(model.state_dict())
            a = [o.tolist() for o in generate(model, prompts, new_tokens, temperature=0)]
            b = [o.tolist() for o in generate(grouped, prompts, new_tokens, temperature=0)]
            assert a == b, "the ragged batch and the grouped decoding disagree"
            tps = {"one_batch": [], "grouped": []}
            for _ in range(runs):
                for key, m in (("one_batch", model), ("grouped", grouped)):
                    t0 = time.perf_counter()
                    generate(m, prompts, new_tokens, temperature=0)
                    tps[key].append(n_prompts * new_tokens / (time.perf_counter() - t0))
            med = {k: statistics.median(v) for k, v in tps.items()}
            out["models"][name] = {"tokens_per_s": tps, "median_tokens_per_s": med,
                                   "speedup": med["one_batch"] / med["grouped"]}
        return out
    finally:
        torch.set_num_threads(n)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({c["batch"] for c in results["cells"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        cells = sorted((c for c in results["cells"] if c["batch"] == b), key=lambda c: c["context"])
        for m in results["models"]:
            ax.plot([c["context"] for c in cells], [c["cached"][m]["tokens_per_s"] for c in cells], "o-", label=NAMES[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("cached decode tokens/s")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Generation speed ({results['env']['device_name']}, {results['env']['threads']} thread(s), shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _load_note(results: dict) -> str:
    load = results["load_average"]
    return (f"1-minute load average {'–'.join(f'{x:g}' for x in load)} (start–end) on {results.get('cpu_count')} "
            "CPUs: a load above the thread count means other jobs shared the CPU.")


def markdown(results: dict) -> str:
    lines = [f"# Generation speed ({results['tag']})", "",
             f"Machine: {tm.environment_line(results['env'])}; {results['env']['threads']} thread(s). "
             + _load_note(results) + " The models were interleaved step by step, so the ratios are the meaningful "
             "part.", "",
             f"Models (RoPE, matched at context {results['match_context']} to GPT's {results['target_params']:,} "
             "parameters by the ablation's matcher):", ""]
    for m in results["models"]:
        lines.append(f"- {NAMES[m]}: {results['params'][m]:,} parameters, {json.dumps(results['configs'][m])}")
    lines += ["", f"Prompt = context - 256 tokens (prefilled, timed apart), {results['new_tokens']} new tokens "
              "(nothing slides).", ""]
    header = ["context", "batch", "model", "decode tok/s", "ms/step", "vs GPT", "prefill s", "cache MiB",
              "cache vs GPT", "uncached tok/s"]
    rows = []
    for c in results["cells"]:
        g = c["cached"]["gpt"]
        for m in results["models"]:
            r = c["cached"][m]
            un = c.get("uncached", {}).get(m)
            rows.append([c["context"], c["batch"], NAMES[m], tm.fmt(r["tokens_per_s"]), tm.fmt(r["ms_per_step"]),
                         f"{r['tokens_per_s'] / g['tokens_per_s']:.2f}x", tm.fmt(r["prefill_s"]),
                         tm.fmt(r["cache_bytes"] / 2**20), f"{r['cache_bytes'] / g['cache_bytes']:.3f}",
                         tm.fmt(un["tokens_per_s"]) if un else "-"])
    if results["cells"]:
        lines += [tm.markdown_table(header, rows), ""]
    if results.get("summary"):
        lines += ["Summary:", ""] + [f"- {k}: {v}" for k, v in results["summary"].items()] + [""]
    for kind, sc in results.get("scaling", {}).items():
        ctxs = sorted(sc["contexts"], key=int)
        base = sc["contexts"][ctxs[0]]["tokens_per_s"]
        lines += [f"Context scaling of {NAMES[kind]} (batch {sc['batch']}, the contexts decoded interleaved step by "
                  "step):", "",
                  tm.markdown_table(["context", "decode tok/s", f"vs {ctxs[0]}", "cache MiB"],
                                    [[c, tm.fmt(sc["contexts"][c]["tokens_per_s"]),
                                      f"{sc['contexts'][c]['tokens_per_s'] / base:.2f}x",
                                      tm.fmt(sc["contexts"][c]["cache_bytes"] / 2**20)] for c in ctxs]), ""]
    hp = results.get("hilt_protocol")
    if hp:
        med = hp["median_tokens_per_s"]
        labels = {"hilt": f"HILT (its decoding path; CPU library: {hp.get('cpu_library', '?')})",
                  "hilt_torch_ops": "HILT (ILT step as PyTorch ops on packed weights, 12 ops per window layer)",
                  "hilt_encoder_op": "HILT (fused encoder-layer op per window layer, an earlier path)",
                  "hilt_module_ilts": "HILT (ILT module forward, the first path)"}
        ratio = hp["median_ratio"]
        lines += ["HILT decoding cost (README size: d_model 128, 4 layers, context 256, ilt_dim 64; 32-token prompt, "
                  f"{hp['new_tokens']} new tokens, greedy, 1 thread, eager, {hp['runs']} interleaved runs):", "",
                  tm.markdown_table(["model", "median tok/s", "median ratio vs GPT"],
                                    [["GPT", tm.fmt(med["gpt"]), "1"]]
                                    + [[labels[k], tm.fmt(med[k]), f"{ratio[k]:.2f}x"] for k in labels if k in ratio]),
                  ""]
        for k, per_run in hp["ratios_per_run"].items():
            lines += [f"Per-run {k}/GPT ratios: " + ", ".join(f"{r:.2f}" for r in per_run), ""]
    rp = results.get("ragged_protocol")
    if rp:
        lens = rp["prompt_lengths"]
        lines += [f"Prompts of {len(lens)} different lengths ({lens[0]}..{lens[-1]} tokens), {rp['new_tokens']} new "
                  f"tokens each, README size, greedy, 1 thread, {rp['runs']} interleaved runs (same tokens both ways):",
                  "", tm.markdown_table(["model", "one left-padded batch tok/s", "grouped by length tok/s", "speedup"],
                                        [[NAMES[k], tm.fmt(v["median_tokens_per_s"]["one_batch"]),
                                          tm.fmt(v["median_tokens_per_s"]["grouped"]), f"{v['speedup']:.2f}x"]
                                         for k, v in rp["models"].items()]), ""]
    return "\n".join(lines)


def summarize(results: dict) -> dict:
    s = {}
    cells = {(c["context"], c["batch"]): c["cached"] for c in results["cells"]}
    for b in (16, 1):
        if (4096, b) in cells:
            c = cells[(4096, b)]
            s[f"4k batch {b}: Block / GPT cached tok/s"] = round(c["block"]["tokens_per_s"] / c["gpt"]["tokens_per_s"], 2)
            s[f"4k batch {b}: Block / GPT cache bytes"] = round(c["block"]["cache_bytes"] / c["gpt"]["cache_bytes"], 4)
            s[f"4k batch {b}: HILT / GPT cached tok/s"] = round(c["hilt"]["tokens_per_s"] / c["gpt"]["tokens_per_s"], 2)
            s[f"4k batch {b}: LFormer / GPT cached tok/s"] = round(
                c["lformer"]["tokens_per_s"] / c["gpt"]["tokens_per_s"], 2)
        lo = min((k for k in cells if k[1] == b), default=None, key=lambda k: k[0])
        hi = max((k for k in cells if k[1] == b), default=None, key=lambda k: k[0])
        if lo and hi and lo != hi:
            for m in results["models"]:
                s[f"batch {b}: {NAMES[m]} tok/s at {lo[0]} / at {hi[0]}"] = round(
                    cells[lo][m]["tokens_per_s"] / cells[hi][m]["tokens_per_s"], 2)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--match-context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--uncached-contexts", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--uncached-batches", type=int, nargs="*", default=[1])
    p.add_argument("--uncached-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scaling-models", nargs="*", default=["block", "gpt"], choices=MODELS,
                   help="models whose context scaling is measured interleaved across --scaling-contexts")
    p.add_argument("--scaling-contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--scaling-batch", type=int, default=16)
    p.add_argument("--no-hilt-protocol", action="store_true")
    p.add_argument("--hilt-runs", type=int, default=5)
    p.add_argument("--no-ragged-protocol", action="store_true",
                   help="skip the prompts-of-different-lengths measurement (one batch vs grouped by length)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (d_model 64, contexts 512/1024, 16 new tokens)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="generate_cpu")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.contexts, a.batches, a.new_tokens, a.match_context = 64, [512, 1024], [1, 2], 16, 1024
        a.uncached_contexts, a.hilt_runs = [512], 2
        a.scaling_contexts, a.scaling_batch = [512, 1024], 2
        a.tag = a.tag if a.tag != "generate_cpu" else "generate_cpu_quick"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    configs, counts, target = matched_configs(a.d_model, a.n_layers, a.match_context)
    results = {"tag": a.tag, "env": tm.environment("cpu"), "models": a.models, "configs": {m: configs[m] for m in a.models},
               "params": {m: counts[m] for m in a.models}, "target_params": target, "new_tokens": a.new_tokens,
               "match_context": a.match_context,
               "prefill_chunk": a.prefill_chunk, "cells": [], "load_average": [round(os.getloadavg()[0], 2)],
               "cpu_count": os.cpu_count()}
    print(f"params: {results['params']} (target {target:,})", flush=True)
    for context in a.contexts:
        models = {}
        for m in a.models:
            torch.manual_seed(0)
            models[m] = build_model(m, dict(configs[m], max_seq_len=context)).eval()
        for batch in a.batches:
            t0 = time.perf_counter()
            cell = {"context": context, "batch": batch,
                    "cached": decode_cell(models, context, batch, a.new_tokens, a.prefill_chunk)}
            if context in a.uncached_contexts and batch in a.uncached_batches:
                cell["uncached"] = uncached_cell(models, context, batch, a.uncached_steps)
            results["cells"].append(cell)
            print(f"context {context} batch {batch} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"{m} {r['tokens_per_s']:.0f} tok/s ({r['cache_bytes'] / 2**20:.1f} MiB)"
                for m, r in cell["cached"].items()), flush=True)
            results["summary"] = summarize(results)
            _write(results, a.out, a.tag)
    for kind in a.scaling_models:
        res = scaling_cell(kind, configs[kind], a.scaling_contexts, a.scaling_batch, a.new_tokens, a.prefill_chunk)
        results.setdefault("scaling", {})[kind] = {"batch": a.scaling_batch, "contexts": res}
        print(f"scaling {kind} batch {a.scaling_batch}: " + ", ".join(
            f"{c}: {r['tokens_per_s']:.0f} tok/s" for c, r in res.items()), flush=True)
        _write(results, a.out, a.tag)
    if not a.no_hilt_protocol:
        results["hilt_protocol"] = hilt_protocol(a.hilt_runs)
        print("HILT protocol:", json.dumps({k: results["hilt_protocol"][k] for k in
                                            ("median_tokens_per_s", "median_ratio", "cpu_library")}), flush=True)
    if not a.no_ragged_protocol:
        results["ragged_protocol"] = ragged_protocol(*((1, 8) if a.quick else ()))
        print("ragged prompts:", json.dumps({k: v["median_tokens_per_s"] for k, v in
                                             results["ragged_protocol"]["models"].items()}), flush=True)
    results["summary"] = summarize(results)
    results["load_average"].append(round(os.getloadavg()[0], 2))
    _write(results, a.out, a.tag)
    print(markdown(results))
    return 0


def _write(results: dict, out: str, tag: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write(markdown(results) + "\n")
    if results["cells"]:
        try:
            plot(results, os.path.join(out, f"{tag}.png"))
        except ImportError:
            pass


if __name__ == "__main__":
    sys.exit(main())
