"""Tiny offline Hugging Face Llama models for the NPT tests: a byte-level BPE tokenizer trained here on a few
lines of text, and random ``LlamaConfig`` models (grouped-query attention, tied embeddings)."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # héllo wörld {i}\n" for i in range(80))


def tiny_tokenizer():
    """A byte-level BPE (256 byte symbols + ~40 merges + <eos>) trained on :data:`TEXT`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(vocab_size: int, seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size, **kw)).eval()


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A model folder (config, weights, tokenizer) as ``save_pretrained`` writes it."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed, eos_token_id=tok.eos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
