"""hilt.nn attention modules against independent implementations (nn.MultiheadAttention, naive loops)."""
import math

import pytest
import torch
from torch import nn

from hilt.nn import BlockLocalAttention, CausalSelfAttention, RotaryEmbedding, Window2Attention


def _mha_like(mod, d_model, n_heads):
    """nn.MultiheadAttention holding the same weights as a hilt attention module."""
    mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(mod.qkv.weight)
        mha.in_proj_bias.copy_(mod.qkv.bias)
        mha.out_proj.weight.copy_(mod.out_proj.weight)
        mha.out_proj.bias.copy_(mod.out_proj.bias)
    return mha.eval()


def _block_mask(T, b, causal):
    """(T, T) bool, True = NOT allowed (nn.MultiheadAttention convention)."""
    t = torch.arange(T)
    allowed = (t[:, None] // b) == (t[None, :] // b)
    if causal:
        allowed &= t[None, :] <= t[:, None]
    return ~allowed


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,b", [(16, 4), (13, 4), (7, 8), (9, 1)])
def test_block_local_attention_matches_mha(causal, T, b):
    torch.manual_seed(0)
    d, H, B = 32, 2, 2
    mod = BlockLocalAttention(d, H, b, causal=causal).double().eval()
    mha = _mha_like(mod, d, H)
    x = torch.randn(B, T, d, dtype=torch.float64)
    ours = mod(x)
    ref, _ = mha(x, x, x, attn_mask=_block_mask(T, b, causal), need_weights=False)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [True, False])
def test_block_local_attention_padding_matches_mha(causal):
    torch.manual_seed(1)
    d, H, B, T, b = 32, 2, 2, 14, 4
    mod = BlockLocalAttention(d, H, b, causal=causal).double().eval()
    mha = _mha_like(mod, d, H)
    x = torch.randn(B, T, d, dtype=torch.float64)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 11:] = True  # right padding: block 3 (12, 13) fully padded
    kpm[1, 5] = True    # a hole inside a block
    kpm[1, 0] = True    # first token of block 0: query 0 has no valid key when causal
    ours = mod(x, key_padding_mask=kpm)
    mask = _block_mask(T, b, causal)
    ref, _ = mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)
    # queries that have at least one valid key: equal to MHA
    has_key = ((~mask)[None] & ~kpm[:, None, :]).any(-1)
    torch.testing.assert_close(ours[has_key], ref[has_key], atol=1e-10, rtol=1e-8)
    # queries with no valid key: the op gives zeros, so the module gives the out-proj bias (never NaN)
    assert (~has_key).any()
    torch.testing.assert_close(ours[~has_key], mod.out_proj.bias.expand_as(ours[~has_key]))
    # padded keys do not matter
    x2 = x.clone()
    x2[kpm] = torch.randn_like(x2[kpm]) * 10
    torch.testing.assert_close(mod(x2, key_padding_mask=kpm)[~kpm], ours[~kpm])


@pytest.mark.parametrize("causal", [True, False])
def test_causal_self_attention_matches_mha(causal):
    torch.manual_seed(2)
    d, H, B, T = 32, 2, 2, 11
    mod = CausalSelfAttention(d, H, causal=causal).double().eval()
    mha = _mha_like(mod, d, H)
    x = torch.randn(B, T, d, dtype=torch.float64)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(mod(x), ref, atol=1e-10, rtol=1e-8)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 8:] = True
    kpm[1, 3] = True
    ref, _ = mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)
    ours = mod(x, key_padding_mask=kpm)
    torch.testing.assert_close(ours[~kpm], ref[~kpm], atol=1e-10, rtol=1e-8)
    # a query whose keys are all padding (left padding, causal) gives zeros -> out-proj bias, no NaN
    kpm_left = torch.zeros(B, T, dtype=torch.bool)
    kpm_left[:, :2] = True
    y = mod(x, key_padding_mask=kpm_left)
    assert torch.isfinite(y).all()
    if causal:
        torch.testing.assert_close(y[:, :2], mod.out_proj.bias.expand(B, 2, d))


def _rope_complex(x, base=10000.0, offset=0):
    """Independent RoPE: pairs (i, i + D/2) as complex numbers times exp(i * pos * theta_i)."""
    T, D = x.shape[-3], x.shape[-1]
    half = D // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    rot = torch.polar(torch.ones(T, half, dtype=torch.float64), pos[:, None] * theta[None])  # (T, half)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_rotary_embedding_matches_complex_form_and_is_relative():
    torch.manual_seed(3)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 10, 3, 8)
    torch.testing.assert_close(rope(x).double(), _rope_complex(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(x, offset=5).double(), _rope_complex(x, offset=5), atol=1e-5, rtol=1e-5)
    # q·k after rotation depends only on the distance
    q, k = torch.randn(8), torch.randn(8)
    def dot(m, n):
        seq_q = torch.zeros(1, 12, 1, 8); seq_q[0, m, 0] = q
        seq_k = torch.zeros(1, 12, 1, 8); seq_k[0, n, 0] = k
        return (rope(seq_q)[0, m, 0] * rope(seq_k)[0, n, 0]).sum()
    torch.testing.assert_close(dot(7, 4), dot(5, 2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dot(7, 4), dot(7, 3))
    with pytest.raises(ValueError):
        RotaryEmbedding(7)


def _naive_attention(q, k, v, allowed):
    """q, k, v (B, T, H, D); allowed (B or 1, T, T) bool."""
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


@pytest.mark.parametrize("kind", ["block", "full"])
def test_attention_with_rope_matches_naive(kind):
    torch.manual_seed(4)
    d, H, B, T, b = 32, 2, 2, 13, 4
    if kind == "block":
        mod = BlockLocalAttention(d, H, b, causal=True, rope=True).double()
        allowed = ~_block_mask(T, b, True)[None]
    else:
        mod = CausalSelfAttention(d, H, causal=True, rope=True).double()
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
    x = torch.randn(B, T, d, dtype=torch.float64)
    q, k, v = mod.qkv(x).view(B, T, 3, H, d // H).unbind(2)
    y = _naive_attention(_rope_complex(q), _rope_complex(k), v, allowed)
    ref = mod.out_proj(y.reshape(B, T, d))
    torch.testing.assert_close(mod(x), ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("causal", [True, False])
def test_window2_attention_module_matches_naive(causal):
    torch.manual_seed(5)
    d, H, B, T = 16, 2, 2, 5
    mod = Window2Attention(d, H, causal=causal).double()
    x = torch.randn(B, 2, T, d, dtype=torch.float64)
    q, k, v = mod.qkv(x).view(B, 2, T, 3, H, d // H).unbind(3)
    out = torch.empty_like(q)
    for i in range(2):
        js = [0] if (causal and i == 0) else [0, 1]
        s = torch.stack([(q[:, i] * k[:, j]).sum(-1) for j in js], -1) / math.sqrt(d // H)  # (B, T, H, n)
        w = s.softmax(-1)
        out[:, i] = sum(w[..., n, None] * v[:, j] for n, j in enumerate(js))
    ref = mod.out_proj(out.reshape(B, 2, T, d))
    torch.testing.assert_close(mod(x), ref, atol=1e-10, rtol=1e-8)
    # causal over the window: element 0 ignores element 1; tokens never mix
    x2 = x.clone()
    x2[:, 1] += torch.randn_like(x2[:, 1])
    x2[:, 0, 3] += 1.0
    y, y2 = mod(x), mod(x2)
    if causal:
        torch.testing.assert_close(y2[:, 0, :3], y[:, 0, :3])
        torch.testing.assert_close(y2[:, 0, 4], y[:, 0, 4])
    else:
        assert not torch.allclose(y2[:, 0], y[:, 0])
    x3 = x.clone()
    x3[:, :, 2] += 1.0
    torch.testing.assert_close(mod(x3)[:, :, [0, 1, 3, 4]], y[:, :, [0, 1, 3, 4]])


@pytest.mark.parametrize("make", [
    lambda: BlockLocalAttention(32, 2, 4, rope=True),
    lambda: CausalSelfAttention(32, 2, rope=True),
    lambda: Window2Attention(32, 2),
])
def test_attention_gradients_reach_all_parameters(make):
    torch.manual_seed(6)
    mod = make()
    x = torch.randn(2, 2, 10, 32) if isinstance(mod, Window2Attention) else torch.randn(2, 10, 32)
    x.requires_grad_(True)
    mod(x).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_block_local_attention_passes_views_and_backend(monkeypatch):
    import hilt.nn.attention as A
    seen = {}
    real = A.block_local_attention

    def spy(q, k, v, block_size, **kw):
        seen.update(q_contig=q.is_contiguous(), shape=tuple(q.shape), backend=kw.get("backend"),
                    same_storage=q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr())
        return real(q, k, v, block_size, **kw)

    monkeypatch.setattr(A, "block_local_attention", spy)
    mod = BlockLocalAttention(32, 2, 4, backend="reference")
    mod(torch.randn(2, 8, 32))
    assert seen == {"q_contig": False, "shape": (2, 8, 2, 16), "backend": "reference", "same_storage": True}


def test_modules_constructor_conventions():
    m = BlockLocalAttention(32, 2, 4, device="meta", dtype=torch.float64)
    assert m.qkv.weight.device.type == "meta" and m.qkv.weight.dtype == torch.float64
    assert "block_size=4" in repr(m) and "causal=True" in repr(m)
    m = CausalSelfAttention(32, 2, bias=False)
    assert m.qkv.bias is None
    before = m.qkv.weight.clone()
    m.reset_parameters()
    assert not torch.equal(before, m.qkv.weight)
    with pytest.raises(ValueError, match="divisible"):
        BlockLocalAttention(30, 4, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockLocalAttention(32, 2, 0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        BlockLocalAttention(32, 2, 4)(torch.randn(2, 8, 32), key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        CausalSelfAttention(32, 2)(torch.randn(2, 8, 32), key_padding_mask=torch.zeros(2, 8))
