"""Training FLOPs per token (hilt.models.flops) against hand counts for a tiny config of each model,
and the matmul part against torch's FlopCounterMode on a real forward pass."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hilt.models import GPT, HILT, BlockHierarchicalLM, BlockHierarchicalLMConfig, GPTConfig, HILTConfig
from hilt.models.flops import block_causal_keys, causal_keys, flops_per_token
from hilt.models.lformer import LFormer, LFormerConfig

V = 256  # vocab
D, H, FF = 8, 2, 16  # width, heads, MLP width of every tiny config


def mm(rows: int, k: int, n: int) -> int:
    """FLOPs of an (rows, k) @ (k, n) product."""
    return 2 * rows * k * n


def layer_linears(rows: int, d: int = D, ff: int = FF) -> int:
    """qkv, out_proj, fc1, fc2 of one transformer layer applied to ``rows`` vectors."""
    return mm(rows, d, 3 * d) + mm(rows, d, d) + mm(rows, d, ff) + mm(rows, ff, d)


def attn(keys_total: int, d: int = D) -> int:
    """QKᵀ and softmax·V summed over the queries of one layer, ``keys_total`` = Σ keys per query."""
    return 2 * 2 * d * keys_total


GPT_TINY = dict(d_model=D, n_heads=H, n_layers=2, d_ff=FF, max_seq_len=4, dropout=0.0)


def test_gpt_hand_count():
    T = 4  # causal: query t sees t + 1 keys -> 1 + 2 + 3 + 4 = 10 per layer
    linear = 2 * layer_linears(T)
    attention = 2 * attn(10)
    head = mm(T, D, V)
    f = flops_per_token("gpt", GPT_TINY, T)
    assert f.linear == linear / T and f.attention == attention / T and f.lm_head == head / T
    assert f.training == 3 * (linear + attention + head) / T == 18912


def test_hilt_hand_count():
    T = 4
    cfg = dict(GPT_TINY, ilt_dim=4, ilt_heads=2, ilt_layers=1)
    I = 4
    # one ILT (between layer 1 and 2), per token: proj_in on the 2 window states, one ILT layer on the
    # 2 elements (d_ff 4·I), window attention (element 0: 1 key, element 1: 2 keys), proj_out once
    ilt_linear = T * (2 * mm(1, D, I) + layer_linears(2, I, 4 * I) + mm(1, I, D))
    ilt_attn = T * attn(1 + 2, I)
    linear = 2 * layer_linears(T) + ilt_linear
    attention = 2 * attn(10) + ilt_attn
    head = mm(T, D, V)
    f = flops_per_token("hilt", cfg, T)
    assert (f.linear, f.attention, f.lm_head) == (linear / T, attention / T, head / T)
    # ILTs off: exactly GPT
    assert flops_per_token("hilt", dict(cfg, ilt_layers=0), T) == flops_per_token("gpt", GPT_TINY, T)


def test_block_hand_count():
    T, b = 5, 2  # blocks [0, 1] [2, 3] [4]: 3 block vectors, the last block short
    cfg = dict(d_model=D, n_heads=H, d_ff=FF, block_size=b, n_local_layers=1, n_global_layers=1,
               n_decoder_layers=1, max_seq_len=T, dropout=0.0)
    nb = 3
    local_keys = 1 + 2 + 1 + 2 + 1  # causal within each block
    global_keys = 1 + 2 + 3  # causal over the block vectors
    pool_linear = mm(T, D, H) + nb * (mm(1, D, D) + mm(1, D, D))  # scores x @ U; value rows, out_proj per block
    pool_sums = H * mm(1, T, D)  # each head's weighted sum of its block's tokens (values shared by heads)
    linear = 2 * layer_linears(T) + layer_linears(nb) + pool_linear
    attention = 2 * attn(local_keys) + attn(global_keys) + pool_sums
    head = mm(T, D, V)
    f = flops_per_token("block", cfg, T)
    assert f.linear == pytest.approx(linear / T, rel=1e-12)
    assert f.attention == pytest.approx(attention / T, rel=1e-12)
    assert f.lm_head == head / T
    with pytest.raises(ValueError, match="decoder"):
        flops_per_token("block", dict(cfg, mode="encoder", n_classes=3), T)


def test_lformer_hand_count():
    T, S = 4, 4
    cfg = dict(GPT_TINY, d_side=S, side_heads=2, tap_every=1, tap_mode="token", aggregator="ema",
               blend_into_lm=True)
    side = T * (2 * (mm(1, D, S) + mm(1, S, 4 * S) + mm(1, 4 * S, S)) + mm(1, S, D))  # 2 taps, blend
    linear = 2 * layer_linears(T) + side
    f = flops_per_token("lformer", cfg, T)
    assert (f.linear, f.attention, f.lm_head) == (linear / T, 2 * attn(10) / T, mm(T, D, V) / T)
    with pytest.raises(ValueError, match="n_tools"):
        flops_per_token("lformer", dict(cfg, n_tools=3), T)


def test_key_counts():
    assert causal_keys(4) == 2.5
    assert block_causal_keys(5, 2) == 7 / 5
    assert block_causal_keys(6, 3, causal=False) == 3
    assert block_causal_keys(8, 8) == causal_keys(8)  # one block: plain causal


@pytest.mark.parametrize("name", ["gpt", "hilt", "lformer", "block"])
def test_matmuls_match_flop_counter(name):
    """The linear part + LM head equal the matmul FLOPs torch counts on a real forward (attention
    runs through SDPA / hilt's ops, as do the pooling's weighted sums: FlopCounterMode does not see them)."""
    T = 16
    if name == "block":
        cfg = BlockHierarchicalLMConfig(d_model=D, n_heads=H, d_ff=FF, block_size=4, n_local_layers=1,
                                        n_global_layers=1, n_decoder_layers=1, max_seq_len=T, dropout=0.0)
        model = BlockHierarchicalLM(cfg)
    else:
        kw = dict(GPT_TINY, max_seq_len=T)
        cfg = {"gpt": lambda: GPTConfig(**kw), "hilt": lambda: HILTConfig(**kw, ilt_dim=4, ilt_layers=1),
               "lformer": lambda: LFormerConfig(**kw, d_side=4, tap_mode="token", blend_into_lm=True)}[name]()
        model = {"gpt": GPT, "hilt": HILT, "lformer": LFormer}[name](cfg)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, V, (1, T)))
    counted = counter.get_total_flops()
    f = flops_per_token(name, cfg, T)
    expected = (f.linear + f.lm_head) * T
    if name == "block":
        expected += 2 * H * (D // H) * D  # the pooling's score vectors W_kᵀ q: per forward, not per token
    assert counted == pytest.approx(expected, rel=1e-9), (counted, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token("gpt", GPT_TINY, 0)
    with pytest.raises(ValueError, match="unknown model"):
        flops_per_token("npt", GPT_TINY, 4)
    with pytest.raises(ValueError, match="nope"):
        flops_per_token("gpt", dict(GPT_TINY, nope=1), 4)
