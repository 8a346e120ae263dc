"""Shared fixtures of the training tests: one thread, a private token cache, a tiny text folder, tiny configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .train_helpers import make_text_folder



@pytest.fixture(autouse=True)
def _one_thread_and_private_cache(tmp_path_factory, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HILT_CACHE_DIR", str(tmp_path_factory.mktemp("hilt_cache")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for subprocesses
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_dir(tmp_path) -> Path:
    return make_text_folder(tmp_path / "text")
