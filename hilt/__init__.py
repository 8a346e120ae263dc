"""hilt: fused kernels, modules and models for hierarchical and inter-layer transformers."""

from hilt_kernels import __version__

from . import functional

__all__ = ["functional", "__version__"]
