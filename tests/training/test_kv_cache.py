"""KV cache: cached logits equal full-forward logits at every step (GPT and HILT, learned / sinusoidal /
RoPE positions), greedy generation gives the same tokens with and without the cache, the sliding-window
rebuild when prompt + generation exceeds max_seq_len. (The other models: tests/generation/.)"""
from __future__ import annotations

import pytest
import torch

from hilt.generate import generate
from hilt.models import GPT, HILT, GPTConfig, HILTConfig

SMALL = dict(d_model=32, n_layers=3, n_heads=2, max_seq_len=24, dropout=0.0)


def _build(kind: str, pos: str, **kw):
    torch.manual_seed(0)
    if kind == "gpt":
        m = GPT(GPTConfig(pos_encoding=pos, **SMALL, **kw))
    else:
        m = HILT(HILTConfig(pos_encoding=pos, ilt_dim=16, ilt_dropout=0.0, **SMALL, **kw))
        m.set_ilt_scale(0.7)  # a large modulation, so a missing / stale ILT would show
    return m.eval()


CASES = [("gpt", "learned"), ("gpt", "sinusoidal"), ("gpt", "rope"), ("hilt", "learned"), ("hilt", "rope"),
         ("hilt", "sinusoidal")]


@pytest.mark.parametrize("kind,pos", CASES)
def test_cached_logits_equal_full_forward_at_every_step(kind, pos):
    m = _build(kind, pos)
    B, T = 2, 24
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids).logits
        cache = m.init_cache(B)
        # a 5-token prompt, then chunks of 1, 3, 1, ... tokens: every offset is exercised
        chunks, t = [5], 5
        while t < T:
            n = min(3 if len(chunks) % 2 == 0 else 1, T - t)
            chunks.append(n)
            t += n
        t = 0
        for n in chunks:
            step = m.forward_step(ids[:, t:t + n], cache).logits
            assert cache.length == t + n
            torch.testing.assert_close(step, full[:, t:t + n], atol=1e-5, rtol=1e-5)
            t += n
        with pytest.raises(ValueError, match="exceed the cache length"):
            m.forward_step(ids[:, :1], cache)


def test_hilt_cache_uses_the_current_ilt_scale_and_rewinds():
    m = _build("hilt", "learned")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = m.init_cache(1)
        outs = {}
        for scale in (0.0, 0.3, 2.0):  # the cached keys of layers >= 2 depend on the scale: re-prefill
            m.set_ilt_scale(scale)
            m.forward_step(ids[:, :6], cache.reset())
            outs[scale] = m.forward_step(ids[:, 6:], cache).logits
            torch.testing.assert_close(outs[scale], m(ids).logits[:, 6:], atol=1e-5, rtol=1e-5)
            again = m.forward_step(ids[:, 6:], cache, start_pos=6).logits  # rewind to 6 and re-feed
            torch.testing.assert_close(again, outs[scale], atol=1e-6, rtol=1e-6)
        assert (outs[0.0] - outs[2.0]).abs().max() > 1e-3  # the buffer is used


@pytest.mark.parametrize("kind,pos", [("gpt", "learned"), ("gpt", "rope"), ("hilt", "learned"), ("hilt", "rope")])
def test_greedy_generation_same_tokens_with_and_without_cache(kind, pos):
    m = _build(kind, pos)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    # 7 + 40 > max_seq_len 24: the window slides and the cache is rebuilt every step past the context
    a = generate(m, prompt, 40, temperature=0, use_cache=True)
    b = generate(m, prompt, 40, temperature=0, use_cache=False)
    assert a.shape == (2, 47) and torch.equal(a, b)
    # sampling with a seed: the same tokens too
    c = generate(m, prompt[0], 12, temperature=1.0, top_k=50, seed=4, use_cache=True)
    d = generate(m, prompt[0], 12, temperature=1.0, top_k=50, seed=4, use_cache=False)
    assert torch.equal(c, d)


def test_sliding_window_rebuild_matches_a_hand_written_window():
    """Past max_seq_len every step conditions on exactly the last max_seq_len tokens (positions 0..);
    with cache_rebuild_keep=k the cache restarts from the last k tokens when full."""
    m = _build("gpt", "learned")
    L = m.config.max_seq_len
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    out = generate(m, prompt, 12, temperature=0)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, m(ids[:, -L:]).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    # keep = 8: after the context fills (24 tokens), the window restarts at 8 tokens and grows again
    k = 8
    out_k = generate(m, prompt, 12, temperature=0, cache_rebuild_keep=k)
    ids, start = prompt.clone(), 0
    with torch.no_grad():
        for _ in range(12):
            if ids.shape[1] - start > L:
                start = ids.shape[1] - k
            ids = torch.cat([ids, m(ids[:, start:]).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out_k, ids)
    with pytest.raises(ValueError, match="cache_rebuild_keep"):
        generate(m, prompt, 2, cache_rebuild_keep=L + 1)


def test_cache_errors_are_clear():
    m = _build("gpt", "learned")
    with pytest.raises(ValueError, match="max_len"):
        m.init_cache(1, max_len=m.config.max_seq_len + 1)
    cache = m.init_cache(2, max_len=8)
    with pytest.raises(ValueError, match="batch"):
        m.forward_step(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="start_pos"):
        m.forward_step(torch.zeros(2, 1, dtype=torch.long), cache, start_pos=3)
    m.forward_step(torch.zeros(2, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="rebuild"):
        m.forward_step(torch.zeros(2, 1, dtype=torch.long), cache)
    assert "length=8/8" in repr(cache)


def test_cli_generate_same_text_with_and_without_the_cache(tmp_path, capsys):
    from hilt.training.checkpoint import save_checkpoint
    from hilt.cli import main as cli_main

    m = _build("hilt", "rope")
    save_checkpoint(tmp_path / "ckpt", m)
    texts = []
    for extra in ([], ["--no-kv-cache"]):
        rc = cli_main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "def f(x):", "--max-new-tokens",
                       "30", "--temperature", "0", "--device", "cpu", "--threads", "1", *extra])
        assert rc == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def f(x):")
