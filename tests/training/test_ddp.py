"""DDP on CPU (gloo), 2 processes: replicas stay identical and match one process on the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hilt.training.config import TrainConfig
from hilt.training.loop import train
from .train_helpers import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = train(TrainConfig(**cfg), log=lambda *a: None)
        torch.save({"state": res.model.state_dict(), "history": res.history, "val": res.val_loss},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ddp_two_processes_match_one(tmp_path, text_dir):
    cfg = tiny_config(text_dir, tmp_path / "ddp", max_steps=4, grad_accum=2, eval_iters=2)
    mp.spawn(_worker, args=(2, _free_port(), asdict(cfg), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"replicas differ at {k}"
    assert (tmp_path / "ddp" / "checkpoint" / "state.json").exists()  # rank 0 wrote it
    single = train(tiny_config(text_dir, tmp_path / "single", max_steps=4, grad_accum=2, eval_iters=2),
                   log=lambda *a: None)
    ddp_losses = [r["loss"] for r in r0["history"]]
    one_losses = [r["loss"] for r in single.history]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4, abs=1e-5)
    assert r0["val"] == pytest.approx(single.val_loss, rel=1e-4)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, atol=1e-4, rtol=1e-3, msg=f"DDP vs one process: {k}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_launch(tmp_path, text_dir):
    """`python -m torch.distributed.run --nproc_per_node=2 -m hilt.train ...` end to end."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(_free_port()), "-m", "hilt.train", "--data", str(text_dir), "--out", str(tmp_path / "r"),
                        "--max-steps", "2", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
                        "--max-seq-len", "32", "--ilt-dim", "16", "--batch-size", "4", "--eval-iters", "1",
                        "--no-progress", "--sample-tokens", "8", "--no-plot"],
                       capture_output=True, text=True, env=env, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout and r.stdout.count("hilt train:") == 1  # rank 0 logs only
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").exists()
