"""InterLayerTransformer.step (HILT's decoding path): the forward's modulation in few ops, fused and
functional, causal and not, with and without biases; ``out + scale * modulation`` form; HILT uses it."""
from __future__ import annotations

import pytest
import torch

from hilt.nn import InterLayerTransformer

from .helpers import hilt_model


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_step_equals_forward(causal, bias):
    torch.manual_seed(0)
    ilt = InterLayerTransformer(48, ilt_dim=32, n_heads=2, n_layers=2, dropout=0.0, causal=causal, bias=bias).eval()
    prev, cur = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    scale = torch.tensor(0.7)
    with torch.no_grad():
        ref = ilt(prev, cur)
        for fused in (True, False):
            torch.testing.assert_close(ilt.step(prev, cur, fused=fused), ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ilt.step(prev, cur, out=cur, scale=scale, fused=fused), cur + 0.7 * ref,
                                       atol=1e-6, rtol=1e-5)
    # with gradients enabled the functional path runs (the fused op has no backward) and gradients flow
    out = ilt.step(prev, cur)
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert ilt.proj_in.weight.grad is not None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_weights_every_shape(causal, bias):
    """One packed-weights object over changing shapes (its buffers are rebuilt per shape): one token
    (the 3-D bmm scores), several tokens (4-D matmul scores), back again; returned tensors are fresh."""
    torch.manual_seed(1)
    ilt = InterLayerTransformer(40, ilt_dim=24, n_heads=3, n_layers=3, dropout=0.0, causal=causal, bias=bias).eval()
    with torch.no_grad():
        for p in ilt.parameters():  # larger than the init, so that every part matters
            p.normal_(0, 0.3)
        w = ilt.step_weights()
        outs = []
        for shape in [(1, 1), (3, 1), (2, 4), (1, 1), (1, 1)]:
            prev, cur = torch.randn(*shape, 40), torch.randn(*shape, 40)
            ref = ilt(prev, cur)
            got = ilt.step(prev, cur, weights=w)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            outs.append((got, got.clone()))
            torch.testing.assert_close(ilt.step(prev, cur, out=cur, scale=torch.tensor(0.3), weights=w),
                                       cur + 0.3 * ref, atol=1e-5, rtol=1e-5)
        for got, copy in outs:  # later steps did not write into earlier results
            assert torch.equal(got, copy)


def test_hilt_cache_packs_ilt_weights():
    m = hilt_model("rope")
    cache = m.init_cache(1)
    assert len(cache.ilt_weights) == m.config.n_layers - 1
    assert all(w.dtype == m.ilts[0].proj_in.weight.dtype for w in cache.ilt_weights)


def test_hilt_step_path_calls_ilt_step(monkeypatch):
    m = hilt_model("rope")
    calls = []
    orig = InterLayerTransformer.step

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(InterLayerTransformer, "step", counting)
    with torch.no_grad():
        cache = m.init_cache(1)
        m.forward_step(torch.tensor([[1, 2, 3]]), cache)
        m.forward_step(torch.tensor([[4]]), cache)
    assert len(calls) == 2 * (m.config.n_layers - 1)
