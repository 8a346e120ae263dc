"""Moved to :mod:`hilt.training.data`; this name stays so ``hilt.data`` (``encode``/``decode``, the corpus,
the batch sampler) keeps working."""
from hilt.training.data import *  # noqa: F401,F403
from hilt.training.data import __all__  # noqa: F401
