"""Teacher scaffolding and fidelity metrics for a Hugging Face Llama model with NP layers (:mod:`hilt.hf`).

:func:`hf_scaffolded_forward` is :func:`hilt.models.npt.scaffolded_forward` for a converted
``LlamaForCausalLM``: the teacher is the model's own forward with every NP layer in standard mode (no gradient);
hooks record each decoder layer's input, output and the keyword arguments the model passes it (causal mask,
RoPE ``position_embeddings``, ``position_ids``; whatever this transformers version uses). The student stream
starts at the first NP layer from the teacher's input there (the base is frozen) and runs the layers with those
same arguments; at NP layer i the attention input is ``(1 - attn_ratio) h_t + attn_ratio h_s`` and the MLP
residual input ``(1 - mlp_ratio) h_t + mlp_ratio h_s``; then the final norm and ``lm_head``.

:func:`hf_fidelity` measures KL(teacher || student) per token, next-token agreement, and the loss of both in
nats/token and bits/byte, where bits/byte = total nats / (ln 2 x UTF-8 bytes of the evaluated target text).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hilt.models import npt as N

__all__ = ["hf_scaffolded_forward", "hf_fidelity", "byte_counter", "kl_teacher_student"]

LN2 = math.log(2.0)


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def hf_scaffolded_forward(model: nn.Module, ids: Tensor, attn_ratio: float = 1.0, mlp_ratio: float = 1.0,
                          grad_checkpoint: bool = False) -> N.ScaffoldOutput:
    """One teacher-scaffolded pass of a converted HF causal LM on ``ids`` (B, T) -> :class:`ScaffoldOutput`
    (student and teacher logits (B, T, V), per-NP-layer :class:`LayerStats`). ``attn_ratio = mlp_ratio = 1`` is
    the NPT model's own forward. ``grad_checkpoint``: recompute each student layer in the backward pass."""
    for name, r in (("attn_ratio", attn_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= float(r) <= 1.0:
            raise N.NPTError(f"{name} must be in [0, 1], got {r}")
    idx = N.npt_layers(model)
    if not idx:
        raise N.NPTError("the model has no NP layers: call hilt.hf.convert_hf_llama_to_npt first")
    if torch.is_grad_enabled() and any(p.requires_grad for n, p in model.named_parameters()
                                       if ".np." not in f".{n}"):
        raise N.NPTError("teacher scaffolding on a Hugging Face model needs a frozen base: call freeze_base first")
    layers = N._layer_list(model)
    first = idx[0]
    t_in: dict[int, Tensor] = {}
    t_out: dict[int, Tensor] = {}
    kw: dict[int, dict] = {}

    def pre(i):
        def hook(mod, args, kwargs):
            t_in[i] = args[0] if args else kwargs["hidden_states"]
            kw[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            t_out[i] = _out(out)
        return hook

    handles = []
    try:
        for i in range(first, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
            if i in idx:
                handles.append(layers[i].register_forward_hook(post(i), with_kwargs=True))
        with torch.no_grad(), N.standard_mode(model):
            teacher_logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()

    h_s = t_in[first]
    stats = {}
    for i in range(first, len(layers)):
        layer, kwargs = layers[i], kw[i]
        if i not in idx:
            if grad_checkpoint and torch.is_grad_enabled():
                h_s = checkpoint(lambda x, _l=layer, _k=kwargs: _out(_l(x, **_k)), h_s, use_reentrant=False)
            else:
                h_s = _out(layer(h_s, **kwargs))
            continue
        attn_in = N.lerp_states(t_in[i], h_s, float(attn_ratio))
        mlp_in = N.lerp_states(t_in[i], h_s, float(mlp_ratio))
        if grad_checkpoint and torch.is_grad_enabled():
            parts = checkpoint(lambda x, y, _l=layer, _k=kwargs: _l.npt_forward(x, y, return_parts=True, **_k),
                               attn_in, mlp_in, use_reentrant=False)
        else:
            parts = layer.npt_forward(attn_in, mlp_in, return_parts=True, **kwargs)
        h_s, a, delta, vectors = parts
        stats[i] = N.layer_stats(delta, t_out[i] - t_in[i], vectors, a)
    inner = getattr(model, "model", model)
    logits = model.lm_head(inner.norm(h_s))
    return N.ScaffoldOutput(logits, teacher_logits, stats)


def kl_teacher_student(teacher_logits: Tensor, student_logits: Tensor, reduction: str = "mean") -> Tensor:
    """KL(teacher || student) of the next-token distributions (..., V), summed over the vocabulary; the mean
    (or ``sum``) over tokens."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.sum() if reduction == "sum" else kl.mean()


def byte_counter(tokenizer) -> Callable[[Tensor], int]:
    """``f(targets (B, T)) -> UTF-8 bytes of the text they decode to`` (each row decoded on its own, special
    tokens kept, no clean-up of spaces)."""
    def count(targets: Tensor) -> int:
        rows = tokenizer.batch_decode(targets.tolist(), skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
        return sum(len(r.encode("utf-8")) for r in rows)
    return count


@torch.no_grad()
def hf_fidelity(model: nn.Module, batches, count_bytes: Callable[[Tensor], int],
                forward: Optional[Callable] = None) -> dict:
    """Student (NPT mode) vs teacher (standard mode) over ``batches`` of ``(ids, targets)`` (B, T):

    ``kl`` (nats/token), ``agreement`` (argmax equal), ``teacher_nats`` / ``student_nats`` (cross-entropy per
    token), ``teacher_bpb`` / ``student_bpb`` (total nats / (ln 2 x bytes)), ``tokens``, ``bytes``."""
    forward = forward or (lambda ids: hf_scaffolded_forward(model, ids, 1.0, 1.0))
    was = model.training
    model.eval()
    tot = np.zeros(4, dtype=np.float64)  # kl, agree, ce_teacher, ce_student
    n_tok = n_bytes = 0
    for ids, targets in batches:
        if ids.numel() == 0:
            continue
        out = forward(ids)
        t, s = out.teacher_logits.float(), out.student_logits.float()
        tot[0] += kl_teacher_student(t, s, reduction="sum").item()
        tot[1] += (t.argmax(-1) == s.argmax(-1)).sum().item()
        tot[2] += F.cross_entropy(t.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tot[3] += F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="sum").item()
        n_tok += targets.numel()
        n_bytes += count_bytes(targets.cpu())
    model.train(was)
    n, b = max(n_tok, 1), max(n_bytes, 1)
    return {"kl": tot[0] / n, "agreement": tot[1] / n, "teacher_nats": tot[2] / n, "student_nats": tot[3] / n,
            "teacher_bpb": tot[2] / (LN2 * b), "student_bpb": tot[3] / (LN2 * b), "tokens": n_tok, "bytes": n_bytes}
