"""Llama and NP layers: conversion, equivalences, gradients, save/load, causality, RoPE, the metrics."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hilt
from hilt.training.checkpoint import get_model_spec, save_checkpoint
from hilt.generate import generate
from hilt.models import Llama, LlamaConfig, NPTLayer, convert_to_npt, freeze_base
from hilt.models import npt as N
from hilt.models.llama import LlamaLayer
from hilt.nn import RotaryEmbedding

from .helpers import rand_ids, randomize_np, tiny_llama


# ---------------------------------------------------------------------------------------------- Llama

def test_llama_registered_and_loads(tmp_path):
    assert get_model_spec("llama").model_class is Llama
    m = tiny_llama(n_kv_heads=1, tie_embeddings=True)
    save_checkpoint(tmp_path / "ck", m, step=3)
    m2 = hilt.load(tmp_path / "ck")
    ids = rand_ids()
    assert isinstance(m2, Llama) and m2.lm_head.weight is m2.tok_emb.weight
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_llama_config_validation():
    assert LlamaConfig(d_model=96, n_heads=2).d_ff == 256
    with pytest.raises(ValueError, match="rope"):
        LlamaConfig(pos_encoding="learned")
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_heads=4, n_kv_heads=3)
    assert LlamaConfig.from_json(LlamaConfig(d_model=64).to_json()) == LlamaConfig(d_model=64)


def _causal_check(model, T=16, t=7):
    ids = rand_ids(2, T)
    ids2 = ids.clone()
    ids2[:, t + 1:] = (ids2[:, t + 1:] + 17) % 256
    a, b = model(ids).logits, model(ids2).logits
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)


def test_llama_causal_and_padding():
    m = tiny_llama()
    _causal_check(m)
    ids = rand_ids(2, 12)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[0, 9:] = True  # right padding changes nothing before it
    assert torch.allclose(m(ids, key_padding_mask=kpm).logits[0, :9], m(ids[:1, :9]).logits[0], atol=1e-5)


def test_npt_model_is_causal():
    m = tiny_llama()
    convert_to_npt(m, "1,3", np_rank=8, num_ranks=2, modulate="triple")
    randomize_np(m)
    _causal_check(m)


# ------------------------------------------------------------------------------------- layer selection

@pytest.mark.parametrize("spec, expected", [
    ("8-11", [8, 9, 10, 11]), ("all", list(range(12))), ("upper_half", [6, 7, 8, 9, 10, 11]),
    ("lower_half", [0, 1, 2, 3, 4, 5]), ("0-1,5", [0, 1, 5]), ([3, 1], [1, 3]), (4, [4]), (" 2 , 7 ", [2, 7]),
])
def test_parse_layers(spec, expected):
    assert N.parse_layers(spec, 12) == expected


@pytest.mark.parametrize("spec, msg", [
    ("8-12", "12 is out of range (valid layers are 0..11)"), ("-1", "-1 is out of range"),
    ("upper", "cannot read 'upper'"), ("3-1", "start > end"), ("1,1", "[1] given more than once"),
    ("", "must not be empty"), ([], "must not be empty"), ([1.5], "1.5 is not an int"), ("1;2", "cannot read '1;2'"),
])
def test_parse_layers_errors(spec, msg):
    with pytest.raises(N.NPTError) as e:
        N.parse_layers(spec, 12)
    assert msg in str(e.value)


def test_convert_validation():
    m = tiny_llama()
    with pytest.raises(N.NPTError, match="modulate"):
        convert_to_npt(m, "all", modulate="quad")
    with pytest.raises(N.NPTError, match="np_rank"):
        convert_to_npt(m, "all", np_rank=0)
    convert_to_npt(m, [2], np_rank=4)
    with pytest.raises(N.NPTError, match="layer 2 is already an NP layer"):
        convert_to_npt(m, "2-3", np_rank=4)
    with pytest.raises(N.NPTError, match="same settings"):
        convert_to_npt(m, [3], np_rank=8)
    assert convert_to_npt(m, [3], np_rank=4) == [3] and N.npt_layers(m) == [2, 3]
    assert m.npt_config.layers == [2, 3]
    with pytest.raises(N.NPTError, match="no .layers"):
        convert_to_npt(torch.nn.Linear(2, 2), "all")


# ----------------------------------------------------------------------------------------- equivalences

def test_standard_mode_equals_original_layer_exactly():
    m = tiny_llama()
    orig = copy.deepcopy(m)
    ids = rand_ids()
    x = torch.randn(2, 16, 32)
    convert_to_npt(m, "upper_half", np_rank=8, num_ranks=2, modulate="triple")
    randomize_np(m)  # whatever the NP weights, standard mode ignores them
    for i in (2, 3):
        layer = m.layers[i]
        assert isinstance(layer, NPTLayer)
        layer.npt_mode = False
        assert torch.equal(layer(x), orig.layers[i](x))
        assert torch.equal(layer.to_standard_layer()(x), orig.layers[i](x))
    assert torch.equal(m(ids).logits, orig(ids).logits)
    N.set_npt_mode(m, True)
    assert not torch.allclose(m(ids).logits, orig(ids).logits)
    with N.standard_mode(m):
        assert torch.equal(m(ids).logits, orig(ids).logits)
    assert all(m.layers[i].npt_mode for i in (2, 3))  # restored
    N.set_npt_mode(m, False, layers=[3])
    assert not m.layers[3].npt_mode and m.layers[2].npt_mode
    N.revert_layers(m)
    assert all(type(layer) is LlamaLayer for layer in m.layers) and N.npt_layers(m) == []
    assert torch.equal(m(ids).logits, orig(ids).logits)


@pytest.mark.parametrize("modulate", ["single", "dual", "triple"])
def test_zero_v_b_gives_the_plain_mlp(modulate):
    m = tiny_llama()
    convert_to_npt(m, [1], np_rank=8, num_ranks=3, modulate=modulate)
    layer = m.layers[1]
    x, a = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    assert all(torch.count_nonzero(layer.np.v_b_gen[p].weight) == 0 for p in layer.np.projections)
    assert torch.count_nonzero(layer.np.v_a_gen["gate"].weight) > 0
    assert torch.equal(layer.np.mlp_mod(layer.mlp, x, a), layer.mlp(x))
    # the NPT layer at init: h + MLP(post_attn_norm(h)), attention residual gone
    h = torch.randn(2, 16, 32)
    assert torch.allclose(layer(h), h + layer.mlp(layer.post_attn_norm(h)), atol=1e-6)


@pytest.mark.parametrize("modulate", ["single", "dual", "triple"])
def test_modulation_matches_materialized_rank_k_update(modulate):
    torch.manual_seed(0)
    comp = N.NPComponent(8, 12, np_rank=5, num_ranks=3, modulate=modulate).double()
    for p in comp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mlp = tiny_llama(d_model=8, d_ff=12, n_heads=2).layers[0].mlp.double()
    x, a = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    got = comp.mlp_mod(mlp, x, a)
    vec = comp.vectors(a)
    want = torch.empty_like(got)
    for b in range(2):
        for t in range(4):
            W = {}
            for p, attr in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                W[p] = getattr(mlp, attr).weight.clone()
                if p in vec:  # W_P + sum_k v_b,k v_a,k^T, per token
                    v_a, v_b = vec[p][0][b, t], vec[p][1][b, t]
                    W[p] = W[p] + sum(torch.outer(v_b[k], v_a[k]) for k in range(3))
            hid = F.silu(W["gate"] @ x[b, t]) * (W["up"] @ x[b, t])
            want[b, t] = W["down"] @ hid
    assert torch.allclose(got, want, atol=1e-10)
    assert vec["gate"][0].shape == (2, 4, 3, 8) and vec["gate"][1].shape == (2, 4, 3, 12)
    if modulate == "triple":
        assert vec["down"][0].shape == (2, 4, 3, 12) and vec["down"][1].shape == (2, 4, 3, 8)


# --------------------------------------------------------------------------------------------- gradients

def test_gradients_reach_only_np_parameters_and_both_generators_learn():
    m = tiny_llama()
    convert_to_npt(m, "2-3", np_rank=8, num_ranks=2)
    n = freeze_base(m)
    assert n == sum(p.numel() for p in N.np_parameters(m))
    opt = torch.optim.SGD(N.np_parameters(m), lr=0.1)
    ids = rand_ids()
    for step in range(2):
        opt.zero_grad()
        out = N.scaffolded_forward(m, ids, 1.0, 1.0)
        loss = sum(s.direct_loss for s in out.layers.values()) + F.cross_entropy(
            out.student_logits.flatten(0, 1), ids.flatten())
        loss.backward()
        for name, p in m.named_parameters():
            if ".np." in name:
                assert p.requires_grad and p.grad is not None
            else:
                assert not p.requires_grad and p.grad is None, name
        if step == 0:  # LoRA-style: v_b starts at zero and gets gradient first
            assert m.layers[2].np.v_b_gen["gate"].weight.grad.abs().sum() > 0
        else:  # once v_b moved, the v_a generator and W_down get gradient too
            assert m.layers[2].np.v_a_gen["up"].weight.grad.abs().sum() > 0
            assert m.layers[2].np.W_down.weight.grad.abs().sum() > 0
        opt.step()
    with pytest.raises(N.NPTError, match="no NP layers"):
        freeze_base(tiny_llama())


# ------------------------------------------------------------------------------------------ save / load

def test_np_weights_round_trip(tmp_path):
    m = tiny_llama()
    convert_to_npt(m, "1,3", np_rank=6, num_ranks=2, modulate="triple")
    randomize_np(m)
    path = N.save_np_weights(m, tmp_path / "w" / "np.safetensors", {"base_checkpoint": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["np.safetensors"]  # no temp file left
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    assert keys and all(".np." in k for k in keys)  # only NP weights
    meta = N.read_np_metadata(path)
    assert meta["npt_config"] == {"layers": [1, 3], "np_rank": 6, "num_ranks": 2, "modulate": "triple"}
    assert meta["base_checkpoint"] == "x"

    fresh = tiny_llama()  # same base weights, not converted: load converts it
    assert N.load_np_weights(fresh, path) == [1, 3]
    ids = rand_ids()
    assert torch.equal(fresh(ids).logits, m(ids).logits)

    other = tiny_llama()
    convert_to_npt(other, [1, 3], np_rank=4, num_ranks=2, modulate="triple")
    with pytest.raises(N.NPTError, match="do not match"):
        N.load_np_weights(other, path)
    with pytest.raises(N.NPTError, match="not found"):
        N.load_np_weights(tiny_llama(), tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(N.NPTError, match="cannot read"):
        N.load_np_weights(tiny_llama(), tmp_path / "bad.safetensors")


def test_load_np_weights_converts_other_models_only_through_a_registered_converter(tmp_path, monkeypatch):
    """models/npt.py never imports the HF adapter: other layer types are converted by a converter that
    hilt.hf (or anyone) registers; without one the error says what to import."""
    m = tiny_llama()
    convert_to_npt(m, "1,3", np_rank=6, num_ranks=2, modulate="triple")
    path = N.save_np_weights(m, tmp_path / "np.safetensors")

    class Foreign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])

    monkeypatch.setattr(N, "_CONVERTERS", [])
    with pytest.raises(N.NPTError, match="different base model"):  # the file records its base's identity
        N.load_np_weights(Foreign(), path)
    with pytest.raises(N.NPTError, match="import hilt.hf"):
        N.load_np_weights(Foreign(), path, check_base=False)
    calls = []

    def convert(model, layers, **kw):
        calls.append((layers, kw))
        raise RuntimeError("stop here")

    N.register_converter(lambda layer: isinstance(layer, torch.nn.Linear), convert)
    with pytest.raises(RuntimeError, match="stop here"):
        N.load_np_weights(Foreign(), path, check_base=False)
    assert calls == [([1, 3], {"np_rank": 6, "num_ranks": 2, "modulate": "triple"})]
    assert N.load_np_weights(tiny_llama(), path) == [1, 3]  # hilt's own Llama never asks the converters


# --------------------------------------------------------------------------- scaffolding and RoPE

def _hidden_teacher(m, ids):
    with N.standard_mode(m), torch.no_grad():
        return m.hidden_states(ids)


@pytest.mark.parametrize("ra, rm", [(0.0, 0.0), (1.0, 1.0), (0.3, 0.7), (0.0, 1.0), (0.5, 0.5)])
def test_attention_and_mlp_inputs_follow_the_ratios(ra, rm):
    m = tiny_llama()
    convert_to_npt(m, [1, 3], np_rank=8, num_ranks=2)
    randomize_np(m)
    freeze_base(m)
    ids = rand_ids()
    seen = {}

    def pre(name):
        def hook(mod, args):
            seen[name] = args[0].detach().clone()  # the last call wins: the student pass runs last
        return hook

    def post(name):
        def hook(mod, args, out):
            seen[name] = out.detach().clone()
        return hook

    hs = []
    for i in (1, 3):
        hs.append(m.layers[i].input_norm.register_forward_pre_hook(pre(f"attn_in{i}")))
        hs.append(m.layers[i].post_attn_norm.register_forward_pre_hook(pre(f"mlp_in{i}")))
    hs.append(m.layers[2].register_forward_hook(post("student_out2")))
    out = N.scaffolded_forward(m, ids, ra, rm)
    for h in hs:
        h.remove()
    h_t = _hidden_teacher(m, ids)
    # layer 1 is the first NP layer: below it, teacher and student streams are the same
    assert torch.allclose(seen["attn_in1"], h_t[1]) and torch.allclose(seen["mlp_in1"], h_t[1])
    # layer 3: the student stream is layer 2's output in the student pass, which differs from the teacher's
    h_s = seen["student_out2"]
    assert not torch.allclose(h_s, h_t[3], atol=1e-3)
    assert torch.allclose(seen["attn_in3"], (1 - ra) * h_t[3] + ra * h_s, atol=1e-6)
    assert torch.allclose(seen["mlp_in3"], (1 - rm) * h_t[3] + rm * h_s, atol=1e-6)
    if ra == 0.0:
        assert torch.equal(seen["attn_in3"], h_t[3])
    if rm == 1.0:
        assert torch.equal(seen["mlp_in3"], h_s)
    # the teacher's logits are the standard model's
    with N.standard_mode(m), torch.no_grad():
        assert torch.equal(out.teacher_logits, m(ids).logits)


def test_direct_loss_target_is_the_teachers_attention_plus_mlp():
    m = tiny_llama()
    convert_to_npt(m, [2], np_rank=8)
    freeze_base(m)
    ids = rand_ids()
    out = N.scaffolded_forward(m, ids, 0.0, 0.0)
    layer = m.layers[2]
    h = _hidden_teacher(m, ids)[2]
    with torch.no_grad():
        a = layer.attn(layer.input_norm(h))
        target = a + layer.mlp(layer.post_attn_norm(h + a))
        pred = layer.mlp(layer.post_attn_norm(h))  # v_b = 0: MLP_mod is the plain MLP
    assert torch.allclose(out.layers[2].direct_loss, F.mse_loss(pred, target), rtol=1e-5)


def test_rope_in_training_path_and_generation_path():
    m = tiny_llama()
    convert_to_npt(m, "upper_half", np_rank=8, num_ranks=2)
    randomize_np(m)
    freeze_base(m)
    ids = rand_ids(1, 12)
    calls = {"n": 0}

    def count(mod, args):
        calls["n"] += 1

    hooks = [mod.register_forward_pre_hook(count) for mod in m.modules() if isinstance(mod, RotaryEmbedding)]
    assert len(hooks) == 4
    train_logits = N.scaffolded_forward(m, ids, 1.0, 1.0).student_logits
    n_train = calls["n"]
    calls["n"] = 0
    gen_logits = m(ids).logits
    n_gen = calls["n"]
    for h in hooks:
        h.remove()
    assert n_train > 0 and n_gen == 8  # q and k in every layer, in both paths
    assert torch.allclose(train_logits, gen_logits, atol=1e-6)
    # greedy generation follows the training path's argmax, token by token
    out = generate(m, ids[0, :4], 6, temperature=0)
    for t in range(4, 10):
        logits = N.scaffolded_forward(m, out[:t].unsqueeze(0), 1.0, 1.0).student_logits
        assert logits[0, -1].argmax().item() == out[t].item()
    # and the positions matter (RoPE is really on): a shifted window gives other logits
    m2 = copy.deepcopy(m)
    for mod in m2.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.forward = lambda x, offset=0: x
    assert not torch.allclose(m2(ids).logits, gen_logits, atol=1e-4)


def test_v_a_cosine_metric_for_every_rank():
    d, k = 32, 3
    m = tiny_llama()
    convert_to_npt(m, [3], np_rank=d, num_ranks=k)
    comp = m.layers[3].np
    with torch.no_grad():  # v_a,k = (k + 1) * a for every rank: cosine 1 for each of them
        comp.W_down.weight.copy_(torch.eye(d))
        for p in comp.projections:
            comp.v_a_gen[p].weight.copy_(torch.cat([(j + 1) * torch.eye(d) for j in range(k)]))
    freeze_base(m)
    cos = N.scaffolded_forward(m, rand_ids(), 1.0, 1.0).layers[3].v_a_attn_cos
    assert cos.shape == (k,) and torch.allclose(cos, torch.ones(k), atol=1e-5)
    # random generators: every rank has its own, non-zero value
    m = tiny_llama()
    convert_to_npt(m, [3], np_rank=8, num_ranks=4)
    cos = N.scaffolded_forward(m, rand_ids(), 1.0, 1.0).layers[3].v_a_attn_cos
    assert cos.shape == (4,) and bool((cos != 0).all()) and len(set(cos.tolist())) == 4
