"""The synthetic reasoning data (labels recomputed from the rules, padding, determinism, disjoint splits) and
L-Former training: phase A freezes the base, phase B trains the last k layers only, the eval metrics use the
right subsets, and a tiny ``hilt train --model lformer`` run."""
from __future__ import annotations

import csv
import math
import re

import pytest
import torch

from hilt.cli import main as cli_main
from hilt.models import LFormer, LFormerConfig
from hilt.training.lformer import (PLAN_END, PLAN_LEN, PLAN_TASKS, PLAN_VOCAB, TOOLS, VALUE_SCALE, LFormerTraining,
                            collate, evaluate_reasoning, lformer_head_config, make_examples, predict,
                            reasoning_metrics, split_of, tool_rule)
from hilt.training.config import TrainConfig
from hilt.training.loop import train

from .train_helpers import tiny_config

LF = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "dropout": 0.0, "d_side": 16,
      "side_heads": 2, "side_dropout": 0.0}


def test_labels_are_correct_by_the_rules():
    examples = make_examples(3000, seed=3, max_len=32)
    assert {e.kind for e in examples} == {"tool", "value", "plan", "chat"}
    for e in examples:
        assert len(e.text.encode()) <= 32
        words = re.findall(r"[a-z]+", e.text)
        tools = [w for w in words if w in TOOLS]
        if e.kind == "tool":
            assert len(tools) == 1 and e.tool == TOOLS.index(tools[0]) == tool_rule(e.text)
        else:  # non-tool examples: no tool word and the ignored label
            assert tools == [] and e.tool == -100 == tool_rule(e.text)
        if e.kind == "value":
            expr = re.fullmatch(r"what is ([0-9 +*-]+)\?", e.text).group(1)
            assert e.value == float(eval(expr))  # noqa: S307 - digits and + - * only (checked by the regex)
        else:
            assert math.isnan(e.value)
        if e.kind == "plan":
            tasks = e.text[len("plan: "):].split(" then ")
            steps = [s for t in tasks for s in PLAN_TASKS[t]] + [PLAN_END]
            assert [PLAN_VOCAB[i] for i in e.plan] == steps and len(e.plan) <= PLAN_LEN
        else:
            assert e.plan == ()


def test_generation_is_deterministic_and_the_splits_are_disjoint():
    assert make_examples(200, seed=5) == make_examples(200, seed=5)
    assert make_examples(200, seed=5) != make_examples(200, seed=6)
    train_ex = make_examples(2000, seed=0, max_len=32, split="train")
    eval_ex = make_examples(300, seed=1, max_len=32, split="eval")
    assert not {e.text for e in train_ex} & {e.text for e in eval_ex}
    assert all(split_of(e.text) == "eval" for e in eval_ex)
    assert {e.kind for e in eval_ex} == {"tool", "value", "plan", "chat"}


def test_collate_pads_and_masks():
    ex = make_examples(12, seed=1)
    b = collate(ex, length=40)
    for i, e in enumerate(ex):
        n = len(e.text.encode())
        assert b.ids[i, :n].tolist() == list(e.text.encode()) and (b.ids[i, n:] == 0).all()
        assert not b.key_padding_mask[i, :n].any() and b.key_padding_mask[i, n:].all()
        assert b.plan_targets[i, :len(e.plan)].tolist() == list(e.plan)
        assert (b.plan_targets[i, len(e.plan):] == -100).all()
    assert b.tool_labels.tolist() == [e.tool for e in ex]


def _hook(**kw):
    cfg = TrainConfig(model="lformer", batch_size=4, max_steps=10, seed=0, reasoning_examples=200,
                      reasoning_eval_examples=40, **kw)
    torch.manual_seed(0)
    model = LFormer(LFormerConfig(**LF, **lformer_head_config()))
    return LFormerTraining(cfg, model, 32, torch.device("cpu"), log=lambda *a: None), model


def test_mix_appends_reasoning_rows_with_ignored_lm_targets():
    hook, model = _hook()
    ids = torch.randint(0, 256, (4, 32))
    targets = torch.randint(0, 256, (4, 32))
    ids2, targets2, kw = hook.mix(ids, targets, step=3, micro=0)
    assert ids2.shape == (6, 32) and torch.equal(ids2[:4], ids) and torch.equal(targets2[:4], targets)
    assert (targets2[4:] == -100).all()  # no LM loss on reasoning rows
    assert not kw["key_padding_mask"][:4].any() and kw["key_padding_mask"][4:].any()
    assert (kw["tool_labels"][:4] == -100).all() and torch.isnan(kw["value_targets"][:4]).all()
    assert (kw["plan_targets"][:4] == -100).all()
    # labels follow the rows' texts (value targets scaled by 1 / VALUE_SCALE); rows change with the step
    hook.rows = 16
    ids2, targets2, kw = hook.mix(ids, targets, step=3, micro=0)
    for i in range(4, 20):
        text = bytes(ids2[i][~kw["key_padding_mask"][i]].tolist()).decode()
        assert int(kw["tool_labels"][i]) == tool_rule(text)
        v = float(kw["value_targets"][i]) * VALUE_SCALE
        if text.startswith("what is "):
            assert v == pytest.approx(float(eval(text[8:-1])))  # noqa: S307 - digits and + - * only
        else:
            assert math.isnan(v)
    # the same (step, micro) gives the same rows (exact resume)
    again = hook.mix(ids, targets, step=3, micro=0)
    assert torch.equal(again[0], ids2) and torch.equal(again[2]["plan_targets"], kw["plan_targets"])
    assert not torch.equal(hook.mix(ids, targets, step=4, micro=0)[0], ids2)
    out = model(ids2, targets2, **kw)
    assert set(out.aux_losses) == {"lm", "tool", "value", "plan"} and torch.isfinite(out.loss)


def test_metrics_use_the_right_subsets():
    ex = make_examples(64, seed=2, max_len=32)
    b = collate(ex)
    is_tool = b.tool_labels != -100
    is_value = torch.isfinite(b.value_targets)
    is_plan = (b.plan_targets != -100).any(1)
    # right on the subset, wrong (or garbage) everywhere else: perfect scores
    tool = torch.where(is_tool, b.tool_labels, 3 - b.tool_labels.clamp_min(0))
    value = torch.where(is_value, b.value_targets, torch.full_like(b.value_targets, 1e6)).nan_to_num(1e6)
    plan = torch.where(b.plan_targets == -100, 5, b.plan_targets)  # padding positions do not count
    plan[~is_plan] = 0
    m = reasoning_metrics(tool, value, plan, b)
    assert m["n_tool"] == int(is_tool.sum()) and m["tool_correct"] == m["n_tool"] > 0
    assert m["n_value"] == int(is_value.sum()) > 0 and m["value_abs_err"] == 0.0
    assert m["n_plan"] == int(is_plan.sum()) > 0 and m["plan_exact"] == m["n_plan"]
    # one wrong tool, one value off by 2, one plan wrong at one valid position
    i, j, k = (int(x.nonzero()[0]) for x in (is_tool, is_value, is_plan))
    tool[i] = (tool[i] + 1) % len(TOOLS)
    value[j] += 2
    plan[k, 0] = (plan[k, 0] + 1) % len(PLAN_VOCAB)
    m = reasoning_metrics(tool, value, plan, b)
    assert m["tool_correct"] == m["n_tool"] - 1 and m["value_abs_err"] == pytest.approx(2.0)
    assert m["plan_exact"] == m["n_plan"] - 1


def test_evaluate_reasoning_on_a_model():
    hook, model = _hook()
    res = evaluate_reasoning(model, hook.eval_examples, batch_size=16)
    assert 0 <= res["tool_acc"] <= 1 and 0 <= res["plan_em"] <= 1 and math.isfinite(res["value_mae"])
    assert model.training  # mode restored
    # greedy plan decoding is self-consistent: teacher forcing on its own output gives the same argmax
    model.eval()
    b = collate([e for e in hook.eval_examples if e.kind == "plan"][:8])
    _, _, plan = predict(model, b)
    with torch.no_grad():
        logits = model(b.ids, key_padding_mask=b.key_padding_mask, plan_targets=plan).plan_logits
    assert torch.equal(logits.argmax(-1), plan)


def _params(model, prefix):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _changed(a, b):
    return {n for n in a if not torch.equal(a[n], b[n])}


@pytest.mark.parametrize("unfreeze", ["1", "all"])
def test_phase_a_freezes_the_base_and_phase_b_trains_the_last_k(tmp_path, text_dir, unfreeze):
    kw = dict(model="lformer", max_steps=6, phase_a_steps=3, phase_b_unfreeze=unfreeze, warmup=1,
              reasoning_examples=100, reasoning_eval_examples=20, weight_decay=0.1)
    mc = dict(LF)
    log = lambda *a, **k: None  # noqa: E731
    start = train(tiny_config(text_dir, tmp_path / "s", model_config=mc, **kw), stop_at_step=0, log=log).model
    mid = train(tiny_config(text_dir, tmp_path / "a", model_config=mc, **kw), stop_at_step=3, log=log).model
    end = train(tiny_config(text_dir, tmp_path / "b", model_config=mc, **kw), log=log).model
    base = [n for n, _ in start.named_parameters() if not n.startswith(("side.", "blend_"))]
    s, m, e = (dict((n, p.detach()) for n, p in x.named_parameters()) for x in (start, mid, end))
    # phase A: the base is unchanged (no update, no weight decay), the side path moved
    assert not _changed({n: s[n] for n in base}, {n: m[n] for n in base})
    assert _changed(_params(start, "side."), _params(mid, "side."))
    # phase B: the last layer (K=1) or the whole base changes; with K=1 nothing else of the base does
    changed_b = _changed({n: m[n] for n in base}, {n: e[n] for n in base})
    last = {n for n in base if n.startswith("layers.1.")}
    if unfreeze == "1":
        assert changed_b == last
    else:
        assert last <= changed_b and "tok_emb.weight" in changed_b and any(n.startswith("layers.0.") for n in changed_b)
    assert _changed(_params(mid, "side."), _params(end, "side."))


def test_phase_options(tmp_path, text_dir):
    with pytest.raises(ValueError, match="lformer only"):
        tiny_config(text_dir, tmp_path, model="gpt", phase_a_steps=2).validate()
    with pytest.raises(ValueError, match="phase-b-unfreeze"):
        _hook(phase_b_unfreeze="5")
    from hilt.training.lformer import resolve_phases
    cfg = resolve_phases(TrainConfig(model="lformer", max_steps=100, phase_a_steps=7, phase_b_steps=5))
    assert cfg.max_steps == 12
    assert resolve_phases(TrainConfig(model="lformer", max_steps=100)).max_steps == 100


def test_hilt_train_lformer_smoke(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--model", "lformer", "--data", str(text_dir), "--out", str(out), "--max-steps", "4",
                   "--phase-a-steps", "2", "--phase-b-unfreeze", "all", "--batch-size", "4", "--d-model", "32",
                   "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "32", "--d-side", "16", "--eval-every", "2",
                   "--eval-iters", "1", "--reasoning-examples", "100", "--reasoning-eval-examples", "24",
                   "--no-progress", "--no-plot", "--sample-tokens", "8", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tool acc" in printed and "phase A" in printed
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["phase"] for r in rows] == ["A", "A", "B", "B"]
    for r in (rows[1], rows[3]):
        for k in ("val_bpb", "tool_acc", "value_mae", "plan_em"):
            assert math.isfinite(float(r[k])), (k, r)


def test_lformer_without_heads_trains_as_a_plain_lm(tmp_path, text_dir):
    mc = dict(LF, n_tools=0, value_head=False, plan_vocab=0, tap_mode="token", blend_into_lm=True)
    res = train(tiny_config(text_dir, tmp_path / "a", model="lformer", model_config=mc, max_steps=2),
                log=lambda *a, **k: None)
    assert [r["phase"] for r in res.history] == ["", ""] and res.history[-1]["tool_acc"] == ""
    assert all(p.requires_grad for p in res.model.parameters())  # nothing frozen


def test_lformer_resume_across_the_phase_boundary_is_exact(tmp_path, text_dir):
    kw = dict(model="lformer", model_config=dict(LF), max_steps=4, phase_a_steps=2, reasoning_examples=100,
              reasoning_eval_examples=20)
    log = lambda *a, **k: None  # noqa: E731
    straight = train(tiny_config(text_dir, tmp_path / "a", **kw), log=log)
    train(tiny_config(text_dir, tmp_path / "b", **kw), stop_at_step=1, log=log)
    resumed = train(tiny_config(text_dir, tmp_path / "b", **kw), resume=str(tmp_path / "b" / "checkpoint"), log=log)
    assert [r["loss"] for r in straight.history][1:] == [r["loss"] for r in resumed.history]
    assert [r["phase"] for r in resumed.history] == ["A", "B", "B"]
    assert straight.history[-1]["tool_acc"] == resumed.history[-1]["tool_acc"]
