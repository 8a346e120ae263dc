"""The training corpus tokenized with a Hugging Face tokenizer, cached like the byte corpus (:mod:`.data`).

:func:`load_token_corpus` takes the byte corpus (the default stdlib corpus or ``--data``, with its train/val
split by file), decodes each split as UTF-8 and tokenizes it in chunks cut at line ends (no special tokens added).
The token arrays (``uint16`` when the vocabulary fits, else ``uint32``) are written atomically under the cache
folder as ``tokens-<key>/{train,val}.bin`` + ``meta.json``, memory-mapped on the next run. The key hashes the
corpus's sha256 and the tokenizer (its serialized ``tokenizer.json`` when it is a fast tokenizer, else its
vocabulary), so another corpus or tokenizer never reads a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .data import Corpus, CorpusError, cache_dir, load_corpus, read_cache_entry, store_corpus

__all__ = ["tokenizer_fingerprint", "tokenize_text", "load_token_corpus", "TOKEN_CACHE_FORMAT"]

TOKEN_CACHE_FORMAT = 2  # 2: the cache entry layout of data.store_corpus (dtype and item counts)
CHUNK_CHARS = 1 << 16


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the serialized fast tokenizer, else the sorted vocabulary."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def _chunks(text: str, size: int = CHUNK_CHARS):
    """Pieces of about ``size`` characters, each ending at a newline (the last one wherever the text ends)."""
    i = 0
    while i < len(text):
        j = text.find("\n", i + size)
        j = len(text) if j < 0 else j + 1
        yield text[i:j]
        i = j


def tokenize_text(tokenizer, text: str, batch: int = 64) -> np.ndarray:
    """Token ids of ``text`` (1-D int64), tokenized in line-aligned chunks without special tokens."""
    out: list[np.ndarray] = []
    pieces = list(_chunks(text))
    for k in range(0, len(pieces), batch):
        enc = tokenizer(pieces[k:k + batch], add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(e, dtype=np.int64) for e in enc)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32


def load_token_corpus(data: Optional[Union[str, os.PathLike]], tokenizer, *, use_cache: bool = True,
                      cache: Optional[Union[str, os.PathLike]] = None,
                      stdlib: Optional[Union[str, os.PathLike]] = None) -> Corpus:
    """The corpus (``data``: None for the default, or a text file / folder, as :func:`hilt.data.load_corpus`)
    as token ids of ``tokenizer``: :class:`Corpus` with ``train`` / ``val`` 1-D arrays and ``info`` (the byte
    corpus's plus ``train_tokens``, ``val_tokens``, ``tokenizer``)."""
    corpus = load_corpus(data, use_cache=use_cache, cache=cache, stdlib=stdlib)
    fp = tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(json.dumps({"format": TOKEN_CACHE_FORMAT, "corpus": corpus.sha256, "tokenizer": fp,
                                     "source": corpus.info.get("source")}).encode()).hexdigest()
    entry = (Path(cache) if cache is not None else cache_dir()) / f"tokens-{key[:24]}"
    if use_cache:
        hit = read_cache_entry(entry, key, TOKEN_CACHE_FORMAT)
        if hit is not None:
            return hit
    dt = _dtype(tokenizer)
    arrays = [tokenize_text(tokenizer, bytes(np.asarray(split)).decode("utf-8", errors="replace")).astype(dt)
              for split in (corpus.train, corpus.val)]
    for name, arr in zip(("train", "val"), arrays):
        if len(arr) < 2:
            raise CorpusError(f"the {name} split has only {len(arr)} token(s) with this tokenizer: "
                              f"{corpus.info.get('source')}")
    info = {k: v for k, v in corpus.info.items() if k not in ("cache", "cached")}
    info.update(train_tokens=len(arrays[0]), val_tokens=len(arrays[1]), tokenizer=fp[:16],
                vocab_size=len(tokenizer))
    return store_corpus(entry, key, TOKEN_CACHE_FORMAT, arrays[0], arrays[1], info, use_cache)
