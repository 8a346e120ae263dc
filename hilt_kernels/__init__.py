"""hilt_kernels: the four ops of hilt with reference, Triton and CUDA backends.

>>> from hilt_kernels import block_local_attention, attention_pool, window2_attention, ema_depth_scan

Each op validates its inputs, picks a backend (:mod:`hilt_kernels.dispatch`), and runs that
backend's forward and backward as private ``torch.library`` custom ops (``hilt::<op>_fwd_<backend>``).
"""

from .dispatch import BACKENDS, BackendUnavailableError, choose_backend
from .ops import attention_pool, block_local_attention, ema_depth_scan, window2_attention

__version__ = "0.1.0"

__all__ = [
    "block_local_attention",
    "attention_pool",
    "window2_attention",
    "ema_depth_scan",
    "BACKENDS",
    "BackendUnavailableError",
    "choose_backend",
    "__version__",
]
