"""hilt: fused kernels, modules and models for hierarchical and inter-layer transformers."""

from hilt_kernels import __version__

from . import functional

__all__ = ["functional", "load", "__version__"]


def load(path, device="cpu", **kwargs):
    """The model saved in a checkpoint folder (``hilt train`` writes ``<run>/checkpoint``), in eval mode.
    See :func:`hilt.training.checkpoint.load`."""
    from .training.checkpoint import load as _load

    return _load(path, device=device, **kwargs)

