"""Teacher scaffolding, fidelity and NP weights on tiny random Hugging Face Llama models (offline; GQA, tied
embeddings)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install hilt[hf])")

from hilt.hf import convert_hf_llama_to_npt  # noqa: E402
from hilt.hf_scaffold import byte_counter, hf_fidelity, hf_scaffolded_forward, kl_teacher_student  # noqa: E402
from hilt.models import npt as N  # noqa: E402

from .hf_helpers import TEXT, tiny_model, tiny_tokenizer  # noqa: E402
from .helpers import randomize_np  # noqa: E402

V = 64


def ids_(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def converted(layers=(1, 3), seed=0, **kw):
    m = tiny_model(V, seed)
    convert_hf_llama_to_npt(m, list(layers), np_rank=8, num_ranks=2, **kw)
    randomize_np(m)
    N.freeze_base(m)
    return m


def teacher_hidden(m, ids):
    """Every decoder layer's input in standard mode (hidden_states[i] is layer i's input)."""
    with torch.no_grad(), N.standard_mode(m):
        return m(ids, output_hidden_states=True).hidden_states


def test_tiny_model_has_gqa_and_tied_embeddings():
    m = tiny_model(V)
    assert m.config.num_key_value_heads < m.config.num_attention_heads
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("ra, rm", [(0.0, 0.0), (1.0, 1.0), (0.3, 0.7), (0.0, 1.0), (0.5, 0.5)])
def test_attention_and_mlp_inputs_follow_the_ratios(ra, rm):
    m = converted()
    ids = ids_()
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
        hs.append(m.model.layers[i].input_layernorm.register_forward_pre_hook(pre(f"attn_in{i}")))
        hs.append(m.model.layers[i].post_attention_layernorm.register_forward_pre_hook(pre(f"mlp_in{i}")))
    hs.append(m.model.layers[2].register_forward_hook(post("student_out2")))
    out = hf_scaffolded_forward(m, ids, ra, rm)
    for h in hs:
        h.remove()
    h_t = teacher_hidden(m, ids)
    # layer 1 is the first NP layer: the student starts from the teacher's stream there
    assert torch.allclose(seen["attn_in1"], h_t[1], atol=1e-6) and torch.allclose(seen["mlp_in1"], h_t[1], atol=1e-6)
    # layer 3: the student stream is layer 2's output in the student pass, not the teacher's
    h_s = seen["student_out2"]
    assert not torch.allclose(h_s, h_t[3], atol=1e-3)
    assert torch.allclose(seen["attn_in3"], (1 - ra) * h_t[3] + ra * h_s, atol=1e-6)
    assert torch.allclose(seen["mlp_in3"], (1 - rm) * h_t[3] + rm * h_s, atol=1e-6)
    if ra == 0.0:
        assert torch.equal(seen["attn_in3"], h_t[3])
    if rm == 1.0:
        assert torch.equal(seen["mlp_in3"], h_s)
    with N.standard_mode(m), torch.no_grad():
        assert torch.equal(out.teacher_logits, m(ids).logits)


def test_student_at_ratio_one_is_the_npt_model():
    m = converted()
    ids = ids_()
    with torch.no_grad():
        out = hf_scaffolded_forward(m, ids, 1.0, 1.0)
        assert torch.allclose(out.student_logits, m(ids).logits, atol=1e-5)
        with N.standard_mode(m):
            assert not torch.allclose(out.student_logits, m(ids).logits, atol=1e-3)


def test_direct_loss_target_is_the_teachers_attention_plus_mlp():
    m = tiny_model(V)
    convert_hf_llama_to_npt(m, [2], np_rank=8)
    N.freeze_base(m)
    ids = ids_()
    out = hf_scaffolded_forward(m, ids, 0.0, 0.0)
    layer = m.model.layers[2]
    h = teacher_hidden(m, ids)[2]
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad(), N.standard_mode(m):
        full = layer(h, position_ids=pos, position_embeddings=m.model.rotary_emb(h, position_ids=pos))
        pred = layer.mlp(layer.post_attention_layernorm(h))  # v_b = 0: MLP_mod is the plain MLP
    assert torch.allclose(out.layers[2].direct_loss, F.mse_loss(pred, full - h), rtol=1e-5)


def test_gradients_reach_only_np_weights_and_checkpointing_gives_the_same():
    grads = []
    for ckpt in (False, True):
        m = converted()
        m.train()
        out = hf_scaffolded_forward(m, ids_(), 0.5, 0.5, grad_checkpoint=ckpt)
        loss = sum(s.direct_loss for s in out.layers.values()) + kl_teacher_student(out.teacher_logits,
                                                                                     out.student_logits)
        loss.backward()
        for name, p in m.named_parameters():
            assert (p.grad is not None) == (".np." in name), name
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "v_b_gen" in n)


def test_scaffold_needs_np_layers_a_frozen_base_and_valid_ratios():
    m = tiny_model(V)
    with pytest.raises(N.NPTError, match="no NP layers"):
        hf_scaffolded_forward(m, ids_())
    convert_hf_llama_to_npt(m, [1], np_rank=4)
    with pytest.raises(N.NPTError, match="frozen base"):
        hf_scaffolded_forward(m, ids_())
    with torch.no_grad():  # no gradient, nothing to freeze
        hf_scaffolded_forward(m, ids_())
    N.freeze_base(m)
    with pytest.raises(N.NPTError, match="attn_ratio"):
        hf_scaffolded_forward(m, ids_(), 1.5, 1.0)


def test_bfloat16_base_keeps_float32_np_weights():
    m = tiny_model(V)
    m.to(torch.bfloat16)
    convert_hf_llama_to_npt(m, [2, 3], np_rank=8)
    N.freeze_base(m)
    assert all(p.dtype == torch.float32 for p in N.np_parameters(m))
    out = hf_scaffolded_forward(m, ids_(), 0.5, 0.5)
    sum(s.direct_loss for s in out.layers.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in N.np_parameters(m))
    assert out.student_logits.dtype == torch.bfloat16


def test_fidelity_against_a_direct_computation():
    tok = tiny_tokenizer()
    v = len(tok)
    m = tiny_model(v)
    convert_hf_llama_to_npt(m, [2, 3], np_rank=8)
    randomize_np(m, std=0.1)
    N.freeze_base(m)
    text_ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    windows = text_ids[: 3 * 17].view(3, 17)
    batches = [(windows[:2, :-1], windows[:2, 1:]), (windows[2:, :-1], windows[2:, 1:])]
    got = hf_fidelity(m, batches, byte_counter(tok))
    with torch.no_grad():
        s = m(windows[:, :-1]).logits
        with N.standard_mode(m):
            t = m(windows[:, :-1]).logits
    tgt = windows[:, 1:]
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    ce_t = -lt.gather(-1, tgt[..., None]).mean().item()
    ce_s = -ls.gather(-1, tgt[..., None]).mean().item()
    n_bytes = sum(len(tok.decode(r).encode("utf-8")) for r in tgt.tolist())
    assert n_bytes > tgt.numel()  # merges: more bytes than tokens
    assert got["tokens"] == tgt.numel() and got["bytes"] == n_bytes
    assert got["kl"] == pytest.approx(kl, rel=1e-4) and got["kl"] > 0
    assert got["agreement"] == pytest.approx((t.argmax(-1) == s.argmax(-1)).float().mean().item())
    assert got["teacher_nats"] == pytest.approx(ce_t, rel=1e-5)
    assert got["student_nats"] == pytest.approx(ce_s, rel=1e-5)
    total = ce_t * tgt.numel()
    assert got["teacher_bpb"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-5)


def test_byte_counter_counts_the_utf8_bytes_of_the_text():
    tok = tiny_tokenizer()
    text = "def f(x):\n    return 'héllo wörld' * 3\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert byte_counter(tok)(ids) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------- NP weights and identity

def test_np_weights_round_trip_and_the_wrong_base_error(tmp_path):
    m = converted((1, 2))
    setattr(m, N.BASE_IDENTITY_ATTR, N.base_identity(m, recorded=False))
    path = N.save_np_weights(m, tmp_path / "np.safetensors")
    meta = N.read_np_metadata(path)
    ident = meta["base_identity"]
    assert ident["model_type"] == "hf:llama" and ident["num_layers"] == 4 and ident["hidden_size"] == 32
    assert ident == N.base_identity(tiny_model(V), recorded=False)  # the base, without its NP weights
    ids = ids_()
    fresh = tiny_model(V)
    assert N.load_np_weights(fresh, path) == [1, 2]
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, m(ids).logits, atol=1e-6)
    other = tiny_model(V, seed=1)  # same architecture, other weights
    with pytest.raises(N.NPTError, match="different base model: sha256"):
        N.load_np_weights(other, path)
    assert not N.npt_layers(other)  # nothing converted on failure
    bigger = tiny_model(V, num_hidden_layers=5)
    with pytest.raises(N.NPTError, match="num_layers 4 .file. vs 5 .model."):
        N.load_np_weights(bigger, path)


def test_identity_is_taken_before_the_cast(tmp_path):
    m = converted((2,))
    base = tiny_model(V)
    ident = N.base_identity(base, recorded=False)
    path = N.save_np_weights(m, tmp_path / "np.safetensors")
    bf = tiny_model(V).to(torch.bfloat16)
    with pytest.raises(N.NPTError, match="sha256"):  # the cast copy hashes differently ...
        N.load_np_weights(bf, path)
    bf = tiny_model(V).to(torch.bfloat16)
    setattr(bf, N.BASE_IDENTITY_ATTR, ident)  # ... unless its identity was recorded before the cast
    assert N.load_np_weights(bf, path) == [2]


def test_np_weights_without_identity_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    m = converted((1,))
    path = N.save_np_weights(m, tmp_path / "np.safetensors")
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in N.read_np_metadata(path).items()
            if k != "base_identity"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    other = tiny_model(V, seed=5)
    assert N.load_np_weights(other, old) == [1]
    for k, v in N.np_state_dict(m).items():
        assert torch.equal(N.np_state_dict(other)[k], v)
