"""Cached decoding steps refuse bad calls with errors naming what was expected (hilt.models.output.check_step,
shared by GPT/HILT, LFormer with token-wise taps and Llama)."""
from __future__ import annotations

import pytest
import torch

from .helpers import gpt_model, lformer_model, llama_model

BUILDERS = {"gpt": gpt_model, "lformer": lambda: lformer_model(tap_mode="token"), "llama": llama_model}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_step_rejects_bad_batch_and_start_pos(name):
    m = BUILDERS[name]().eval()
    cache = m.init_cache(2)
    ids = torch.randint(0, m.config.vocab_size, (2, 3))
    with torch.no_grad():
        m.forward_step(ids, cache)
        assert cache.length == 3
        with pytest.raises(ValueError, match="ids has batch 1, the cache was built for 2"):
            m.forward_step(ids[:1], cache)
        with pytest.raises(ValueError, match=r"start_pos must be in \[0, cache.length=3\], got 5"):
            m.forward_step(ids, cache, start_pos=5)
        with pytest.raises(ValueError, match="exceed the cache length"):
            m.forward_step(torch.randint(0, m.config.vocab_size, (2, cache.max_len - 1)), cache)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_init_cache_checks_max_len(name):
    m = BUILDERS[name]()
    L = m.config.max_seq_len
    for bad in (0, L + 1):
        with pytest.raises(ValueError, match=rf"max_len must be in \[1, max_seq_len={L}\], got {bad}"):
            m.init_cache(1, max_len=bad)
    c = m.init_cache(3, max_len=5, dtype=torch.float64)
    assert c.max_len == 5 and c.batch_size == 3 and c.k[0].dtype == torch.float64 and len(c.k) == len(m.layers)
    assert m.init_cache(1).max_len == L
