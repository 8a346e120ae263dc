"""Drop-in torch.nn modules for hierarchical and inter-layer transformers.

The token mixers call the fused ops of :mod:`hilt.functional`; each takes ``backend=None``
(auto) or ``"reference" | "triton" | "cuda"``, passed to the op.
"""
from .attention import BlockLocalAttention, CausalSelfAttention, Window2Attention
from .depth_aggregators import (DEPTH_AGGREGATORS, AttentionDepthAggregator, EMADepthAggregator,
                                GRUDepthAggregator, make_depth_aggregator)
from .ilt import InterLayerTransformer
from .layers import ATTENTION_KINDS, MLP, TransformerLayer
from .pooling import AttentionPooling, block_padding_mask
from .positional import LearnedPositionalEncoding, RotaryEmbedding, SinusoidalPositionalEncoding

__all__ = [
    "BlockLocalAttention", "CausalSelfAttention", "Window2Attention", "AttentionPooling",
    "block_padding_mask", "InterLayerTransformer", "MLP", "TransformerLayer", "ATTENTION_KINDS",
    "SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "RotaryEmbedding",
    "EMADepthAggregator", "GRUDepthAggregator", "AttentionDepthAggregator", "DEPTH_AGGREGATORS",
    "make_depth_aggregator",
]
