"""GPT, HILT and BlockHierarchicalLM: shapes, gradients, causality, padding, equivalences, training."""
import copy

import pytest
import torch
import torch.nn.functional as F

from hilt.models import (GPT, HILT, BlockHierarchicalLM, BlockHierarchicalLMConfig, GPTConfig, HILTConfig,
                         ModelOutput)

TINY = dict(d_model=32, n_heads=2, max_seq_len=32, dropout=0.0)


def gpt_cfg(**kw):
    return GPTConfig(**{**TINY, "n_layers": 2, **kw})


def hilt_cfg(**kw):
    return HILTConfig(**{**TINY, "n_layers": 3, "ilt_dim": 16, "ilt_heads": 2, "ilt_layers": 2,
                         "ilt_dropout": 0.0, "ilt_scale": 0.5, **kw})


def bh_cfg(**kw):
    return BlockHierarchicalLMConfig(**{**TINY, "block_size": 4, "n_local_layers": 1, "n_global_layers": 1,
                                        "n_decoder_layers": 1, **kw})


LM_CASES = {
    "gpt-learned": (GPT, lambda: gpt_cfg()),
    "gpt-sinusoidal": (GPT, lambda: gpt_cfg(pos_encoding="sinusoidal")),
    "gpt-rope": (GPT, lambda: gpt_cfg(pos_encoding="rope")),
    "hilt-learned": (HILT, lambda: hilt_cfg()),
    "hilt-rope-noncausal-ilt": (HILT, lambda: hilt_cfg(pos_encoding="rope", ilt_causal=False)),
    "bhlm-learned": (BlockHierarchicalLM, lambda: bh_cfg()),
    "bhlm-sinusoidal-b3": (BlockHierarchicalLM, lambda: bh_cfg(pos_encoding="sinusoidal", block_size=3)),
    "bhlm-rope-2global": (BlockHierarchicalLM, lambda: bh_cfg(pos_encoding="rope", n_global_layers=2)),
}
ENC_CASES = {
    "bhlm-encoder": (BlockHierarchicalLM, lambda: bh_cfg(mode="encoder", n_classes=3)),
    "bhlm-encoder-rope": (BlockHierarchicalLM, lambda: bh_cfg(mode="encoder", n_classes=4, pos_encoding="rope")),
}
ALL_CASES = {**LM_CASES, **ENC_CASES}


def build(case, seed=0, **overrides):
    cls, make = ALL_CASES[case]
    cfg = make()
    if overrides:
        cfg = cfg.replace(**overrides)
    torch.manual_seed(seed)
    return cls.from_config(cfg)


def rand_ids(B, T, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("case", list(LM_CASES))
@pytest.mark.parametrize("T", [17, 32])
def test_lm_shapes_and_loss(case, T):
    model = build(case).eval()
    ids, targets = rand_ids(2, T), rand_ids(2, T, seed=2)
    targets[0, :3] = -100
    out = model(ids, targets)
    assert isinstance(out, ModelOutput) and out.aux_losses == {}
    assert out.logits.shape == (2, T, 256)
    assert model(ids).loss is None
    keep = targets != -100
    ref = F.cross_entropy(out.logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("case", list(ENC_CASES))
def test_encoder_shapes_and_loss(case):
    model = build(case).eval()
    n_classes = model.config.n_classes
    ids = rand_ids(3, 19)
    targets = torch.tensor([0, n_classes - 1, -100])
    out = model(ids, targets)
    assert out.logits.shape == (3, n_classes)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:2], targets[:2]))
    # bidirectional: the last token changes the prediction
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 256
    assert not torch.allclose(model(ids2).logits, out.logits)
    with pytest.raises(ValueError, match="targets"):
        model(ids, torch.zeros(3, 19, dtype=torch.long))


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_gradients_reach_every_parameter(case):
    model = build(case, dropout=0.1).train()
    if isinstance(model, HILT):
        model.ilts[0].dropout.p = 0.1
    ids = rand_ids(2, 18)
    targets = torch.tensor([0, 1]) if case in ENC_CASES else rand_ids(2, 18, seed=3)
    model(ids, targets).loss.backward()
    zero = []
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if p.grad.abs().sum() == 0:
            zero.append(name)
    assert not zero, f"zero gradients: {zero}"


@pytest.mark.parametrize("case", list(LM_CASES))
def test_causality(case):
    model = build(case).eval()
    T = 24
    ids = rand_ids(2, T)
    base = model(ids).logits
    for t in [0, 2, 3, 4, 10, 11, 15, 22]:
        ids2 = ids.clone()
        ids2[:, t + 1:] = rand_ids(2, T - t - 1, seed=100 + t)
        out = model(ids2).logits
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=0,
                                   msg=lambda m: f"future tokens after {t} changed the logits: {m}")
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-5)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_causality_with_padding(case):
    model = build(case).eval()
    T = 20
    ids = rand_ids(2, T)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[0, 15:] = True
    kpm[1, :5] = True  # left padding
    base = model(ids, key_padding_mask=kpm).logits
    t = 9
    ids2 = ids.clone()
    ids2[:, t + 1:] = rand_ids(2, T - t - 1, seed=7)
    torch.testing.assert_close(model(ids2, key_padding_mask=kpm).logits[:, :t + 1], base[:, :t + 1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_neighbouring_positions_get_different_logits(case):
    # the seed's block model gave every position of a block the same logits
    model = build(case).eval()
    ids = rand_ids(2, 24)
    # no repeated neighbours: with RoPE (no absolute positions) "a a" at a block start is
    # legitimately indistinguishable
    ids[:, 1:] = torch.where(ids[:, 1:] == ids[:, :-1], (ids[:, 1:] + 1) % 256, ids[:, 1:])
    assert (ids[:, 1:] != ids[:, :-1]).all()
    logits = model(ids).logits
    diff = (logits[:, 1:] - logits[:, :-1]).abs().amax(-1)
    assert (diff > 1e-4).all()


@pytest.mark.parametrize("case", list(LM_CASES))
def test_padding_is_ignored_by_the_model_and_the_loss(case):
    model = build(case).eval()
    T = 21
    ids, targets = rand_ids(2, T), rand_ids(2, T, seed=5)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[0, 13:] = True  # right padding, partly and fully padded blocks
    kpm[1, :6] = True   # left padding
    out = model(ids, targets, key_padding_mask=kpm)
    ids2, targets2 = ids.clone(), targets.clone()
    ids2[kpm] = rand_ids(2, T, seed=9)[kpm]
    targets2[kpm] = (targets2[kpm] + 7) % 256
    out2 = model(ids2, targets2, key_padding_mask=kpm)
    torch.testing.assert_close(out2.loss, out.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out2.logits[~kpm], out.logits[~kpm], atol=1e-5, rtol=0)
    # the loss counts only the valid positions (callers may equally set padded targets to -100)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[~kpm], targets[~kpm]))
    t100 = targets.masked_fill(kpm, -100)
    torch.testing.assert_close(model(ids, t100, key_padding_mask=kpm).loss, out.loss)
    # everything ignored: a zero loss, not NaN
    assert model(ids, torch.full_like(targets, -100)).loss.item() == 0.0


@pytest.mark.parametrize("case", list(ENC_CASES))
def test_encoder_padding_is_ignored(case):
    model = build(case).eval()
    T = 22
    ids = rand_ids(2, T)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[0, 9:] = True
    kpm[1, 2:3] = True
    out = model(ids, key_padding_mask=kpm).logits
    ids2 = ids.clone()
    ids2[kpm] = rand_ids(2, T, seed=11)[kpm]
    torch.testing.assert_close(model(ids2, key_padding_mask=kpm).logits, out, atol=1e-5, rtol=0)
    # a padded row equals the same row cut to its valid length (block-aligned here: 9 -> blocks 0, 1, 2[8])
    short = model(ids[:1, :9]).logits
    torch.testing.assert_close(out[:1], short, atol=1e-5, rtol=0)


def test_gpt_structure_and_tied_embeddings():
    model = build("gpt-learned")
    assert model.lm_head.weight is model.tok_emb.weight
    assert len(model.layers) == 2 and model.norm_f is not None
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_parameters() == n
    assert model.num_parameters(non_embedding=True) == n - 256 * 32 - 32 * 32
    hs = model.hidden_states(rand_ids(1, 9))
    assert len(hs) == 3 and all(h.shape == (1, 9, 32) for h in hs)
    torch.testing.assert_close(model.head(hs[-1]), model(rand_ids(1, 9)).logits)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(rand_ids(1, 33))
    with pytest.raises(ValueError, match="targets"):
        model(rand_ids(1, 9), rand_ids(1, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(rand_ids(1, 9), key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))


def test_hilt_with_zero_ilt_layers_is_exactly_gpt():
    torch.manual_seed(0)
    gpt = GPT(gpt_cfg(n_layers=3))
    torch.manual_seed(0)
    hilt = HILT(hilt_cfg(ilt_layers=0))
    assert hilt.ilts is None
    assert [n for n, _ in hilt.named_parameters()] == [n for n, _ in gpt.named_parameters()]
    assert list(hilt.state_dict()) == list(gpt.state_dict())
    for (n, a), (_, b) in zip(hilt.state_dict().items(), gpt.state_dict().items()):
        assert torch.equal(a, b), n
    ids, targets = rand_ids(2, 20), rand_ids(2, 20, seed=3)
    o1, o2 = hilt(ids, targets), gpt(ids, targets)
    assert torch.equal(o1.logits, o2.logits) and torch.equal(o1.loss, o2.loss)
    hilt.load_state_dict(gpt.state_dict())  # strict, both ways
    gpt.load_state_dict(hilt.state_dict())


def _hilt_by_hand(model, ids):
    """DESIGN.md's recurrence written out: h_{i+1} = L_i(h_i); for i >= 1
    h_{i+1} += scale * ILT_{i-1}(h_i, h_{i+1}), h_i the already-modulated previous output."""
    h = model.embed(ids)
    for i, layer in enumerate(model.layers):
        nxt = layer(h)
        if i >= 1:
            nxt = nxt + model.ilt_scale * model.ilts[i - 1](h, nxt)
        h = nxt
    return model.lm_head(model.norm_f(h))


def test_hilt_recurrence_scale_and_gpt_equivalence():
    torch.manual_seed(0)
    gpt = GPT(gpt_cfg(n_layers=3)).eval()
    hilt = HILT(hilt_cfg(ilt_layers=2)).eval()
    assert len(hilt.ilts) == 2  # n_layers - 1
    missing, unexpected = hilt.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("ilts.") or k == "ilt_scale" for k in missing)
    assert "ilt_scale" in hilt.state_dict() and hilt.ilt_scale.dtype == torch.float32
    ids = rand_ids(2, 20)
    ref = gpt(ids).logits
    hilt.set_ilt_scale(0.0)
    torch.testing.assert_close(hilt(ids).logits, ref, atol=1e-6, rtol=0)
    hilt.set_ilt_scale(0.3)
    assert hilt.get_ilt_scale() == pytest.approx(0.3)
    out = hilt(ids).logits
    assert not torch.allclose(out, ref, atol=1e-4)
    torch.testing.assert_close(out, _hilt_by_hand(hilt, ids), atol=1e-6, rtol=0)
    hs = hilt.hidden_states(ids)
    assert len(hs) == 4
    torch.testing.assert_close(hilt.head(hs[-1]), out)
    # the scale is checkpointed
    other = HILT(hilt_cfg(ilt_layers=2))
    other.load_state_dict(hilt.state_dict())
    assert other.get_ilt_scale() == pytest.approx(0.3)
    assert HILT(hilt_cfg(ilt_scale=0.01)).get_ilt_scale() == pytest.approx(0.01)


def test_block_hierarchical_shift_and_block_structure():
    model = build("bhlm-learned").eval()
    b = model.config.block_size
    T = 18
    ids = rand_ids(2, T)
    base = model(ids).logits
    # the learned start vector reaches block 0 only
    with torch.no_grad():
        model.start.add_(torch.randn_like(model.start))
    changed = (model(ids).logits - base).abs().amax((0, 2)) > 1e-6
    assert changed.tolist() == [True] * b + [False] * (T - b)
    # a token in block 1 changes its block from that position on and every later block, never earlier ones
    model = build("bhlm-learned").eval()
    ids2 = ids.clone()
    ids2[:, 5] = (ids2[:, 5] + 1) % 256
    changed = (model(ids2).logits - base).abs().amax((0, 2)) > 1e-6
    assert changed.tolist() == [False] * 5 + [True] * (T - 5)
    # the last block's global output is not used by anyone
    ids3 = ids.clone()
    ids3[:, 16:] = (ids3[:, 16:] + 1) % 256
    changed = (model(ids3).logits - base).abs().amax((0, 2)) > 1e-6
    assert changed.tolist() == [False] * 16 + [True] * 2
    assert not hasattr(build("bhlm-encoder"), "decoder_layers")


@pytest.mark.parametrize("case", ["gpt-rope", "hilt-learned", "bhlm-rope-2global", "bhlm-encoder"])
def test_few_adamw_steps_reduce_the_loss(case):
    model = build(case).train()
    ids = rand_ids(4, 24, seed=21, vocab=16)
    targets = torch.tensor([0, 1, 2, 1]) if case == "bhlm-encoder" else torch.roll(ids, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for _ in range(10):
        loss = model(ids, targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt-rope", "hilt-learned", "bhlm-learned", "bhlm-encoder"])
def test_torch_compile_matches_eager(case):
    torch._dynamo.reset()
    model = build(case).eval()
    twin = copy.deepcopy(model)
    T = 19
    ids = rand_ids(2, T)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[1, 15:] = True
    targets = torch.tensor([0, 1]) if "encoder" in case else rand_ids(2, T, seed=4)
    eager = model(ids, targets, key_padding_mask=kpm)
    eager.loss.backward()
    compiled = torch.compile(twin, fullgraph=True)
    out = compiled(ids, targets, key_padding_mask=kpm)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", ["gpt-learned", "hilt-rope-noncausal-ilt", "bhlm-rope-2global", "bhlm-encoder"])
def test_bf16_autocast_forward_backward(case):
    model = build(case).train()
    ids = rand_ids(2, 18)
    kpm = torch.zeros(2, 18, dtype=torch.bool)
    kpm[0, 14:] = True
    targets = torch.tensor([0, 1]) if case in ENC_CASES else rand_ids(2, 18, seed=3)
    ref = model(ids, targets, key_padding_mask=kpm).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets, key_padding_mask=kpm)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_all_false_padding_mask_equals_none_and_factory_kwargs(case):
    model = build(case).eval()
    ids = rand_ids(2, 13)
    torch.testing.assert_close(model(ids, key_padding_mask=torch.zeros(2, 13, dtype=torch.bool)).logits,
                               model(ids).logits, atol=1e-6, rtol=0)
    meta = type(model)(model.config, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert meta.num_parameters() == model.num_parameters()
    d64 = type(model)(model.config, dtype=torch.float64)
    assert d64.tok_emb.weight.dtype == torch.float64
    assert d64(ids).logits.dtype == torch.float64


def test_models_check_their_config_type():
    with pytest.raises(TypeError, match="HILTConfig"):
        HILT(gpt_cfg())
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(bh_cfg())
    with pytest.raises(TypeError, match="BlockHierarchicalLMConfig"):
        BlockHierarchicalLM(gpt_cfg())
    assert isinstance(GPT.from_config(gpt_cfg().to_dict()), GPT)
    assert isinstance(GPT(hilt_cfg()), GPT)  # a HILTConfig is a GPTConfig: the GPT part of a HILT
