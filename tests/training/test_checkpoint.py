"""Checkpoint folders: atomic save, tied weights, hilt.load, and clear errors for bad checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import hilt
import hilt.training.checkpoint as hc
from hilt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hilt.models import GPT, HILT, BlockHierarchicalLM, BlockHierarchicalLMConfig, GPTConfig, HILTConfig


def _hilt(**kw):
    torch.manual_seed(0)
    return HILT(HILTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, ilt_dim=16, **kw))


def _ids():
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make", [
    _hilt,
    lambda: GPT(GPTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)),
    lambda: BlockHierarchicalLM(BlockHierarchicalLMConfig(d_model=32, n_heads=2, max_seq_len=32, block_size=4,
                                                          n_local_layers=1, n_global_layers=1,
                                                          n_decoder_layers=1)),
], ids=["hilt", "gpt", "block"])
def test_load_round_trip_identical_logits(tmp_path, make):
    m = make().eval()
    if hasattr(m, "set_ilt_scale"):
        m.set_ilt_scale(0.0625)
    save_checkpoint(tmp_path / "ck", m, step=7)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "state.json"]
    m2 = hilt.load(tmp_path / "ck", device="cpu")
    assert type(m2) is type(m) and not m2.training and m2.config == m.config
    with torch.no_grad():
        assert torch.equal(m(_ids()).logits, m2(_ids()).logits)
    if hasattr(m, "set_ilt_scale"):
        assert m2.get_ilt_scale() == 0.0625


def test_tied_embeddings_survive(tmp_path):
    m = _hilt()
    with torch.no_grad():
        m.tok_emb.weight.add_(0.5)
    save_checkpoint(tmp_path / "ck", m)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("tok_emb.weight" in keys) != ("lm_head.weight" in keys), "a tied weight is stored once"
    m2 = hilt.load(tmp_path / "ck")
    assert m2.lm_head.weight is m2.tok_emb.weight
    assert torch.equal(m2.tok_emb.weight, m.tok_emb.weight)


def test_retie_when_the_model_comes_untied(tmp_path):
    m = _hilt()
    save_checkpoint(tmp_path / "ck", m)
    m2 = _hilt()
    m2.lm_head.weight = torch.nn.Parameter(torch.zeros_like(m2.lm_head.weight))  # broken tie
    load_checkpoint(tmp_path / "ck", m2)
    assert m2.lm_head.weight is m2.tok_emb.weight and torch.equal(m2.tok_emb.weight, m.tok_emb.weight)


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = _hilt()
    opt = torch.optim.AdamW(m.parameters())
    save_checkpoint(tmp_path / "ck", m, optimizer=opt, step=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with torch.no_grad():
        m.tok_emb.weight.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hc, "_write_optimizer", boom)  # fails after the weights were written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ck", m, optimizer=opt, step=2)
    after = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"], "the temp folder was left behind"
    assert hc.read_state(tmp_path / "ck")["step"] == 1
    monkeypatch.undo()
    # a failure in the final rename puts the previous checkpoint back
    real_replace = hc.os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(hc.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path / "ck", m, optimizer=opt, step=3)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    save_checkpoint(tmp_path / "ck", m, optimizer=opt, step=4)
    assert hc.read_state(tmp_path / "ck")["step"] == 4


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    m = _hilt()
    good = tmp_path / "good"
    save_checkpoint(good, m, optimizer=torch.optim.AdamW(m.parameters()))

    def copy(name):
        import shutil

        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    with pytest.raises(CheckpointError, match="not found"):
        hilt.load(tmp_path / "missing")
    ck = copy("no_weights")
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        hilt.load(ck)
    ck = copy("no_state")
    (ck / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: missing"):
        hilt.load(ck)
    ck = copy("bad_json")
    (ck / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json: not valid JSON"):
        hilt.load(ck)
    ck = copy("version")
    s = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps(dict(s, format_version=99)))
    with pytest.raises(CheckpointError, match="format_version 99"):
        hilt.load(ck)
    ck = copy("unknown_type")
    (ck / "state.json").write_text(json.dumps(dict(s, model_type="nonesuch")))
    with pytest.raises(CheckpointError, match="unknown model type 'nonesuch'"):
        hilt.load(ck)
    ck = copy("shape")
    cfg = dict(s["config"], d_model=64, ilt_dim=16)
    (ck / "state.json").write_text(json.dumps(dict(s, config=cfg)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatch for '.*': checkpoint \(16, 32\), model \(16, 64\)"):
        hilt.load(ck)
    ck = copy("truncated")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        hilt.load(ck)
    ck = copy("opt")
    (ck / "optimizer.pt").write_bytes(b"garbage")
    m2 = _hilt()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: cannot read"):
        load_checkpoint(ck, m2, optimizer=torch.optim.AdamW(m2.parameters()))
    # the wrong model type
    with pytest.raises(CheckpointError, match="holds a 'hilt' model, expected 'gpt'"):
        hilt.load(good, model_type="gpt")
    gpt = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    with pytest.raises(CheckpointError, match="but the model to restore is 'gpt'"):
        load_checkpoint(good, gpt)
    # a GPT-shaped config where HILT weights are expected: missing/unexpected tensors are named
    ck = copy("missing_tensors")
    (ck / "state.json").write_text(json.dumps(dict(s, config=dict(s["config"], n_layers=3))))
    with pytest.raises(CheckpointError, match="missing tensors"):
        hilt.load(ck)
