"""The Hugging Face adapter on a tiny randomly initialised LlamaForCausalLM (offline)."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install hilt[hf])")

from hilt.hf import convert_hf_llama_to_npt  # noqa: E402
from hilt.models import npt as N  # noqa: E402


def tiny_hf(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_convert_standard_mode_npt_mode_and_gradients(tmp_path):
    m = tiny_hf()
    orig = copy.deepcopy(m)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = orig(ids).logits
    assert convert_hf_llama_to_npt(m, "1-2", np_rank=8, num_ranks=2) == [1, 2]
    assert N.npt_layers(m) == [1, 2] and isinstance(m.model.layers[1], type(orig.model.layers[1]))
    with torch.no_grad():
        with N.standard_mode(m):
            assert torch.equal(m(ids).logits, ref)  # standard mode: the original layers exactly
        # NPT mode with v_b = 0: the attention residual is gone, the MLP is plain
        layer = m.model.layers[2]
        h = torch.randn(2, 10, 32)
        pos = torch.arange(10)[None]
        pe = m.model.rotary_emb(h, position_ids=pos)
        got = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        assert torch.allclose(got, h + layer.mlp(layer.post_attention_layernorm(h)), atol=1e-6)
        assert not torch.allclose(m(ids).logits, ref, atol=1e-4)
    # causal
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 5) % 64
    with torch.no_grad():
        assert torch.allclose(m(ids).logits[:, :6], m(ids2).logits[:, :6], atol=1e-5)
    # only NP weights train
    N.freeze_base(m)
    loss = m(ids, labels=ids).loss
    loss.backward()
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (".np." in name), name
    # NP weights round trip onto a fresh copy of the base
    with torch.no_grad():
        for p in N.np_parameters(m):
            p.normal_(std=0.05)
    path = N.save_np_weights(m, tmp_path / "np.safetensors")
    fresh = tiny_hf()
    assert N.load_np_weights(fresh, path) == [1, 2]
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, m(ids).logits, atol=1e-6)
    with pytest.raises(N.NPTError, match="already an NP layer"):
        convert_hf_llama_to_npt(m, [1], np_rank=8, num_ranks=2)
    with pytest.raises(N.NPTError, match="same settings"):
        convert_hf_llama_to_npt(m, [0], np_rank=4)
