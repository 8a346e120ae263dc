"""Moved to :mod:`hilt.training.ablate`; this name stays so ``python -m hilt.ablate`` keeps working."""
from hilt.training.ablate import *  # noqa: F401,F403
from hilt.training.ablate import __all__, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m hilt.ablate"))
