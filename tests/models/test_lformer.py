"""LFormer: shapes for every side-path combination, tree checkpoints, gradients, causality with
blend_into_lm, padding, heads' ignore rules, training phases, detach_taps, α sparsity, compile, training."""
import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from hilt.models import GPT, GPTConfig, LFormer, LFormerConfig, LFormerOutput, ModelOutput

TINY = dict(d_model=32, n_heads=2, n_layers=4, max_seq_len=16, dropout=0.0, d_side=16, side_heads=2,
            side_dropout=0.0)
HEADS = dict(n_tools=3, value_head=True, plan_vocab=7, plan_len=5)


def cfg(**kw):
    return LFormerConfig(**{**TINY, **kw})


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return LFormer(cfg(**kw))


def rand_ids(B, T, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def padding(B=2, T=12):
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 9:] = True   # right padding
    kpm[1, :3] = True   # left padding
    return kpm


def labels(B=2):
    return dict(tool_labels=torch.tensor([2, -100] + [0] * (B - 2)),
                value_targets=torch.tensor([0.5, float("nan")] + [1.0] * (B - 2)),
                plan_targets=torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, -100, -100]] + [[1] * 5] * (B - 2)))


COMBOS = list(itertools.product(["token", "sequence"], ["mean", "last", "attn"], ["ema", "gru", "attn"], [0, 2]))


@pytest.mark.parametrize("tap_mode,pooling,aggregator,tree", COMBOS)
def test_shapes_every_combination(tap_mode, pooling, aggregator, tree):
    model = build(tap_mode=tap_mode, pooling=pooling, aggregator=aggregator, tree_checkpoint=tree, **HEADS,
                  blend_into_lm=tap_mode == "token").eval()
    B, T = 2, 12
    ids, targets, kpm = rand_ids(B, T), rand_ids(B, T, seed=2), padding(B, T)
    out = model(ids, targets, kpm, **labels(B))
    assert isinstance(out, LFormerOutput) and isinstance(out, ModelOutput)
    assert out.logits.shape == (B, T, 256)
    side = (4, B, T, 16) if tap_mode == "token" else (4, B, 16)
    assert out.side_states.shape == side
    assert out.tool_logits.shape == (B, 3) and out.values.shape == (B,) and out.plan_logits.shape == (B, 5, 7)
    assert set(out.aux_losses) == {"lm", "tool", "value", "plan"}
    assert all(torch.isfinite(v) for v in out.aux_losses.values()) and torch.isfinite(out.loss)
    expected = (out.aux_losses["lm"] + out.aux_losses["tool"] + out.aux_losses["value"]
                + 0.2 * out.aux_losses["plan"])
    torch.testing.assert_close(out.loss, expected)
    # no targets: no loss; the heads still run (plan logits need plan targets)
    bare = model(ids, key_padding_mask=kpm)
    assert bare.loss is None and bare.aux_losses == {} and bare.tool_logits.shape == (B, 3)
    assert bare.plan_logits is None
    torch.testing.assert_close(bare.logits, out.logits)


def test_tap_every_and_layer_indices():
    model = build(tap_every=2, n_layers=5, aggregator="gru")
    assert model.tap_layers == (2, 4) and len(model.side.taps) == 2 == model.config.n_taps
    assert model(rand_ids(2, 7)).side_states.shape == (2, 2, 16)


def test_tree_checkpoint_equals_a_hand_written_recurrence():
    model = build(tap_mode="sequence", aggregator="ema", tree_checkpoint=2, n_layers=5, alpha_per_channel=True).eval()
    with torch.no_grad():
        model.side.aggregator.alpha_logits.normal_()
    ids = rand_ids(2, 11)
    hidden = model.hidden_states(ids)
    z = [proj(hidden[l]).mean(1) for proj, l in zip(model.side.taps, model.tap_layers)]
    phi = [f(zi) for f, zi in zip(model.side.phi, z)]
    a = model.side.aggregator.alphas()
    s = prev = torch.zeros_like(phi[0])
    expected = []
    for l in range(5):  # taps 1..5, checkpoints after taps 2 and 4
        s = (1 - a[l]) * s + a[l] * phi[l]
        if (l + 1) % 2 == 0:
            s = s + model.side.tree_mlp(torch.cat([s, prev], -1))
            prev = s
        expected.append(s)
    torch.testing.assert_close(model(ids).side_states, torch.stack(expected), atol=1e-6, rtol=1e-5)
    # the checkpoint changes the final state (it feeds forward into later taps)
    plain = copy.deepcopy(model)
    plain.config = plain.config.replace(tree_checkpoint=0)
    assert not torch.allclose(plain(ids).side_states[-1], expected[-1], atol=1e-5)


GRAD_CASES = {
    "token-attnpool-ema-tree-blend": dict(tap_mode="token", pooling="attn", aggregator="ema", tree_checkpoint=2,
                                          blend_into_lm=True, alpha_l1=0.1, alpha_l2=0.1),
    "token-mean-attn-tree-blend": dict(tap_mode="token", pooling="mean", aggregator="attn", tree_checkpoint=3,
                                       blend_into_lm=True),
    "sequence-attnpool-gru-tree": dict(tap_mode="sequence", pooling="attn", aggregator="gru", tree_checkpoint=2),
    "sequence-last-attn": dict(tap_mode="sequence", pooling="last", aggregator="attn"),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_reach_every_trainable_parameter(case):
    model = build(**GRAD_CASES[case], **HEADS, dropout=0.1, side_dropout=0.1).train()
    if model.blend_gate is not None:
        with torch.no_grad():  # at 0 the blend projection gets no gradient (by design): open the gate
            model.blend_gate.fill_(0.5)
    ids = rand_ids(2, 12)
    model(ids, rand_ids(2, 12, seed=3), padding(), **labels()).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient: {missing}"


@pytest.mark.parametrize("aggregator", ["ema", "gru", "attn"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_causality_token_taps_with_blend(aggregator, with_padding):
    model = build(tap_mode="token", aggregator=aggregator, tree_checkpoint=2, blend_into_lm=True, **HEADS).eval()
    with torch.no_grad():  # a strong blend, so that a leak through the side path would show
        model.blend_gate.fill_(10.0)
        model.blend_proj.weight.normal_(std=0.5)
    T = 14
    ids = rand_ids(2, T)
    kpm = None
    if with_padding:
        kpm = torch.zeros(2, T, dtype=torch.bool)
        kpm[0, 11:] = True
        kpm[1, :2] = True
    base = model(ids, key_padding_mask=kpm).logits
    for t in [0, 3, 7, 12]:
        ids2 = ids.clone()
        ids2[:, t + 1:] = rand_ids(2, T - t - 1, seed=100 + t)
        out = model(ids2, key_padding_mask=kpm).logits
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=0,
                                   msg=lambda m: f"future tokens after {t} changed the logits: {m}")
    # the blend is live: closing the gate changes the logits
    with torch.no_grad():
        model.blend_gate.zero_()
    assert (model(ids, key_padding_mask=kpm).logits - base).abs().amax() > 1e-3


def test_blend_gate_starts_at_zero_gets_gradient_and_is_built_once():
    model = build(tap_mode="token", blend_into_lm=True).train()
    assert model.blend_gate.item() == 0.0 and model.blend_gate.requires_grad
    gate, proj = model.blend_gate, model.blend_proj
    names = [n for n, _ in model.named_parameters()]
    assert "blend_gate" in names and "blend_proj.weight" in names
    ids = rand_ids(2, 10)
    # with the gate at 0 the model's logits are the base's
    gpt = GPT(GPTConfig(**{k: v for k, v in TINY.items() if k in GPTConfig.__dataclass_fields__}))
    gpt.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(ids).logits, gpt.eval()(ids).logits)
    model(ids, rand_ids(2, 10, seed=5)).loss.backward()
    assert model.blend_gate.grad is not None and model.blend_gate.grad.abs().item() > 0
    # forward built nothing new: same objects, same parameter list
    assert model.blend_gate is gate and model.blend_proj is proj
    assert [n for n, _ in model.named_parameters()] == names
    # the gate is checkpointed and reset to 0
    with torch.no_grad():
        model.blend_gate.fill_(0.3)
    other = build(tap_mode="token", blend_into_lm=True)
    other.load_state_dict(model.state_dict())
    assert other.blend_gate.item() == pytest.approx(0.3)
    other.reset_parameters()
    assert other.blend_gate.item() == 0.0


def test_blend_with_sequence_taps_raises():
    with pytest.raises(ValueError, match="blend_into_lm"):
        cfg(tap_mode="sequence", blend_into_lm=True)
    c = cfg(tap_mode="token", blend_into_lm=True)
    c.tap_mode = "sequence"  # mutated after validation: the model checks again
    with pytest.raises(ValueError, match="blend_into_lm"):
        LFormer(c)
    assert build(tap_mode="sequence").blend_gate is None


@pytest.mark.parametrize("tap_mode,blend", [("token", True), ("sequence", False)])
def test_lm_loss_ignores_padding(tap_mode, blend):
    model = build(tap_mode=tap_mode, blend_into_lm=blend).eval()
    if blend:
        with torch.no_grad():
            model.blend_gate.fill_(0.5)
    T = 12
    ids, targets, kpm = rand_ids(2, T), rand_ids(2, T, seed=5), padding(2, T)
    out = model(ids, targets, kpm)
    ids2, targets2 = ids.clone(), targets.clone()
    ids2[kpm] = rand_ids(2, T, seed=9)[kpm]
    targets2[kpm] = (targets2[kpm] + 7) % 256
    out2 = model(ids2, targets2, kpm)
    torch.testing.assert_close(out2.loss, out.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out2.logits[~kpm], out.logits[~kpm], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[~kpm], targets[~kpm]))
    assert model(ids, torch.full_like(targets, -100)).loss.item() == 0.0


@pytest.mark.parametrize("pooling", ["mean", "last", "attn"])
def test_pooling_ignores_padding(pooling):
    model = build(tap_mode="sequence", pooling=pooling, n_tools=3, value_head=True).eval()
    T = 12
    ids, kpm = rand_ids(2, T), padding(2, T)
    out = model(ids, key_padding_mask=kpm)
    ids2 = ids.clone()
    ids2[kpm] = rand_ids(2, T, seed=13)[kpm]
    out2 = model(ids2, key_padding_mask=kpm)
    torch.testing.assert_close(out2.side_states, out.side_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(out2.tool_logits, out.tool_logits, atol=1e-6, rtol=0)
    # a right-padded row equals the same row cut to its valid length
    short = model(ids[:1, :9])
    torch.testing.assert_close(out.side_states[:, :1], short.side_states, atol=1e-5, rtol=0)
    # the pooling really is mean / last over the valid tokens
    if pooling != "attn":
        hidden = model.hidden_states(ids, kpm)
        z = model.side.taps[0](hidden[1])
        valid = ~kpm
        ref = (torch.stack([z[b][valid[b]].mean(0) for b in range(2)]) if pooling == "mean"
               else torch.stack([z[0, 8], z[1, -1]]))
        torch.testing.assert_close(out.side_states[0], model.side.aggregator(model.side.phi[0](ref)[None])[0],
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last", "attn"])
def test_token_taps_head_readout_ignores_padding(pooling):
    model = build(tap_mode="token", pooling=pooling, n_tools=3, value_head=True).eval()
    ids, kpm = rand_ids(2, 12), padding()
    out = model(ids, key_padding_mask=kpm)
    ids2 = ids.clone()
    ids2[kpm] = rand_ids(2, 12, seed=17)[kpm]
    out2 = model(ids2, key_padding_mask=kpm)
    torch.testing.assert_close(out2.tool_logits, out.tool_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2.values, out.values, atol=1e-5, rtol=0)


def test_tool_loss_ignores_minus_100():
    model = build(n_tools=3, value_head=True).train()
    ids = rand_ids(3, 10)
    out = model(ids, tool_labels=torch.tensor([-100, -100, -100]))
    assert out.aux_losses["tool"].item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    lab = torch.tensor([1, -100, 2])
    out = model(ids, tool_labels=lab)
    torch.testing.assert_close(out.aux_losses["tool"], F.cross_entropy(out.tool_logits[[0, 2]], lab[[0, 2]]))
    # a non-tool example is never class 0: labels outside [0, n_tools) other than -100 are refused
    for bad in ([1, -1, 0], [3, 0, 0]):
        with pytest.raises(ValueError, match="tool_labels"):
            model(ids, tool_labels=torch.tensor(bad))
    with pytest.raises(ValueError, match="tool_labels"):
        model(ids, tool_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_tools"):
        build()(ids, tool_labels=lab)


def test_value_loss_ignores_nan_and_mask():
    model = build(value_head=True).eval()
    ids = rand_ids(3, 10)
    vt = torch.tensor([0.5, float("nan"), -1.0])
    out = model(ids, value_targets=vt)
    torch.testing.assert_close(out.aux_losses["value"], F.mse_loss(out.values[[0, 2]], vt[[0, 2]]))
    masked = model(ids, value_targets=vt, value_mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(masked.aux_losses["value"], F.mse_loss(out.values[:1], vt[:1]))
    model.train()
    none = model(ids, value_targets=torch.full((3,), float("nan")))
    assert none.aux_losses["value"].item() == 0.0
    none.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_plan_decoder_is_causal_and_ignores_minus_100():
    model = build(**HEADS).eval()
    ids = rand_ids(2, 10)
    plan = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    out = model(ids, plan_targets=plan)
    plan2 = plan.clone()
    plan2[:, 3:] = torch.tensor([[0, 0], [5, 5]])
    out2 = model(ids, plan_targets=plan2)
    # logits at position p see targets < p only (teacher forcing with a BOS shift)
    torch.testing.assert_close(out2.plan_logits[:, :4], out.plan_logits[:, :4], atol=1e-6, rtol=0)
    ign = plan.clone()
    ign[1, 2:] = -100
    o = model(ids, plan_targets=ign)
    keep = ign != -100
    torch.testing.assert_close(o.aux_losses["plan"], F.cross_entropy(o.plan_logits[keep], ign[keep]))
    with pytest.raises(ValueError, match="plan_len"):
        model(ids, plan_targets=torch.zeros(2, 6, dtype=torch.long))


def test_freeze_base_and_unfreeze_last_k():
    model = build(**HEADS).train()
    base = {id(p) for p in model.base_parameters()}
    assert model.freeze_base() is model
    ids = rand_ids(2, 10)
    model(ids, rand_ids(2, 10, seed=3), **labels()).loss.backward()
    for name, p in model.named_parameters():
        if id(p) in base:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    model.unfreeze_last_k(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and id(p) in base}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("layers.3.")}
    model(ids, rand_ids(2, 10, seed=3), **labels()).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("layers.3."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif id(p) in base:
            assert p.grad is None, name
    model.unfreeze_last_k(None)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="k"):
        model.unfreeze_last_k(5)


@pytest.mark.parametrize("tap_mode", ["token", "sequence"])
def test_detach_taps_stops_gradient_into_the_base(tap_mode):
    ids = rand_ids(2, 10)
    for detach in (True, False):
        model = build(tap_mode=tap_mode, detach_taps=detach, n_tools=3).train()
        model(ids, tool_labels=torch.tensor([0, 2])).loss.backward()  # side-path loss only
        base_grads = [p.grad for p in model.base_parameters()]
        if detach:
            assert all(g is None or g.abs().sum() == 0 for g in base_grads)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in base_grads)
        assert model.side.taps[0].proj.weight.grad.abs().sum() > 0


def test_alpha_sparsity_losses():
    model = build(alpha_l1=0.1, alpha_l2=0.2, alpha_per_channel=True).train()
    ids, targets = rand_ids(2, 10), rand_ids(2, 10, seed=3)
    out = model(ids, targets)
    assert set(out.aux_losses) == {"lm", "alpha_l1", "alpha_l2"}
    torch.testing.assert_close(out.aux_losses["alpha_l1"], torch.tensor(0.12))
    torch.testing.assert_close(out.aux_losses["alpha_l2"], torch.tensor(0.0144))
    torch.testing.assert_close(out.loss, out.aux_losses["lm"] + 0.1 * 0.12 + 0.2 * 0.0144)
    g, = torch.autograd.grad(out.aux_losses["alpha_l1"] + out.aux_losses["alpha_l2"],
                             model.side.aggregator.alpha_logits)
    assert (g > 0).all()  # pushing the gates down
    gates = model.get_alpha_gates()
    assert gates.shape == (4, 16) and not gates.requires_grad
    torch.testing.assert_close(gates, torch.full((4, 16), 0.12))
    assert build(aggregator="gru").get_alpha_gates() is None
    assert "alpha_l1" not in build()(ids, targets).aux_losses  # weight 0: not computed
    with pytest.raises(ValueError, match="alpha_l1"):
        cfg(aggregator="gru", alpha_l1=0.1)


def test_config_round_trip_and_validation(tmp_path):
    c = cfg(tap_mode="token", pooling="attn", aggregator="attn", tree_checkpoint=2, blend_into_lm=True, **HEADS)
    assert LFormerConfig.from_json(c.to_json()) == c
    c.to_json(tmp_path / "c.json")
    assert LFormerConfig.from_json(tmp_path / "c.json") == c
    d = json.loads(c.to_json())
    assert d["model_type"] == "lformer" and d["d_side"] == 16 and d["tap_every"] == 1
    assert isinstance(LFormer.from_config(c.to_dict()), LFormer)
    with pytest.raises(TypeError, match="LFormerConfig"):
        LFormer(GPTConfig(d_model=32, n_heads=2))
    for kwargs, field in [(dict(tap_mode="layer"), "tap_mode"), (dict(pooling="cls"), "pooling"),
                          (dict(aggregator="lstm"), "aggregator"), (dict(d_side=0), "d_side"),
                          (dict(tap_every=5), "tap_every"), (dict(tree_checkpoint=5), "tree_checkpoint"),
                          (dict(side_heads=3), "d_side"), (dict(alpha_init=0.0), "alpha_init"),
                          (dict(n_tools=1), "n_tools"), (dict(side_dropout=1.0), "side_dropout"),
                          (dict(detach_taps=1), "detach_taps"), (dict(lambda_plan=-1.0), "lambda_plan")]:
        with pytest.raises(ValueError, match=field):
            cfg(**kwargs)


def test_base_is_gpt_and_factory_kwargs():
    model = build(**HEADS, tap_mode="token", blend_into_lm=True)
    gpt = GPT(GPTConfig(**{k: v for k, v in TINY.items() if k in GPTConfig.__dataclass_fields__})).eval()
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("side.", "blend_")) for k in missing)
    ids = rand_ids(2, 9)
    torch.testing.assert_close(model.eval()(ids).logits, gpt(ids).logits)
    meta = LFormer(model.config, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    d64 = LFormer(model.config, dtype=torch.float64)
    out = d64(ids, rand_ids(2, 9, seed=2), **labels())
    assert out.logits.dtype == torch.float64 and torch.isfinite(out.loss)


def _compile_matches_eager(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        if model.blend_gate is not None:
            model.blend_gate.fill_(0.5)
    twin = copy.deepcopy(model)
    heads = model.config.n_tools > 0
    ids, targets, kpm = rand_ids(2, 12), rand_ids(2, 12, seed=4), padding()
    extra = labels() if heads else {}
    eager = model(ids, targets, kpm, **extra)
    eager.loss.backward()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    out = compiled(ids, targets, kpm, **extra)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    for k in eager.aux_losses:
        torch.testing.assert_close(out.aux_losses[k], eager.aux_losses[k], atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    # inductor code generation is slow on this CPU (minutes for the full model with cold caches):
    # a 2-layer model with the EMA custom op, a tree checkpoint and the blend
    _compile_matches_eager(build(n_layers=2, tap_mode="token", aggregator="ema", tree_checkpoint=2,
                                 blend_into_lm=True, alpha_l1=0.1).eval(), "inductor")


@pytest.mark.slow
def test_torch_compile_full_graph_aot_eager_matches_eager():
    # the full side path (both custom ops: ema_depth_scan and attention_pool, tree checkpoints, blend,
    # every head) traced in one graph, forward and backward, without inductor's code generation
    _compile_matches_eager(build(tap_mode="token", pooling="attn", aggregator="ema", tree_checkpoint=2,
                                 blend_into_lm=True, alpha_l1=0.1, **HEADS).eval(), "aot_eager")


@pytest.mark.parametrize("kw", [dict(tap_mode="token", aggregator="ema", blend_into_lm=True),
                                dict(tap_mode="sequence", pooling="last", aggregator="attn", tree_checkpoint=2)],
                         ids=["token-ema-blend", "sequence-attn-tree"])
def test_few_adamw_steps_reduce_the_loss(kw):
    model = build(**kw, **HEADS).train()
    ids = rand_ids(4, 12, seed=21, vocab=16)
    targets = torch.roll(ids, -1, 1)
    lab = dict(tool_labels=torch.tensor([0, 1, 2, -100]), value_targets=torch.tensor([1.0, -1.0, 0.5, 0.0]),
               plan_targets=torch.tensor([[1, 2, 3, 4, 5]] * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for _ in range(10):
        out = model(ids, targets, **lab)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("aggregator", ["ema", "gru", "attn"])
def test_bf16_autocast_forward_backward(aggregator):
    model = build(tap_mode="token", pooling="attn", aggregator=aggregator, tree_checkpoint=2, blend_into_lm=True,
                  **HEADS).train()
    ids, targets, kpm = rand_ids(2, 12), rand_ids(2, 12, seed=3), padding()
    ref = model(ids, targets, kpm, **labels()).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets, kpm, **labels())
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
