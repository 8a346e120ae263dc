"""FSDP2 on CPU (gloo), 2 processes: the same losses as one process on the same global batch, and a
checkpoint in the single-process format (loadable by hilt.load); --fsdp without torchrun is an error."""
from __future__ import annotations

import os
import socket
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hilt
from hilt.training.config import TrainConfig, TrainingError
from hilt.training.loop import train
from .train_helpers import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str, resume) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = train(TrainConfig(**cfg), resume=resume, explicit={"max_steps"} if resume else None,
                    log=lambda *a: None)
        torch.save({"history": res.history, "val": res.val_loss}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is on disk: leave without C++ static destructors. On CPU/gloo a worker sometimes aborted
    # at interpreter exit ("terminate called without an active exception", SIGABRT) after finishing its
    # work, which failed the test although nothing it checks went wrong.
    os._exit(0)


def _spawn(cfg: TrainConfig, out_dir, resume=None) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), asdict(cfg), str(out_dir), resume), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


BLOCK = {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "dropout": 0.0, "block_size": 8, "n_local_layers": 1,
         "n_global_layers": 1, "n_decoder_layers": 1}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["hilt", "block"])
def test_fsdp_two_processes_match_one(tmp_path, text_dir, model):
    kw = dict(max_steps=4, grad_accum=2, eval_iters=2, sample_tokens=8)
    if model == "block":
        kw["model_config"] = BLOCK
    r0, r1 = _spawn(tiny_config(text_dir, tmp_path / "fsdp", model=model, fsdp=True, **kw), tmp_path)
    single = train(tiny_config(text_dir, tmp_path / "single", model=model, **kw), log=lambda *a: None)
    one_losses = [r["loss"] for r in single.history]
    for r in (r0, r1):
        assert [h["loss"] for h in r["history"]] == pytest.approx(one_losses, rel=1e-4, abs=1e-5)
        assert r["val"] == pytest.approx(single.val_loss, rel=1e-4)
    assert (tmp_path / "fsdp" / "sample.txt").exists()
    loaded = hilt.load(tmp_path / "fsdp" / "checkpoint")  # rank 0 wrote a single-process checkpoint
    assert type(loaded) is type(single.model)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=1e-4, rtol=1e-3, msg=f"FSDP vs one process: {k}")


@pytest.mark.timeout(300)
def test_fsdp_resume_matches_uninterrupted(tmp_path, text_dir):
    cfg = tiny_config(text_dir, tmp_path / "run", fsdp=True, max_steps=2, warmup=1, eval_iters=1)
    _spawn(cfg, tmp_path)
    cfg4 = tiny_config(text_dir, tmp_path / "run", fsdp=True, max_steps=4, warmup=1, eval_iters=1)
    r0, _ = _spawn(cfg4, tmp_path, resume=str(tmp_path / "run" / "checkpoint"))
    # the same in one process: 2 steps, then resumed to 4 (the schedule then aims at step 4)
    train(tiny_config(text_dir, tmp_path / "part", max_steps=2, warmup=1, eval_iters=1), log=lambda *a: None)
    res = train(tiny_config(text_dir, tmp_path / "part", max_steps=4, warmup=1, eval_iters=1),
                resume=str(tmp_path / "part" / "checkpoint"), explicit={"max_steps"}, log=lambda *a: None)
    assert [h["step"] for h in r0["history"]] == [3, 4]
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in res.history], rel=1e-4, abs=1e-5)
    # the FSDP checkpoint resumes in one process too (same format; --fsdp is not carried over)
    more = train(tiny_config(text_dir, tmp_path / "x", max_steps=5, warmup=1, eval_iters=1),
                 resume=str(tmp_path / "run" / "checkpoint"), explicit={"max_steps"}, log=lambda *a: None)
    assert [h["step"] for h in more.history] == [5]


def test_fsdp_needs_torchrun(tmp_path, text_dir):
    with pytest.raises(TrainingError, match="torchrun"):
        train(tiny_config(text_dir, tmp_path / "r", fsdp=True), log=lambda *a: None)
