"""Prompts of different lengths in ONE batch: a left-padded KV cache (KVCache.set_left_padding) gives every
row its own positions and never lets a row attend to its padding, for GPT (learned, sinusoidal, RoPE),
HILT, LFormer (token-wise taps, blended) and Llama with NP layers; generate() uses it."""
from __future__ import annotations

import pytest
import torch

from hilt.generate import generate, supports_ragged_cache
from hilt.nn.attention import KVCache, RaggedStep

from .helpers import block_model, gpt_model, hilt_model, lformer_model, llama_model

MODELS = {
    "gpt-learned": lambda: gpt_model("learned"),
    "gpt-sinusoidal": lambda: gpt_model("sinusoidal"),
    "gpt-rope": lambda: gpt_model("rope"),
    "hilt": lambda: hilt_model("rope"),
    "hilt-learned": lambda: hilt_model("learned"),
    "lformer-token": lambda: lformer_model("token"),
    "llama-npt": lambda: llama_model(npt=True),
}
LENGTHS = (3, 9, 1, 6)


def _rows(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in LENGTHS]


def _left_padded(rows, fill=0):
    N = max(r.numel() for r in rows)
    ids = torch.full((len(rows), N), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, N - r.numel():] = r
    return ids, torch.tensor([N - r.numel() for r in rows])


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_each_row_equals_its_own_forward_at_every_step(name):
    """Prefill of the left-padded batch, then 6 steps of one token per row: every row's logits equal the
    full forward of that row alone (no padding) at every position, to 1e-5."""
    m = MODELS[name]()
    assert supports_ragged_cache(m)
    rows = _rows()
    ids, pad = _left_padded(rows, fill=7)
    cache = m.init_cache(len(rows)).set_left_padding(pad)
    first = m.forward_step(ids, cache).logits
    g = torch.Generator().manual_seed(1)
    new = torch.randint(0, 256, (len(rows), 6), generator=g)
    steps = [m.forward_step(new[:, t:t + 1], cache).logits for t in range(new.shape[1])]
    for b, r in enumerate(rows):
        full = m(torch.cat([r, new[b]])[None]).logits[0]
        n = r.numel()
        torch.testing.assert_close(first[b, pad[b]:], full[:n], atol=1e-5, rtol=1e-5)
        for t, lg in enumerate(steps):
            torch.testing.assert_close(lg[b, 0], full[n + t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt-rope", "llama-npt"])
@torch.no_grad()
def test_padding_slots_are_never_read(name):
    """Garbage written over every padding slot's keys and values after the prefill changes nothing."""
    m = MODELS[name]()
    rows = _rows(5)
    ids, pad = _left_padded(rows)
    nxt = torch.randint(0, 256, (len(rows), 1))
    results = []
    for garbage in (False, True):
        cache = m.init_cache(len(rows)).set_left_padding(pad)
        m.forward_step(ids, cache)
        if garbage:
            for k, v in zip(cache.k, cache.v):
                for b, p in enumerate(pad.tolist()):
                    k[b, :, :p] = 1e3 * torch.randn_like(k[b, :, :p])
                    v[b, :, :p] = 1e3 * torch.randn_like(v[b, :, :p])
        results.append(m.forward_step(nxt, cache).logits)
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)
    assert torch.isfinite(results[0]).all()


def test_ragged_step_mask_and_positions():
    r = RaggedStep.make(torch.tensor([2, 0]), 0, 3)  # row 0: 2 padding slots, row 1: none
    assert r.positions.tolist() == [[0, 0, 0], [0, 1, 2]]
    m = r.mask[:, 0].int().tolist()
    assert m[0] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # padding queries see padding; the real one only itself
    assert m[1] == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # plain causal
    r = RaggedStep.make(torch.tensor([2, 0]), 3, 1)  # one new token in slot 3
    assert r.positions.tolist() == [[1], [3]] and r.mask[:, 0, 0].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_set_left_padding_checks():
    c = KVCache(1, 2, 1, 2, 8)
    with pytest.raises(ValueError, match="one per row"):
        c.set_left_padding(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        c.set_left_padding(torch.tensor([1, -1]))
    c.set_left_padding(torch.tensor([1, 0]))
    c.length = 3
    with pytest.raises(ValueError, match="empty cache"):
        c.set_left_padding(torch.tensor([0, 0]))
    assert c.reset().pad is None and c.length == 0  # reset drops the padding


def test_per_token_positions_are_checked():
    from hilt.nn.positional import LearnedPositionalEncoding, RotaryEmbedding

    pe = LearnedPositionalEncoding(4, max_seq_len=5)
    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(pe(x, torch.tensor([[0, 1, 2], [2, 3, 4]]))[1], pe.weight[2:5])
    with pytest.raises(ValueError, match=r"in \[0, max_seq_len=5\)"):
        pe(x, torch.tensor([[0, 1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError, match="shape"):
        pe(x, torch.tensor([[0, 1]]))
    rope = RotaryEmbedding(4)
    q = torch.randn(2, 3, 1, 4)
    got = rope(q, torch.tensor([[5, 6, 7], [0, 1, 2]]))
    torch.testing.assert_close(got[0], rope(q[:1], 5)[0])
    torch.testing.assert_close(got[1], rope(q[1:], 0)[0])
    with pytest.raises(ValueError, match="per-token positions"):
        rope(q, torch.tensor([[0, 1]]))


def _count_batches(monkeypatch, m):
    sizes = []
    orig = type(m).forward_step

    def spy(self, ids, cache, *a, **k):
        sizes.append(tuple(ids.shape))
        return orig(self, ids, cache, *a, **k)

    monkeypatch.setattr(type(m), "forward_step", spy)
    return sizes


@pytest.mark.parametrize("name", ["gpt-learned", "hilt", "llama-npt"])
def test_generate_decodes_different_lengths_in_one_batch(name, monkeypatch):
    """Until the longest row fills the context every step is one batch of all rows; after it, rows continue
    grouped by length (each slides as alone). Tokens equal each prompt generated alone."""
    m = MODELS[name]()
    prompts = [r.tolist() for r in _rows(11)]
    alone = [generate(m, p, 20, temperature=0).tolist() for p in prompts]
    sizes = _count_batches(monkeypatch, m)
    out = generate(m, prompts, 20, temperature=0)
    assert [o.tolist() for o in out] == alone
    N, L, B = max(LENGTHS), m.config.max_seq_len, len(prompts)
    batched = L - N + 1  # steps while the longest row fits the context
    assert sizes[0] == (B, N) and all(s == (B, 1) for s in sizes[1:batched])
    assert all(s[0] < B for s in sizes[batched:])  # then grouped by length
    sizes.clear()
    short = generate(m, prompts, 5, temperature=0)  # nothing slides: one batch from start to end
    assert sizes == [(B, N)] + [(B, 1)] * 4
    assert [o.tolist() for o in short] == [a[:len(p) + 5] for a, p in zip(alone, prompts)]


def test_block_model_keeps_grouping_by_length(monkeypatch):
    m = block_model("rope", 4)
    assert not supports_ragged_cache(m)
    prompts = [r.tolist() for r in _rows(2)]
    sizes = _count_batches(monkeypatch, m)
    generate(m, prompts, 3, temperature=0)
    assert {s[0] for s in sizes} == {1}  # four different lengths: four batches of one


@pytest.mark.parametrize("name", ["gpt-learned", "hilt"])
def test_eos_rows_across_the_switch_to_grouped_decoding(name):
    """eos_id with a generation long enough that the rows still running continue grouped after the batched
    phase: every row equals its prompt generated alone with the same eos_id."""
    m = MODELS[name]()
    prompts = [r.tolist() for r in _rows(4)]
    free = [generate(m, p, 24, temperature=0).tolist() for p in prompts]
    n0 = len(prompts[0])
    eos = free[0][n0 + 2]  # row 0 stops early (in the batched phase); others may or may not emit it
    out = generate(m, prompts, 24, temperature=0, eos_id=eos)
    for p, o in zip(prompts, out):
        assert o.tolist() == generate(m, p, 24, temperature=0, eos_id=eos).tolist()
    assert len(out[0]) <= n0 + 3
