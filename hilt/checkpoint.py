"""Moved to :mod:`hilt.training.checkpoint` (the model registry: :mod:`hilt.models.registry`); this name
stays so ``hilt.checkpoint`` keeps working."""
from hilt.training.checkpoint import *  # noqa: F401,F403
from hilt.training.checkpoint import __all__  # noqa: F401
