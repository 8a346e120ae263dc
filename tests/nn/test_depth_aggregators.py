"""Depth aggregators (L-Former side path): EMA vs a hand loop, α init, GRU/attention shapes,
causality over depth, no mixing across positions, gradients, validation, factory kwargs."""
import pytest
import torch

from hilt.nn import (DEPTH_AGGREGATORS, AttentionDepthAggregator, EMADepthAggregator, GRUDepthAggregator,
                     make_depth_aggregator)

D = 8
L = 5


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def build(kind, n_taps=L, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "ema":
        agg = EMADepthAggregator(D, n_taps, **kw)
        with torch.no_grad():  # away from the uniform init, so every gate matters
            agg.alpha_logits.copy_(rand(*agg.alpha_logits.shape, seed=seed + 1))
        return agg
    if kind == "gru":
        return GRUDepthAggregator(D, **kw)
    return AttentionDepthAggregator(D, n_heads=2, n_taps=n_taps, **kw)


def ema_loop(values, alpha_logits, init=None):
    a = torch.sigmoid(alpha_logits)
    s = torch.zeros_like(values[0]) if init is None else init.expand_as(values[0]).clone()
    out = []
    for l in range(values.shape[0]):
        s = (1 - a[l]) * s + a[l] * values[l]
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(L, 3, 7, D), (L, 3, D)], ids=["token-wise", "sequence-wise"])
def test_ema_matches_a_hand_written_loop(per_channel, shape):
    agg = build("ema", per_channel=per_channel).double()
    values = rand(*shape, seed=3, dtype=torch.float64)
    torch.testing.assert_close(agg(values), ema_loop(values, agg.alpha_logits.detach()))
    init = rand(D, seed=4, dtype=torch.float64)
    torch.testing.assert_close(agg(values, init=init), ema_loop(values, agg.alpha_logits.detach(), init))
    # scanning in chunks with the gates' offset and the carried state equals one scan
    first = agg(values[:2])
    rest = agg(values[2:], init=first[-1], start=2)
    torch.testing.assert_close(torch.cat([first, rest]), agg(values))
    # gradients equal the loop's
    v1 = values.clone().requires_grad_()
    v2 = values.clone().requires_grad_()
    w = rand(*shape, seed=5, dtype=torch.float64)
    (agg(v1) * w).sum().backward()
    g_alpha = agg.alpha_logits.grad.clone()
    agg.alpha_logits.grad = None
    (ema_loop(v2, agg.alpha_logits) * w).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(g_alpha, agg.alpha_logits.grad)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ema_alpha_starts_at_0_12(per_channel):
    agg = EMADepthAggregator(D, L, per_channel=per_channel)
    assert agg.alpha_logits.shape == ((L, D) if per_channel else (L,))
    torch.testing.assert_close(agg.alphas(), torch.full(agg.alpha_logits.shape, 0.12), atol=1e-7, rtol=0)
    assert agg.alphas().requires_grad  # the gates are differentiable (sparsity losses)
    with torch.no_grad():
        agg.alpha_logits.add_(1.0)
    agg.reset_parameters()
    torch.testing.assert_close(agg.alphas(), torch.full(agg.alpha_logits.shape, 0.12), atol=1e-7, rtol=0)
    agg = EMADepthAggregator(D, L, alpha_init=0.3, dtype=torch.float64)
    torch.testing.assert_close(agg.alphas(), torch.full((L,), 0.3, dtype=torch.float64))
    assert "alpha_init=0.3" in repr(agg) and "per_channel=False" in repr(agg)


def gru_loop(agg, values):
    h = torch.zeros(values[0].reshape(-1, D).shape, dtype=values.dtype)
    out = []
    for l in range(values.shape[0]):
        h = agg.cell(values[l].reshape(-1, D), h)
        out.append(h.view(values.shape[1:]))
    return torch.stack(out)


def test_gru_matches_a_gru_cell_loop():
    agg = build("gru")
    values = rand(L, 2, 3, D, seed=2)
    torch.testing.assert_close(agg(values), gru_loop(agg, values))
    init = rand(2, 3, D, seed=8)
    first = agg(values[:2], init=init)
    torch.testing.assert_close(agg(values[2:], init=first[-1]), agg(values, init=init)[2:])


@pytest.mark.parametrize("kind", DEPTH_AGGREGATORS)
@pytest.mark.parametrize("shape", [(L, 2, 6, D), (L, 3, D), (1, 2, D)], ids=["token-wise", "sequence-wise", "L=1"])
def test_shapes_and_finite(kind, shape):
    agg = build(kind)
    out = agg(rand(*shape))
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", DEPTH_AGGREGATORS)
def test_causal_over_depth(kind):
    agg = build(kind).eval()
    values = rand(L, 2, 4, D, seed=1)
    base = agg(values)
    for l in range(L - 1):
        v2 = values.clone()
        v2[l + 1:] = rand(L - l - 1, 2, 4, D, seed=50 + l)
        out = agg(v2)
        torch.testing.assert_close(out[:l + 1], base[:l + 1], atol=1e-6, rtol=0,
                                   msg=lambda m: f"state {l} depends on later taps: {m}")
        assert not torch.allclose(out[l + 1:], base[l + 1:], atol=1e-4)
    # and state l does depend on tap l and the ones before
    v3 = values.clone()
    v3[0] += rand(2, 4, D, seed=99)  # not a constant shift: the attention aggregator's LayerNorm removes those
    assert ((agg(v3) - base).abs().amax((1, 2, 3)) > 1e-5).all()


@pytest.mark.parametrize("kind", DEPTH_AGGREGATORS)
def test_positions_never_mix(kind):
    # token-wise states must stay causal over tokens: token t's states depend on token t's taps only
    agg = build(kind).eval()
    values = rand(L, 2, 5, D, seed=1)
    base = agg(values)
    v2 = values.clone()
    v2[:, 1, 3] = rand(L, D, seed=9)
    changed = (agg(v2) - base).abs().amax((0, -1)) > 1e-6  # (B, T)
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[1, 3] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("kind", DEPTH_AGGREGATORS)
def test_gradients_reach_inputs_and_parameters(kind):
    agg = build(kind).train()
    values = rand(L, 2, 3, D).requires_grad_()
    (agg(values) * rand(L, 2, 3, D, seed=7)).sum().backward()
    assert values.grad is not None and (values.grad.abs().sum((1, 2, 3)) > 0).all()
    for name, p in agg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_init_is_an_offset_and_uses_the_depth_embedding():
    agg = build("attn").eval()
    values = rand(3, 2, D)
    init = rand(D, seed=3)
    torch.testing.assert_close(agg(values, init=init), agg(values) + init)
    # without a depth embedding the module still works, with any L
    plain = AttentionDepthAggregator(D, n_heads=4)
    assert plain.depth_emb is None and plain(rand(9, 2, D)).shape == (9, 2, D)
    assert "n_heads=4" in repr(plain)


def test_validation():
    with pytest.raises(ValueError, match="d_side"):
        build("ema")(rand(L, 2, D + 1))
    with pytest.raises(ValueError, match="n_taps"):
        build("ema")(rand(L + 1, 2, D))
    with pytest.raises(ValueError, match="n_taps"):
        build("attn")(rand(L + 1, 2, D))
    with pytest.raises(ValueError, match="values"):
        build("gru")(rand(D))
    with pytest.raises(ValueError, match="init"):
        build("gru")(rand(L, 2, D), init=rand(3, D))
    with pytest.raises(ValueError, match="alpha_init"):
        EMADepthAggregator(D, L, alpha_init=1.0)
    with pytest.raises(ValueError, match="divisible"):
        AttentionDepthAggregator(D, n_heads=3)
    with pytest.raises(ValueError, match="aggregator"):
        make_depth_aggregator("lstm", D, L)


@pytest.mark.parametrize("kind", DEPTH_AGGREGATORS)
def test_factory_kwargs_and_make(kind):
    agg = make_depth_aggregator(kind, D, L, n_heads=2)
    assert type(agg) is {"ema": EMADepthAggregator, "gru": GRUDepthAggregator,
                         "attn": AttentionDepthAggregator}[kind]
    meta = make_depth_aggregator(kind, D, L, n_heads=2, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    d64 = make_depth_aggregator(kind, D, L, n_heads=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in d64.parameters())
    assert d64(rand(L, 2, D, dtype=torch.float64)).dtype == torch.float64
    assert f"d_side={D}" in repr(agg)
