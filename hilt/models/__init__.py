"""Models built from :mod:`hilt.nn` modules: GPT, HILT, BlockHierarchicalLM.

Every model: ``Model(config)`` / ``Model.from_config(config)``, ``num_parameters()``,
``forward(ids, targets=None, key_padding_mask=None) -> ModelOutput``.
"""
from .block_cache import BlockKVCache
from .block_hierarchical import BlockHierarchicalLM
from .config import POS_ENCODINGS, BlockHierarchicalLMConfig, GPTConfig, HILTConfig, ModelConfig
from .gpt import GPT
from .hilt import HILT
from .lformer import LFormer, LFormerConfig, LFormerOutput
from .llama import Llama, LlamaConfig
from . import npt
from .npt import NPTLayer, convert_to_npt, freeze_base, load_np_weights, save_np_weights
from .output import ModelOutput, classification_loss, lm_loss

__all__ = [
    "ModelOutput", "lm_loss", "classification_loss", "ModelConfig", "GPTConfig", "HILTConfig",
    "BlockHierarchicalLMConfig", "POS_ENCODINGS", "GPT", "HILT", "BlockHierarchicalLM", "BlockKVCache",
    "LFormer", "LFormerConfig", "LFormerOutput",
    "Llama", "LlamaConfig", "npt", "NPTLayer", "convert_to_npt", "freeze_base", "save_np_weights",
    "load_np_weights",
]
