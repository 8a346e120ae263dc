"""Moved to :mod:`hilt.training.npt`; this name stays so ``python -m hilt.npt_train`` and
``torchrun -m hilt.npt_train`` keep working."""
from hilt.training.npt import *  # noqa: F401,F403
from hilt.training.npt import __all__, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m hilt.npt_train"))
