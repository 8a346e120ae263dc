"""AttentionPooling against a plain multi-head attention pooling computed naively."""
import math

import pytest
import torch

from hilt.nn import AttentionPooling, block_padding_mask


def naive_pool(x, query, wk, bk, wv, bv, wo, bo, block_size, kpm=None):
    """Standard form: a learned query per head attends over each block's tokens with
    k = x W_kᵀ + b_k, v = x W_vᵀ + b_v (per-head slices), heads concatenated, out projection.
    Loops over batch, blocks and heads; a fully padded block -> zeros."""
    B, T, C = x.shape
    H, D = query.shape
    nb = -(-T // block_size)
    out = torch.zeros(B, nb, C, dtype=x.dtype)
    for b in range(B):
        for n in range(nb):
            idx = [t for t in range(n * block_size, min(T, (n + 1) * block_size))
                   if kpm is None or not kpm[b, t]]
            if not idx:
                continue
            xb = x[b, idx]  # (n_tok, C)
            k = xb @ wk.T + bk
            v = xb @ wv.T + bv
            heads = []
            for h in range(H):
                sl = slice(h * D, (h + 1) * D)
                s = (k[:, sl] @ query[h]) / math.sqrt(D)
                w = torch.softmax(s, 0)
                heads.append(w @ v[:, sl])
            out[b, n] = torch.cat(heads) @ wo.T + bo
    return out


def _weights(mod, with_key_bias):
    bk = torch.randn(mod.d_model, dtype=torch.float64) if with_key_bias else torch.zeros(mod.d_model, dtype=torch.float64)
    return (mod.query, mod.k_proj.weight, bk, mod.v_proj.weight, mod.v_proj.bias,
            mod.out_proj.weight, mod.out_proj.bias)


@pytest.mark.parametrize("T,b", [(16, 4), (13, 4), (5, 8), (6, 1)])
def test_attention_pooling_matches_naive(T, b):
    torch.manual_seed(0)
    mod = AttentionPooling(32, 2, b, query_init_std=1.0).double()
    x = torch.randn(3, T, 32, dtype=torch.float64)
    out = mod(x)
    assert out.shape == (3, -(-T // b), 32)
    # a key bias in the standard form cancels in the softmax: same answer with a random one
    ref = naive_pool(x, *_weights(mod, with_key_bias=True), b)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)


def test_attention_pooling_padding_matches_naive():
    torch.manual_seed(1)
    b, T = 4, 14
    mod = AttentionPooling(32, 2, b, query_init_std=1.0).double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[0, 9:] = True      # block 2 partly, block 3 (12, 13) fully padded
    kpm[1, 4:8] = True     # block 1 fully padded in the middle
    kpm[1, 0] = True
    out = mod(x, key_padding_mask=kpm)
    ref = naive_pool(x, *_weights(mod, with_key_bias=False), b, kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    assert out[0, 3].abs().max() == 0 and out[1, 1].abs().max() == 0
    # changing padded tokens changes nothing (the seed's inverted mask pooled only padding)
    x2 = x.clone()
    x2[kpm] = torch.randn_like(x2[kpm]) * 100
    torch.testing.assert_close(mod(x2, key_padding_mask=kpm), out)
    # and the valid tokens do matter
    x3 = x.clone()
    x3[0, 8] += 1.0
    assert not torch.allclose(mod(x3, key_padding_mask=kpm)[0, 2], out[0, 2])


def test_attention_pooling_gradients_and_zero_grad_for_padded_blocks():
    torch.manual_seed(2)
    mod = AttentionPooling(32, 2, 4)
    x = torch.randn(2, 12, 32, requires_grad=True)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 8:] = True
    mod(x, key_padding_mask=kpm).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad[1, 8:].abs().max() == 0
    assert x.grad[~kpm].abs().sum() > 0


def test_block_padding_mask():
    kpm = torch.tensor([[False, True, True, True, True, True, True],
                        [True, True, True, False, True, True, True]])
    assert block_padding_mask(kpm, 3).tolist() == [[False, True, True], [True, False, True]]
    assert block_padding_mask(None, 3) is None


def test_attention_pooling_conventions():
    m = AttentionPooling(32, 4, 8, device="meta")
    assert m.query.shape == (4, 8) and m.query.device.type == "meta"
    assert "block_size=8" in repr(m)
    assert AttentionPooling(32, 2, 4).score_weights().shape == (32, 2)
    with pytest.raises(ValueError):
        AttentionPooling(32, 3, 4)
    with pytest.raises(ValueError):
        AttentionPooling(32, 2, 0)
