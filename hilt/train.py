"""``hilt train`` / ``python -m hilt.train`` / ``torchrun --nproc_per_node=N -m hilt.train``.

The training code lives in :mod:`hilt.training` (``loop.py`` holds ``train()``); this module keeps the
old names working: ``hilt.train.train``, ``TrainConfig``, the schedules, the parser and ``main``.
"""
from hilt.training.cli import build_parser, config_from_args, main, run_cli
from hilt.training.config import DTYPES, MODEL_FLAGS, TrainConfig, TrainingError, model_config_for
from hilt.training.distributed import Dist, cpu_threads, resolve_device, resolve_dtype, setup_distributed
from hilt.training.evaluate import LN2, evaluate
from hilt.training.loop import TrainResult, train
from hilt.training.model import enable_grad_checkpointing
from hilt.training.schedule import WarmupCosine, configure_optimizer, ilt_scale_at, lr_at

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train", "evaluate", "lr_at", "ilt_scale_at",
           "WarmupCosine", "configure_optimizer", "enable_grad_checkpointing", "build_parser",
           "config_from_args", "main", "MODEL_FLAGS", "DTYPES", "LN2", "Dist", "cpu_threads", "resolve_device",
           "resolve_dtype", "setup_distributed", "model_config_for", "run_cli"]

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m hilt.train"))
