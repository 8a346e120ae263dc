"""The four ops of hilt, as functions (re-exported from :mod:`hilt_kernels`)."""

from hilt_kernels import attention_pool, block_local_attention, ema_depth_scan, window2_attention

__all__ = ["block_local_attention", "attention_pool", "window2_attention", "ema_depth_scan"]
