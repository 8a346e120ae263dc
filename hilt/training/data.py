"""Training data: the embedded default corpus, user text, a memory-mapped byte cache, a batch sampler.

Corpus (DESIGN.md, "Training"):

* Default: the running interpreter's own standard library ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``), excluding ``site-packages``, ``dist-packages`` and the test
  folders ``test``, ``tests``, ``idle_test`` at any depth, sorted by relative path. It differs between
  Python versions, so its size and sha256 are logged.
* ``--data FILE|DIR``: a text file, or a directory's text files (recursively, hidden entries and binary
  files skipped), sorted by relative path.
* Split by file: of ``n`` files, ``n_val = max(1, round(VAL_FRACTION * n))`` evenly spaced files (in
  sorted order) go to validation, the rest to training. A single file is split by bytes (its last
  ``VAL_FRACTION`` goes to validation). Files are concatenated in order, each followed by a newline
  when it does not end with one.
* Tokens are bytes (vocab 256). The token arrays are cached as ``uint8`` files, memory-mapped, with a
  JSON sidecar (hash, sizes, file lists) under ``$HILT_CACHE_DIR`` (default ``~/.cache/hilt``): the cache
  key is computed from paths, sizes and mtimes only, so a second run does not read the corpus again.

Sampling: :class:`BatchSampler` draws random windows of ``seq_len + 1`` bytes with a seeded
``torch.Generator`` and returns ``(ids, targets)`` shifted by one. Under DDP every rank draws the same
global batch and keeps its own contiguous shard of rows, so the union over ranks is exactly the
single-process batch.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "VOCAB_SIZE", "VAL_FRACTION", "EXCLUDED_DIRS", "CorpusError", "Corpus", "CorpusFile",
    "stdlib_dir", "list_stdlib_files", "list_text_files", "split_files", "load_corpus",
    "cache_dir", "BatchSampler", "encode", "decode", "eval_batches",
]

VOCAB_SIZE = 256
VAL_FRACTION = 0.05
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
CACHE_FORMAT = 2  # bump when the cached layout or the corpus rules change (2: meta holds dtype and item counts)


class CorpusError(ValueError):
    """A corpus that cannot be used: missing path, no usable files, nothing to train or validate on."""


@dataclass(frozen=True)
class CorpusFile:
    path: Path  # absolute
    rel: str    # relative path with "/" separators (the sort and split key)


@dataclass
class Corpus:
    """Byte tokens of the train and val splits (``np.memmap`` of uint8 when cached) and their description."""

    train: np.ndarray
    val: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.info["sha256"]

    def describe(self) -> str:
        i = self.info
        return (f"{i['source']}: {i['n_files']} files, {i['bytes']:,} bytes "
                f"(train {i['n_train_files']} files / {i['train_bytes']:,} bytes, "
                f"val {i['n_val_files']} files / {i['val_bytes']:,} bytes), sha256 {i['sha256'][:16]}...")


# ----------------------------------------------------------------------------------------- file lists

def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, keep) -> list[CorpusFile]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if keep(d, is_dir=True)]
        for name in filenames:
            if keep(name, is_dir=False):
                p = Path(dirpath) / name
                if p.is_file():
                    out.append(CorpusFile(p, p.relative_to(root).as_posix()))
    out.sort(key=lambda f: f.rel)
    return out


def list_stdlib_files(root: Optional[Union[str, os.PathLike]] = None) -> list[CorpusFile]:
    """The ``.py`` files under ``root`` (default: the stdlib), minus excluded folders, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise CorpusError(f"standard library folder not found: {root}")
    return _walk(root, lambda name, is_dir: name not in EXCLUDED_DIRS if is_dir else name.endswith(".py"))


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def list_text_files(root: Union[str, os.PathLike]) -> list[CorpusFile]:
    """A directory's text files (recursive; hidden files/folders and files with NUL bytes skipped), sorted."""
    root = Path(root)
    files = _walk(root, lambda name, is_dir: not name.startswith("."))
    return [f for f in files if not _looks_binary(f.path)]


def split_files(n: int, val_fraction: float = VAL_FRACTION) -> list[bool]:
    """``is_val`` for each of ``n`` sorted files: ``max(1, round(val_fraction * n))`` evenly spaced files
    (none when ``n < 2``)."""
    if n < 2:
        return [False] * n
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val = {int((j + 0.5) * n / n_val) for j in range(n_val)}
    return [i in val for i in range(n)]


# ---------------------------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """``$HILT_CACHE_DIR``, else ``$XDG_CACHE_HOME/hilt``, else ``~/.cache/hilt``."""
    if os.environ.get("HILT_CACHE_DIR"):
        return Path(os.environ["HILT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hilt"


def _read_file(path: Path) -> bytes:
    """Every corpus read goes through here (tests count the calls to check the cache)."""
    with open(path, "rb") as f:
        return f.read()


def _fingerprint(source: str, files: list[CorpusFile], single_file: bool) -> str:
    """Cache key from names, sizes and mtimes only (no file content is read)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "source": source, "val_fraction": VAL_FRACTION,
                         "single_file": single_file}).encode())
    for f in files:
        st = f.path.stat()
        h.update(f"{f.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _build(files: list[CorpusFile], single_file: bool) -> tuple[bytes, bytes, dict]:
    """Read the files: (train bytes, val bytes, info). The sha256 covers every relative path and content."""
    h = hashlib.sha256()
    train, val = [], []
    n_train = n_val = 0
    total = 0
    is_val = split_files(len(files))
    for f, v in zip(files, is_val):
        data = _read_file(f.path)
        h.update(f.rel.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
        total += len(data)
        if data and not data.endswith(b"\n"):
            data += b"\n"
        if single_file:
            cut = len(data) - max(1, int(round(VAL_FRACTION * len(data)))) if len(data) > 1 else len(data)
            train.append(data[:cut])
            val.append(data[cut:])
            n_train = n_val = 1
        elif v:
            val.append(data)
            n_val += 1
        else:
            train.append(data)
            n_train += 1
    info = {"n_files": len(files), "n_train_files": n_train, "n_val_files": n_val, "bytes": total,
            "sha256": h.hexdigest()}
    return b"".join(train), b"".join(val), info


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_cache_entry(entry: Path, key: str, fmt: int) -> Optional[Corpus]:
    """The corpus stored in cache folder ``entry`` (``{train,val}.bin`` memory-mapped, ``meta.json``), or None
    when it is missing, incomplete, or holds another ``key`` / cache format ``fmt``."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != fmt or meta.get("key") != key:
        return None
    dt = np.dtype(meta["dtype"])
    arrays = []
    for split in ("train", "val"):
        p, n = entry / f"{split}.bin", meta[f"{split}_items"]
        if not p.is_file() or p.stat().st_size != n * dt.itemsize:
            return None
        arrays.append(np.memmap(p, dtype=dt, mode="r") if n else np.zeros(0, dtype=dt))
    return Corpus(arrays[0], arrays[1], dict(meta["info"], cache=str(entry), cached=True))


def store_corpus(entry: Path, key: str, fmt: int, train: np.ndarray, val: np.ndarray, info: dict,
                 use_cache: bool) -> Corpus:
    """The corpus of ``train`` / ``val`` (1-D arrays of one dtype), written atomically as cache folder ``entry``
    (temp folder + rename; a stale entry is replaced) and memory-mapped from it (``info["cached"]`` False:
    built this time); in memory when ``use_cache`` is off or the folder cannot be written (with a warning)."""
    if use_cache:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
            _fsync_write(tmp / "train.bin", train.tobytes())
            _fsync_write(tmp / "val.bin", val.tobytes())
            meta = {"format": fmt, "key": key, "dtype": train.dtype.name, "train_items": len(train),
                    "val_items": len(val), "info": info}
            _fsync_write(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
            try:
                os.replace(tmp, entry)
            except OSError:  # another process wrote the same entry first (or a stale one is there)
                import shutil
                if entry.exists():
                    stale = entry.with_name(f".{entry.name}.stale-{os.getpid()}")
                    try:
                        os.replace(entry, stale)
                        os.replace(tmp, entry)
                        shutil.rmtree(stale, ignore_errors=True)
                    except OSError:
                        shutil.rmtree(tmp, ignore_errors=True)
            corpus = read_cache_entry(entry, key, fmt)
            if corpus is not None:
                corpus.info["cached"] = False  # built this time
                return corpus
        except OSError as e:
            warnings.warn(f"hilt: cannot write the token cache under {entry.parent} ({e}); using memory only",
                          stacklevel=3)
    return Corpus(train, val, dict(info, cache=None, cached=False))


def load_corpus(data: Optional[Union[str, os.PathLike]] = None, *, use_cache: bool = True,
                cache: Optional[Union[str, os.PathLike]] = None,
                stdlib: Optional[Union[str, os.PathLike]] = None) -> Corpus:
    """The corpus as byte tokens, split into train/val.

    ``data``: None for the embedded default corpus (the stdlib's ``.py`` files, or those under
    ``stdlib`` — a fake root for tests), or a text file / a folder of text files. ``cache``: the cache
    folder (default :func:`cache_dir`). Raises :class:`CorpusError` for a missing path or an empty corpus.
    """
    single_file = False
    if data is None:
        root = Path(stdlib) if stdlib is not None else stdlib_dir()
        files = list_stdlib_files(root)
        source = f"stdlib {root} (python {'.'.join(map(str, __import__('sys').version_info[:3]))})"
        if not files:
            raise CorpusError(f"no .py files found under the standard library folder {root}")
    else:
        p = Path(data).expanduser()
        if not p.exists():
            raise CorpusError(f"--data path does not exist: {p}")
        p = p.resolve()
        if p.is_file():
            files = [CorpusFile(p, p.name)]
            single_file = True
            source = f"file {p}"
        elif p.is_dir():
            files = list_text_files(p)
            source = f"folder {p}"
            if not files:
                raise CorpusError(f"--data folder contains no text files: {p}")
        else:
            raise CorpusError(f"--data path is neither a file nor a folder: {p}")

    key = _fingerprint(source, files, single_file)
    entry = (Path(cache) if cache is not None else cache_dir()) / f"corpus-{key[:24]}"
    if use_cache:
        hit = read_cache_entry(entry, key, CACHE_FORMAT)
        if hit is not None:
            return hit

    train, val, info = _build(files, single_file)
    if info["bytes"] == 0:
        raise CorpusError(f"the corpus is empty (0 bytes in {len(files)} file(s)): {source}")
    if len(train) < 2:
        raise CorpusError(f"the corpus has too little training text ({len(train)} bytes): {source}")
    if len(val) < 2:
        raise CorpusError(f"the corpus has too little validation text ({len(val)} bytes): {source}")
    info.update(source=source, train_bytes=len(train), val_bytes=len(val))
    return store_corpus(entry, key, CACHE_FORMAT, np.frombuffer(train, dtype=np.uint8),
                        np.frombuffer(val, dtype=np.uint8), info, use_cache)


# --------------------------------------------------------------------------------------------- tokens

def encode(text: str) -> list[int]:
    """Byte-level tokens (UTF-8)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Bytes back to text (invalid UTF-8 replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


# -------------------------------------------------------------------------------------------- sampler

def _windows(data: np.ndarray, offsets: torch.Tensor, length: int) -> torch.Tensor:
    rows = np.stack([np.asarray(data[o:o + length]) for o in offsets.tolist()]) if len(offsets) else \
        np.zeros((0, length), dtype=np.uint8)
    return torch.from_numpy(rows.astype(np.int64))


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens -> ``(ids, targets)``, both ``(batch_size // world_size, seq_len)``.

    ``batch_size`` is the **global** batch (rows per micro-step summed over ranks). Every rank draws the
    same global offsets from its own ``torch.Generator(seed)`` and keeps rows
    ``[rank * b, (rank + 1) * b)`` with ``b = batch_size // world_size``. A split shorter than
    ``seq_len + 1`` gives shorter windows. ``state_dict``/``load_state_dict`` make it resumable.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu") -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if batch_size % world_size:
            raise ValueError(f"the global batch size ({batch_size}) must be divisible by the number of "
                             f"processes ({world_size})")
        if len(data) < 2:
            raise ValueError(f"need at least 2 tokens to sample from, got {len(data)}")
        self.data = data
        self.batch_size = batch_size
        self.window = min(seq_len + 1, len(data))
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch = batch_size // world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.randint(0, len(self.data) - self.window + 1, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        mine = offsets[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        x = _windows(self.data, mine, self.window)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        return x[:, :-1], x[:, 1:]

    __next__ = next_batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """JSON-serialisable state (the generator state as base64)."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "window": self.window,
                "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self.generator.set_state(torch.from_numpy(raw))
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, iters: Optional[int], *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: Union[str, torch.device] = "cpu"):
    """Validation batches, the same on every call: ``iters`` batches of random windows from a fresh
    generator seeded with ``seed``, or (``iters=None``) every non-overlapping window of the split once.
    Yields ``(ids, targets)`` for this rank's shard of each global batch."""
    window = min(seq_len + 1, len(data))
    local = batch_size // world_size
    device = torch.device(device)
    if iters is None:
        starts = torch.arange(0, max(len(data) - window, 0) + 1, window - 1)
        chunks = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    else:
        g = torch.Generator().manual_seed(seed)
        chunks = [torch.randint(0, len(data) - window + 1, (batch_size,), generator=g) for _ in range(iters)]
    for offsets in chunks:
        if len(offsets) < batch_size:  # the last partial batch of a sweep: share it out evenly
            per = -(-len(offsets) // world_size)
            mine = offsets[rank * per:(rank + 1) * per]
        else:
            mine = offsets[rank * local:(rank + 1) * local]
        x = _windows(data, mine, window).to(device)
        yield x[:, :-1], x[:, 1:]
