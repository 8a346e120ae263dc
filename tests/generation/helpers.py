"""Shared helpers: tiny models of every cached kind, and a teacher-forced stepper that checks cached
logits against the full forward over the generation window at every step."""
from __future__ import annotations

import torch

from hilt.generate import window_start
from hilt.models import (GPT, HILT, BlockHierarchicalLM, BlockHierarchicalLMConfig, GPTConfig, HILTConfig, LFormer,
                         LFormerConfig, Llama, LlamaConfig, convert_to_npt)


def block_model(pos: str = "rope", block_size: int = 4, max_seq_len: int = 24, **kw) -> BlockHierarchicalLM:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_heads=2, max_seq_len=max_seq_len, block_size=block_size, dropout=0.0,
               pos_encoding=pos, n_local_layers=2, n_global_layers=2, n_decoder_layers=2)
    cfg.update(kw)
    return BlockHierarchicalLM(BlockHierarchicalLMConfig(**cfg)).eval()


def lformer_model(tap_mode: str, aggregator: str = "ema", **kw) -> LFormer:
    torch.manual_seed(0)
    blend = tap_mode == "token"
    m = LFormer(LFormerConfig(d_model=32, n_heads=2, n_layers=3, max_seq_len=24, dropout=0.0, d_side=16,
                              side_heads=2, side_dropout=0.0, tap_mode=tap_mode, blend_into_lm=blend,
                              aggregator=aggregator, **kw)).eval()
    if blend:
        with torch.no_grad():
            m.blend_gate.fill_(0.9)  # the gate starts at 0: open it so a wrong side path would show
            torch.nn.init.normal_(m.blend_proj.weight, std=3.0)
    return m


def llama_model(npt: bool = False) -> Llama:
    torch.manual_seed(0)
    m = Llama(LlamaConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, max_seq_len=24)).eval()
    if npt:
        convert_to_npt(m, "1-2", np_rank=8)
        with torch.no_grad():  # v_b starts at 0 (no modulation): make the NP path matter
            for layer in m.layers:
                if hasattr(layer, "np"):
                    for gen in layer.np.v_b_gen.values():
                        torch.nn.init.normal_(gen.weight, std=0.2)
    return m


def gpt_model(pos: str = "rope") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=24, dropout=0.0, pos_encoding=pos)).eval()


def hilt_model(pos: str = "rope") -> HILT:
    torch.manual_seed(0)
    m = HILT(HILTConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=24, dropout=0.0, pos_encoding=pos,
                        ilt_dim=16, ilt_dropout=0.0)).eval()
    m.set_ilt_scale(0.7)
    return m


@torch.no_grad()
def check_every_step(model, ids: torch.Tensor, prompt_len: int, atol: float = 1e-5) -> int:
    """Feed ``ids`` (B, N) teacher-forced: the prompt's window, then one token per step, sliding as
    :func:`hilt.generate.generate` does; at every step the cached logits of the new token(s) must equal
    ``model(window)``'s. Returns the number of slides seen."""
    L = model.config.max_seq_len
    stride = getattr(model, "window_stride", 1)
    slides = 0
    start = window_start(prompt_len, L, stride)
    cache = model.init_cache(ids.shape[0])
    step = model.forward_step(ids[:, start:prompt_len], cache).logits
    torch.testing.assert_close(step, model(ids[:, start:prompt_len]).logits, atol=atol, rtol=atol)
    for n in range(prompt_len + 1, ids.shape[1] + 1):
        if cache.length >= L:
            if hasattr(model, "slide_cache"):
                model.slide_cache(cache)
            else:
                cache.reset()
            slides += 1
        s = window_start(n, L, stride)
        if cache.length == 0:  # token-wise slide: rebuild from the window
            step = model.forward_step(ids[:, s:n], cache).logits[:, -1:]
        else:
            step = model.forward_step(ids[:, n - 1:n], cache).logits
        assert cache.length == n - s, (cache.length, n, s)
        torch.testing.assert_close(step, model(ids[:, s:n]).logits[:, -1:], atol=atol, rtol=atol)
    return slides
