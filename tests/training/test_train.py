"""The training loop: exact resume, the NaN/inf guard, autocast, activation checkpointing, outputs."""
from __future__ import annotations

import csv
import json

import os

import pytest
import torch

import hilt
from hilt.models import GPT
from hilt.training.checkpoint import model_types
from hilt.training.config import TrainingError
from hilt.training.distributed import cpu_threads
from hilt.training.loop import train
from hilt.training.model import enable_grad_checkpointing

from .train_helpers import tiny_config


def _losses(history):
    return [r["loss"] for r in history]


def test_resume_is_exact(tmp_path, text_dir):
    straight = train(tiny_config(text_dir, tmp_path / "a", max_steps=6, eval_every=3), log=lambda *a: None)
    part1 = train(tiny_config(text_dir, tmp_path / "b", max_steps=6, eval_every=3), stop_at_step=3,
                  log=lambda *a: None)
    assert part1.step == 3 and (tmp_path / "b" / "checkpoint" / "optimizer.pt").exists()
    part2 = train(tiny_config(text_dir, tmp_path / "ignored", max_steps=6), resume=str(tmp_path / "b" / "checkpoint"),
                  log=lambda *a: None)
    assert part2.out_dir == (tmp_path / "b").resolve()  # the resumed run continues in its own folder
    assert _losses(straight.history) == _losses(part1.history) + _losses(part2.history)
    assert straight.val_loss == part2.val_loss
    for (n, p), (_, q) in zip(straight.model.state_dict().items(), part2.model.state_dict().items()):
        assert torch.equal(p, q), n
    # the CSV of the resumed run holds all 6 steps once, equal to the straight run's
    def rows(d):
        with open(d / "metrics.csv") as f:
            return [(r["step"], r["loss"], r["ilt_scale"], r["lr"]) for r in csv.DictReader(f)]
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == 6


def test_resume_with_dropout_and_grad_accum(tmp_path, text_dir):
    kw = dict(max_steps=4, grad_accum=2, model_config={"d_model": 32, "n_layers": 2, "n_heads": 2,
                                                      "max_seq_len": 32, "dropout": 0.2, "ilt_dim": 16})
    straight = train(tiny_config(text_dir, tmp_path / "a", **kw), log=lambda *a: None)
    train(tiny_config(text_dir, tmp_path / "b", **kw), stop_at_step=2, log=lambda *a: None)
    part2 = train(tiny_config(text_dir, tmp_path / "b", **kw), resume=str(tmp_path / "b" / "checkpoint"),
                  log=lambda *a: None)
    assert _losses(straight.history)[2:] == _losses(part2.history)


def test_nan_guard_skips_a_poisoned_step_then_stops(tmp_path, text_dir, monkeypatch):
    real = GPT.forward
    calls = {"n": 0, "poison": {2}}

    def poisoned(self, ids, targets=None, key_padding_mask=None):
        out = real(self, ids, targets, key_padding_mask)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in calls["poison"]:
                out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=4), log=lambda *a: None)
    assert res.skipped_steps == 1
    assert [r["skipped"] for r in res.history] == [0, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.history[1]["loss"] != res.history[1]["loss"]  # NaN logged for the skipped step
    calls.update(n=0, poison={2, 3, 4, 5, 6})
    with pytest.raises(TrainingError, match=r"3 consecutive steps had a non-finite loss"):
        train(tiny_config(text_dir, tmp_path / "b", max_steps=8, max_bad_steps=3), log=lambda *a: None)


def test_bf16_autocast_on_cpu(tmp_path, text_dir):
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=2, dtype="bfloat16"), log=lambda *a: None)
    assert all(r["loss"] == r["loss"] for r in res.history) and res.val_loss < 6


def test_fp16_autocast_with_grad_scaler_on_cpu(tmp_path, text_dir):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        torch.amp.GradScaler("cpu")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fp16 autocast / GradScaler unsupported on CPU in this torch: {e}")
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=2, dtype="float16"), log=lambda *a: None)
    assert len(res.history) == 2 and res.val_loss == res.val_loss
    st = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert st["step"] == 2
    opt = torch.load(tmp_path / "a" / "checkpoint" / "optimizer.pt", weights_only=True)
    assert opt["scaler"] is not None and opt["scaler"]["scale"] > 0


def test_grad_checkpoint_wraps_layers_and_ilts_once():
    from hilt.models import HILT, HILTConfig

    m = HILT(HILTConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=16, ilt_dim=16))
    assert enable_grad_checkpointing(m) == 3 + 2  # layers + ILTs, not the ILTs' inner layers
    ids = torch.randint(0, 256, (2, 16))
    m(ids, ids).loss.backward()
    assert m.tok_emb.weight.grad is not None


def test_cpu_threads(monkeypatch):
    from hilt.training.distributed import Dist

    assert cpu_threads(3, Dist()) == 3
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None, Dist()) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one each
    assert cpu_threads(None, Dist()) == 1


def test_grad_checkpoint_gives_the_same_losses(tmp_path, text_dir):
    a = train(tiny_config(text_dir, tmp_path / "a", max_steps=3), log=lambda *a: None)
    b = train(tiny_config(text_dir, tmp_path / "b", max_steps=3, grad_checkpoint=True), log=lambda *a: None)
    assert _losses(a.history) == pytest.approx(_losses(b.history), rel=1e-5)


@pytest.mark.parametrize("model", ["gpt", "block", "lformer"])
def test_other_model_types_train(tmp_path, text_dir, model):
    if model not in model_types():
        pytest.skip(f"{model} is not a registered model type here")
    cfg = tiny_config(text_dir, tmp_path / "a", model=model, max_steps=2)
    if model == "lformer":
        cfg.model_config["d_side"] = 16
    if model == "block":
        cfg.model_config = {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "block_size": 8, "dropout": 0.0,
                            "n_local_layers": 1, "n_global_layers": 1, "n_decoder_layers": 1}
    res = train(cfg, log=lambda *a: None)
    m = hilt.load(res.paths["checkpoint"])
    assert m.config.model_type == res.model.config.model_type and res.val_loss == res.val_loss


def test_ilt_scale_schedule_is_applied(tmp_path, text_dir):
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=4, ilt_scale_start=0.02, ilt_scale_end=0.08),
                log=lambda *a: None)
    assert [r["ilt_scale"] for r in res.history] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert hilt.load(res.paths["checkpoint"]).get_ilt_scale() == pytest.approx(0.08)


def test_end_of_run_outputs(tmp_path, text_dir, capsys):
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=2, plot=True, sample_tokens=8))
    out = capsys.readouterr().out
    for key in ("checkpoint", "csv", "plot", "sample"):
        assert res.paths[key].exists() and str(res.paths[key]) in out
    assert res.paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "continuation" in res.paths["sample"].read_text()
    with open(res.paths["csv"]) as f:
        header = next(csv.reader(f))
    assert header[:7] == ["step", "lr", "loss", "val_loss", "val_bpb", "tokens_per_s", "ilt_scale"]
    assert res.val_bpb == pytest.approx(res.val_loss / 0.6931471805599453)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_smoke(tmp_path, text_dir):
    """--compile (torch.compile with the C++ inductor backend on CPU: ~1 minute here)."""
    res = train(tiny_config(text_dir, tmp_path / "a", max_steps=2, compile=True), log=lambda *a: None)
    assert res.val_loss == res.val_loss
    m = hilt.load(res.paths["checkpoint"])  # the plain module was saved, not the compiled wrapper
    assert not any(k.startswith("_orig_mod") for k in m.state_dict())
