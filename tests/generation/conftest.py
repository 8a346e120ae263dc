"""Generation tests: one thread (tiny models), a private token cache for the CLI test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(tmp_path_factory, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("HILT_CACHE_DIR", str(tmp_path_factory.mktemp("hilt_cache")))
    yield
    torch.set_num_threads(n)
