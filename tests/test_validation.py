"""Bad input raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

from hilt_kernels import attention_pool, block_local_attention, ema_depth_scan, window2_attention

x4 = torch.randn(2, 8, 2, 4)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: block_local_attention(torch.randn(2, 8, 4), x4, x4, 4), ValueError, r"q must have shape \(B, T, H, D\)"),
        (lambda: block_local_attention(x4, torch.randn(2, 9, 2, 4), x4, 4), ValueError, "k must have the shape of q"),
        (lambda: block_local_attention(x4, x4, x4.double(), 4), TypeError, "v must have the dtype of q"),
        (lambda: block_local_attention(x4.long(), x4, x4, 4), TypeError, "q must be a floating-point"),
        (lambda: block_local_attention(x4, x4, x4, 0), ValueError, "block_size must be an int >= 1"),
        (lambda: block_local_attention(x4, x4, x4, 2.0), TypeError, "block_size must be an int"),
        (lambda: block_local_attention(x4, x4, x4, 4, key_padding_mask=torch.zeros(2, 8)), TypeError, "key_padding_mask must have dtype torch.bool"),
        (lambda: block_local_attention(x4, x4, x4, 4, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, T\)"),
        (lambda: block_local_attention(x4, x4, x4, 4, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: block_local_attention(x4, x4, x4, 4, causal=1), TypeError, "causal must be a bool"),
        (lambda: block_local_attention("q", x4, x4, 4), TypeError, "q must be a torch.Tensor"),
        (lambda: attention_pool(torch.randn(2, 8), x4, 4), ValueError, r"scores must have shape \(B, T, H\)"),
        (lambda: attention_pool(torch.randn(2, 8, 3), x4, 4), ValueError, "values must have shape"),
        (lambda: attention_pool(torch.randn(2, 8, 2), torch.randn(2, 7, 4), 4), ValueError, "values must have shape"),
        (lambda: attention_pool(torch.randn(2, 8, 2), x4, -1), ValueError, "block_size must be an int >= 1"),
        (lambda: attention_pool(torch.randn(2, 8, 2), x4.int(), 4), TypeError, "values must be a floating-point"),
        (lambda: attention_pool(torch.randn(2, 8, 2), x4, 4, key_padding_mask=torch.zeros(8, 2, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (lambda: window2_attention(x4, x4, x4), ValueError, r"q must have shape \(B, 2, T, H, D\)"),
        (lambda: window2_attention(*(torch.randn(2, 3, 4, 2, 4),) * 3), ValueError, "window of 2"),
        (lambda: window2_attention(torch.randn(1, 2, 3, 2, 4), torch.randn(1, 2, 3, 2, 5), torch.randn(1, 2, 3, 2, 4)), ValueError, "k must have the shape of q"),
        (lambda: window2_attention(*(torch.randn(1, 2, 3, 2, 4),) * 2, torch.randn(1, 2, 3, 2, 4).half()), TypeError, "v must have the dtype of q"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(5)), ValueError, "alpha_logits must have L"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(4, 2)), ValueError, r"alpha_logits of shape \(L, C\) needs C"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(4, 3, 1)), ValueError, r"alpha_logits must have shape \(L,\) or \(L, C\)"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(4), init=torch.randn(2)), ValueError, "init must be broadcastable"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(4), init=torch.randn(3).double()), TypeError, "init must have the dtype of values"),
        (lambda: ema_depth_scan(torch.randn(4, 3).long(), torch.randn(4)), TypeError, "values must be a floating-point"),
        (lambda: ema_depth_scan(torch.randn(4, 3), torch.randn(4), return_all=None), TypeError, "return_all must be a bool"),
        (lambda: ema_depth_scan(torch.randn(0, 3), torch.randn(0), return_all=False), ValueError, "L >= 1"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (CPU and CUDA)")
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="must be on the device of q"):
        block_local_attention(x4, x4.cuda(), x4, 4)


def test_mixed_devices_are_rejected_meta():
    """Without a GPU, a meta tensor stands in for a second device."""
    with pytest.raises(ValueError, match="k must be on the device of q"):
        block_local_attention(x4, x4.to("meta"), x4, 4)
    with pytest.raises(ValueError, match="key_padding_mask must be on the inputs' device"):
        block_local_attention(x4, x4, x4, 4, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="alpha_logits must be on the device of values"):
        ema_depth_scan(torch.randn(4, 3), torch.randn(4, device="meta"))
