"""Moved to :mod:`hilt.training.lformer` (the L-Former phases, synthetic reasoning data, head metrics);
this name stays so ``hilt.reasoning`` keeps working."""
from hilt.training.lformer import *  # noqa: F401,F403
from hilt.training.lformer import __all__  # noqa: F401
