"""generate(): greedy, seeded sampling, top-k / top-p, cropping to max_seq_len."""
from __future__ import annotations

import pytest
import torch

from hilt.generate import filter_logits, generate
from hilt.models import GPT, GPTConfig


def _model(T=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=T, dropout=0.0))


def test_greedy_matches_argmax_and_crops_to_the_context():
    m = _model(T=8)
    prompt = list(range(5))
    out = generate(m, prompt, 10, temperature=0)
    assert out.shape == (15,) and out[:5].tolist() == prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            nxt = m(ids[:, -8:]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids[0])


def test_sampling_is_seeded():
    m = _model()
    a = generate(m, [1, 2, 3], 12, temperature=1.0, top_k=20, seed=5)
    b = generate(m, [1, 2, 3], 12, temperature=1.0, top_k=20, seed=5)
    c = generate(m, torch.tensor([[1, 2, 3], [4, 5, 6]]), 12, temperature=1.0, top_p=0.9, seed=6)
    assert torch.equal(a, b) and c.shape == (2, 15)
    assert m.training  # mode restored


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    p = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0]) + 1e-3))[0]
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError):
        generate(_model(), [1], 2, temperature=-1)
