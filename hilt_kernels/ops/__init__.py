"""The four public ops: validation, backend choice, and the autograd-connected custom ops."""

from .attention_pool import attention_pool
from .block_local_attention import block_local_attention
from .ema_depth_scan import ema_depth_scan
from .window2_attention import window2_attention

__all__ = ["block_local_attention", "attention_pool", "window2_attention", "ema_depth_scan"]
