"""TransformerLayer, MLP, positional encodings and InterLayerTransformer."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hilt.nn import (MLP, InterLayerTransformer, LearnedPositionalEncoding, SinusoidalPositionalEncoding,
                     TransformerLayer)


def test_sinusoidal_matches_formula():
    pe = SinusoidalPositionalEncoding(6, max_seq_len=20)
    x = torch.zeros(1, 20, 6)
    y = pe(x)[0]
    for pos in (0, 3, 19):
        for i in range(3):
            ang = pos / 10000 ** (2 * i / 6)
            assert y[pos, 2 * i].item() == pytest.approx(math.sin(ang), abs=1e-6)
            assert y[pos, 2 * i + 1].item() == pytest.approx(math.cos(ang), abs=1e-6)
    torch.testing.assert_close(pe(torch.ones(2, 4, 6), offset=3), 1 + y[3:7].expand(2, 4, 6))
    assert "pe" not in pe.state_dict()
    assert SinusoidalPositionalEncoding(5, 4)(torch.zeros(1, 4, 5)).shape == (1, 4, 5)  # odd d_model
    with pytest.raises(ValueError, match="max_seq_len"):
        pe(torch.zeros(1, 21, 6))


def test_learned_positional_encoding():
    pe = LearnedPositionalEncoding(8, max_seq_len=10)
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(pe(x), x + pe.weight[:7])
    torch.testing.assert_close(pe(x, offset=2), x + pe.weight[2:9])
    with pytest.raises(ValueError, match="max_seq_len"):
        pe(torch.zeros(1, 9, 8), offset=2)


def test_transformer_layer_is_pre_ln():
    torch.manual_seed(0)
    layer = TransformerLayer(32, 2, d_ff=48, attention="causal").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    h = x + layer.attn(F.layer_norm(x, (32,), layer.norm1.weight, layer.norm1.bias))
    n2 = F.layer_norm(h, (32,), layer.norm2.weight, layer.norm2.bias)
    ref = h + layer.mlp.fc2(F.gelu(layer.mlp.fc1(n2)))
    torch.testing.assert_close(layer(x), ref)
    assert layer.mlp.d_ff == 48 and TransformerLayer(32, 2).mlp.d_ff == 128


@pytest.mark.parametrize("kind,shape", [("causal", (2, 10, 32)), ("full", (2, 10, 32)),
                                        ("block", (2, 10, 32)), ("window2", (2, 2, 10, 32))])
def test_transformer_layer_kinds_shapes_and_grads(kind, shape):
    torch.manual_seed(1)
    layer = TransformerLayer(32, 2, attention=kind, block_size=4, causal=kind != "full")
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_transformer_layer_block_attention_is_local_and_causal():
    torch.manual_seed(2)
    layer = TransformerLayer(32, 2, attention="block", block_size=4, causal=True)
    x = torch.randn(1, 12, 32)
    y = layer(x)
    x2 = x.clone()
    x2[0, 6] += torch.randn(32)  # block 1 = tokens 4..7 (a constant shift would vanish in LayerNorm)
    y2 = layer(x2)
    changed = (y2 - y).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * 6 + [True, True] + [False] * 4


def test_transformer_layer_custom_attention_and_errors():
    class Identity(nn.Module):
        def forward(self, x, key_padding_mask=None):
            return x
    layer = TransformerLayer(32, 2, attention=Identity())
    assert layer.attention_kind == "custom" and layer(torch.randn(1, 3, 32)).shape == (1, 3, 32)
    with pytest.raises(ValueError, match="attention"):
        TransformerLayer(32, 2, attention="nope")
    with pytest.raises(ValueError, match="block_size"):
        TransformerLayer(32, 2, attention="block")
    with pytest.raises(ValueError, match="full"):
        TransformerLayer(32, 2, attention="causal", causal=False)
    assert MLP(8)(torch.randn(2, 8)).shape == (2, 8)


def _naive_ilt(ilt, prev, cur):
    """ILT computed from its weights with plain ops and an explicit 2x2 softmax."""
    x = torch.stack([ilt.proj_in(prev), ilt.proj_in(cur)], 1) + ilt.window_emb[None, :, None]
    x = F.layer_norm(x, (ilt.ilt_dim,), ilt.norm.weight, ilt.norm.bias)
    H = ilt.n_heads
    D = ilt.ilt_dim // H
    for layer in ilt.layers:
        h = F.layer_norm(x, (ilt.ilt_dim,), layer.norm1.weight, layer.norm1.bias)
        q, k, v = layer.attn.qkv(h).split(ilt.ilt_dim, -1)
        sh = lambda t: t.reshape(*t.shape[:-1], H, D)
        q, k, v = sh(q), sh(k), sh(v)
        s = torch.einsum("bitnd,bjtnd->btnij", q, k) / math.sqrt(D)
        if ilt.causal:
            s = s.masked_fill(torch.tensor([[False, True], [False, False]]), float("-inf"))
        a = torch.einsum("btnij,bjtnd->bitnd", s.softmax(-1), v).reshape(x.shape)
        x = x + layer.attn.out_proj(a)
        h = F.layer_norm(x, (ilt.ilt_dim,), layer.norm2.weight, layer.norm2.bias)
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))
    return ilt.proj_out(x.mean(1))


@pytest.mark.parametrize("causal", [True, False])
def test_inter_layer_transformer_matches_naive(causal):
    torch.manual_seed(3)
    ilt = InterLayerTransformer(32, ilt_dim=16, n_heads=2, n_layers=2, dropout=0.0, causal=causal).double()
    prev, cur = torch.randn(2, 2, 7, 32, dtype=torch.float64).unbind(0)
    out = ilt(prev, cur)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out, _naive_ilt(ilt, prev, cur), atol=1e-10, rtol=1e-8)
    # the window-position embedding lets the ILT tell prev from cur
    assert not torch.allclose(ilt(cur, prev), out)
    # tokens never mix
    cur2 = cur.clone()
    cur2[:, 3] += 1.0
    d = (ilt(prev, cur2) - out).abs().amax(-1)
    assert (d[:, 3] > 0).all() and d[:, [0, 1, 2, 4, 5, 6]].max() == 0


def test_inter_layer_transformer_init_and_grads():
    torch.manual_seed(4)
    ilt = InterLayerTransformer(32, ilt_dim=16, n_heads=2, n_layers=2, dropout=0.1)
    assert ilt.proj_out.weight.abs().sum() > 0  # not zero-initialised
    assert len(ilt.layers) == 2 and ilt.layers[0].attention_kind == "window2"
    assert "ilt_dim=16" in repr(ilt)
    prev, cur = torch.randn(2, 2, 5, 32).unbind(0)
    out = ilt(prev, cur)
    assert out.abs().sum() > 0
    out.square().sum().backward()
    for name, p in ilt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ilt.eval()
    torch.testing.assert_close(ilt(prev, cur), ilt(prev, cur))
    with pytest.raises(ValueError):
        InterLayerTransformer(32, ilt_dim=15, n_heads=2)
    with pytest.raises(ValueError):
        ilt(prev, cur[:, :3])
