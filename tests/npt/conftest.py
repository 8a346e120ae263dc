"""NPT tests: one thread, a private token cache, tiny Llama models."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_private_cache(tmp_path_factory, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HILT_CACHE_DIR", str(tmp_path_factory.mktemp("hilt_cache")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    for i in range(6):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(60))
        (root / f"doc{i:02d}.txt").write_text(body)
    return root
