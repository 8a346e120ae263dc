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
