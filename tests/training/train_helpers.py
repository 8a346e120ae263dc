"""Helpers of the training tests (tiny text folder, tiny configs)."""
from __future__ import annotations

from pathlib import Path

from hilt.training.config import TrainConfig

TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "dropout": 0.0, "ilt_dim": 16,
              "ilt_dropout": 0.0}


def make_text_folder(root: Path, n_files: int = 6, lines: int = 60) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(lines))
        (root / f"doc{i:02d}.txt").write_text(body)
    return root


def tiny_config(data: Path, out: Path, model: str = "hilt", **kw) -> TrainConfig:
    base = dict(model=model, model_config=dict(TINY_MODEL) if model == "hilt" else
                {k: v for k, v in TINY_MODEL.items() if not k.startswith("ilt")},
                data=str(data), out=str(out), device="cpu", batch_size=4, max_steps=6, warmup=2,
                eval_every=0, eval_iters=2, ckpt_every=0, progress=False, plot=False, sample_tokens=0,
                tensorboard=False, seed=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)
