"""Corpus rules, the token cache, data errors, the batch sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hilt.training.data as hd
from hilt.training.data import BatchSampler, CorpusError, eval_batches, list_stdlib_files, load_corpus, split_files


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\n",
        "abc.py": "class ABC: pass\n",
        "json/__init__.py": "# json\n",
        "json/decoder.py": "def decode(): pass\n",
        "json/tests/test_x.py": "excluded\n",
        "test/test_os.py": "excluded\n",
        "idlelib/idle_test/t.py": "excluded\n",
        "idlelib/editor.py": "x = 1\n",
        "site-packages/pkg/mod.py": "excluded\n",
        "dist-packages/pkg/mod.py": "excluded\n",
        "lib2to3/tests/data/a.py": "excluded\n",
        "README.txt": "not python\n",
        "email/utils.py": "y = 2\n" * 20,
        "zz.py": "z = 3\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_stdlib_rules_on_a_fake_stdlib(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    rels = [f.rel for f in list_stdlib_files(root)]
    assert rels == sorted(rels)
    assert rels == ["abc.py", "email/utils.py", "idlelib/editor.py", "json/__init__.py", "json/decoder.py",
                    "os.py", "zz.py"]


def test_split_is_by_file_deterministic_and_about_5_percent():
    assert split_files(0) == [] and split_files(1) == [False]
    assert sum(split_files(2)) == 1 and sum(split_files(7)) == 1
    s = split_files(734)
    assert sum(s) == round(0.05 * 734) and s == split_files(734)
    idx = [i for i, v in enumerate(s) if v]
    gaps = np.diff(idx)
    assert gaps.min() >= 19 and gaps.max() <= 21  # evenly spread over the sorted files


def test_fake_stdlib_corpus_split_and_hash(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    c1 = load_corpus(stdlib=root, cache=tmp_path / "c1")
    c2 = load_corpus(stdlib=root, use_cache=False)
    assert c1.sha256 == c2.sha256 and len(c1.sha256) == 64
    assert c1.info["n_files"] == 7 and c1.info["n_val_files"] == 1 and c1.info["n_train_files"] == 6
    assert c1.info["bytes"] == sum(f.path.stat().st_size for f in list_stdlib_files(root))
    files = list_stdlib_files(root)
    val_file = [f for f, v in zip(files, split_files(len(files))) if v][0]
    assert bytes(c1.val) == val_file.path.read_bytes()  # whole files go to val
    train_text = bytes(c1.train)
    for f, v in zip(files, split_files(len(files))):
        if not v:
            assert f.path.read_bytes() in train_text
    assert b"excluded" not in train_text + bytes(c1.val)
    # content changes the hash
    (root / "zz.py").write_text("z = 4\n")
    assert load_corpus(stdlib=root, use_cache=False).sha256 != c1.sha256


def test_real_stdlib_corpus():
    c = load_corpus()
    assert c.info["bytes"] > 1_000_000 and c.info["n_files"] > 100
    assert len(c.train) > 0 and len(c.val) > 0 and c.train.dtype == np.uint8
    assert 0.02 < c.info["n_val_files"] / c.info["n_files"] < 0.08
    assert b"site-packages" not in c.info["source"].encode()
    assert all("/test/" not in "/" + f.rel for f in list_stdlib_files())


def test_token_cache_is_reused(tmp_path, text_dir, monkeypatch):
    reads = []
    real = hd._read_file
    monkeypatch.setattr(hd, "_read_file", lambda p: reads.append(p) or real(p))
    c1 = load_corpus(text_dir, cache=tmp_path / "cache")
    n = len(reads)
    assert n == 6 and not c1.info["cached"]
    c2 = load_corpus(text_dir, cache=tmp_path / "cache")
    assert len(reads) == n, "the second call read the corpus again"
    assert c2.info["cached"] and isinstance(c2.train, np.memmap)
    assert c2.sha256 == c1.sha256 and np.array_equal(c1.train, c2.train) and np.array_equal(c1.val, c2.val)
    sidecar = list((tmp_path / "cache").glob("corpus-*/meta.json"))
    assert len(sidecar) == 1 and c1.sha256 in sidecar[0].read_text()
    # editing a file invalidates the cache
    (text_dir / "doc00.txt").write_text("changed text, a different size\n" * 3)
    c3 = load_corpus(text_dir, cache=tmp_path / "cache")
    assert len(reads) == 2 * n and c3.sha256 != c1.sha256


def test_data_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no text files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "e.txt", use_cache=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\0\1\2" * 10)
    with pytest.raises(CorpusError, match="no text files"):
        load_corpus(tmp_path / "bin")


def test_single_file_is_split_by_bytes(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij\n" * 100)
    c = load_corpus(f, use_cache=False)
    assert c.info["n_files"] == 1 and len(c.val) == 55 and bytes(c.train) + bytes(c.val) == f.read_bytes()


def test_sampler_shifted_seeded_and_resumable():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    s = BatchSampler(data, 8, 16, seed=3)
    x, y = s.next_batch()
    assert x.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x + 1) % 256, y)
    state = s.state_dict()
    nxt = s.next_batch()
    s2 = BatchSampler(data, 8, 16, seed=99)
    s2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(nxt, s2.next_batch()))
    assert torch.equal(BatchSampler(data, 8, 16, seed=3).next_batch()[0], x)


def test_sampler_ranks_shard_the_global_batch():
    data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    full = [BatchSampler(data, 6, 10, seed=1).next_batch() for _ in range(1)][0]
    parts = [BatchSampler(data, 6, 10, seed=1, rank=r, world_size=3).next_batch() for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), full[1])
    with pytest.raises(ValueError, match="divisible"):
        BatchSampler(data, 5, 10, world_size=2)


def test_eval_batches_fixed_and_full_sweep():
    data = np.arange(100, dtype=np.uint8)
    a = [x for x, _ in eval_batches(data, 4, 9, 3, seed=5)]
    b = [x for x, _ in eval_batches(data, 4, 9, 3, seed=5)]
    assert all(torch.equal(i, j) for i, j in zip(a, b)) and len(a) == 3
    sweep = torch.cat([y for _, y in eval_batches(data, 4, 9, None)])
    # every target byte once (non-overlapping windows), except the tail that does not fill a window
    assert sweep.reshape(-1).tolist() == list(range(1, 1 + sweep.numel()))
    assert sweep.numel() > 90


def test_cache_entries_round_trip_and_unwritable_cache_falls_back(tmp_path):
    """store_corpus / read_cache_entry (shared by the byte and the tokenizer corpus): any dtype round-trips,
    another key or format is not read, and an unwritable cache folder warns and keeps the corpus in memory."""
    from hilt.training.data import read_cache_entry, store_corpus

    train, val = np.arange(1000, dtype=np.uint16), np.arange(7, dtype=np.uint16)
    c = store_corpus(tmp_path / "c" / "e", "k1", 5, train, val, {"x": 1}, use_cache=True)
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16 and not c.info["cached"]
    assert np.array_equal(c.train, train) and np.array_equal(c.val, val) and c.info["x"] == 1
    again = read_cache_entry(tmp_path / "c" / "e", "k1", 5)
    assert again.info["cached"] and np.array_equal(again.val, val)
    assert read_cache_entry(tmp_path / "c" / "e", "k2", 5) is None
    assert read_cache_entry(tmp_path / "c" / "e", "k1", 6) is None
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write the token cache"):
        m = store_corpus(tmp_path / "file" / "e", "k1", 5, train, val, {}, use_cache=True)
    assert m.info["cache"] is None and not m.info["cached"] and np.array_equal(m.train, train)
