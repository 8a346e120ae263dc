"""BlockHierarchicalLM's block-wise cache: cached logits equal the full forward's at every step (learned,
sinusoidal, RoPE; block sizes 4 and 8; prompts shorter than a block, ending on a block boundary, spanning
blocks; also after the window slides by whole blocks), the local and decoder caches never hold more than a
block, greedy tokens equal the recompute path's."""
from __future__ import annotations

import pytest
import torch

from hilt.generate import generate, supports_cache, window_start

from .helpers import block_model, check_every_step

POS = ("learned", "sinusoidal", "rope")


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("block_size", [4, 8])
def test_cached_logits_equal_full_forward_every_step(pos, block_size):
    m = block_model(pos, block_size, max_seq_len=24)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    # shorter than a block, exactly one block, two blocks, and spanning blocks mid-block
    for prompt_len in (block_size - 1, block_size, 2 * block_size, 2 * block_size + 1):
        assert check_every_step(m, ids, prompt_len) == 0


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("block_size,max_seq_len", [(4, 16), (8, 24), (4, 18)])
def test_cached_logits_equal_full_forward_while_the_window_slides(pos, block_size, max_seq_len):
    """Past max_seq_len the window drops whole blocks (max_seq_len 18 is not a multiple of 4: the slide
    then comes mid-block); the cached step still equals model(window) at every step."""
    m = block_model(pos, block_size, max_seq_len=max_seq_len)
    ids = torch.randint(0, 256, (2, max_seq_len + 3 * block_size + 2), generator=torch.Generator().manual_seed(2))
    assert check_every_step(m, ids, 5) >= 3
    # a prompt longer than the context starts from the aligned window
    assert check_every_step(m, ids, max_seq_len + 3) >= 1


def test_window_start_is_block_aligned():
    assert window_start(10, 16, 4) == 0 and window_start(16, 16, 4) == 0
    assert window_start(17, 16, 4) == 4 and window_start(20, 16, 4) == 4 and window_start(21, 16, 4) == 8
    assert window_start(19, 18, 4) == 4  # 15 tokens left: the window never exceeds 18
    assert window_start(30, 16, 1) == 14


@pytest.mark.parametrize("pos", POS)
def test_local_and_decoder_caches_hold_one_block(pos):
    S = 4
    m = block_model(pos, S, max_seq_len=16)
    c = m.config
    cache = m.init_cache(3)
    H, D = c.n_heads, c.d_model // c.n_heads
    assert len(cache.local_k) == c.n_local_layers and len(cache.decoder_k) == c.n_decoder_layers
    for t in cache.local_k + cache.local_v + cache.decoder_k + cache.decoder_v:
        assert t.shape == (3, H, S, D)  # never more than a block per layer
    for t in cache.global_k + cache.global_v:
        assert t.shape == (3, H, 16 // S, D)  # one entry per block
    assert cache.block_states.shape == (3, S, c.d_model)
    ids = torch.randint(0, 256, (3, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.forward_step(ids[:, :6], cache)
        assert (cache.length, cache.n_blocks, cache.phase) == (6, 1, 2)
        for t in range(6, 14):
            m.forward_step(ids[:, t:t + 1], cache)
            assert cache.n_blocks == (t + 1) // S and cache.phase == (t + 1) % S
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert "blocks=3/4" in repr(cache)


def test_global_layers_run_once_per_block():
    """Per token the global layers do not run; they take one step when a block completes."""
    m = block_model("rope", 4, max_seq_len=24)
    calls = []
    orig = m.global_layers[0].forward_cached

    def counting(x, *a, **k):
        calls.append(x.shape[1])
        return orig(x, *a, **k)

    m.global_layers[0].forward_cached = counting
    try:
        cache = m.init_cache(1)
        ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            m.forward_step(ids[:, :9], cache)  # prefill: 2 whole blocks in one global call, then 1 token
            assert calls == [2]
            for t in range(9, 20):
                m.forward_step(ids[:, t:t + 1], cache)
        assert calls == [2, 1, 1, 1]  # tokens 12, 16 and 20 complete blocks 3, 4 and 5
    finally:
        del m.global_layers[0].forward_cached


@pytest.mark.parametrize("pos", POS)
def test_greedy_same_tokens_with_and_without_cache(pos):
    m = block_model(pos, 4, max_seq_len=18)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    a = generate(m, prompt, 30, temperature=0, use_cache=True)
    b = generate(m, prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 37) and torch.equal(a, b)
    c = generate(m, prompt[0], 25, temperature=1.0, top_k=40, seed=3, use_cache=True)
    d = generate(m, prompt[0], 25, temperature=1.0, top_k=40, seed=3, use_cache=False)
    assert torch.equal(c, d)


def test_errors_and_encoder_mode():
    m = block_model("rope", 4, max_seq_len=8)
    assert supports_cache(m)
    cache = m.init_cache(2)
    with pytest.raises(ValueError, match="batch"):
        m.forward_step(torch.zeros(1, 3, dtype=torch.long), cache)
    m.forward_step(torch.zeros(2, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="slide"):
        m.forward_step(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache_rebuild_keep"):
        generate(m, [1, 2], 3, cache_rebuild_keep=4)
    enc = block_model("rope", 4, max_seq_len=8, mode="encoder", n_classes=3)
    assert not supports_cache(enc)
    with pytest.raises(NotImplementedError, match="decoder mode"):
        enc.init_cache(1)
    with pytest.raises(ValueError, match="slide_cache needs"):
        m.slide_cache(m.init_cache(2))
