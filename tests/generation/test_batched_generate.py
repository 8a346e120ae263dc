"""Batched prompts of different lengths (a list of lists, or ids + a padding mask) and per-row eos_id,
for every cached model: each prompt's result equals its result generated alone (greedy, fp32)."""
from __future__ import annotations

import pytest
import torch

from hilt.generate import generate

from .helpers import block_model, gpt_model, hilt_model, lformer_model, llama_model

MODELS = {
    "gpt": lambda: gpt_model("learned"),
    "hilt": lambda: hilt_model("rope"),
    "block-rope": lambda: block_model("rope", 4, max_seq_len=24),
    "block-learned": lambda: block_model("learned", 8, max_seq_len=24),
    "lformer": lambda: lformer_model("token"),
    "llama": lambda: llama_model(npt=True),
}


def _prompts():
    g = torch.Generator().manual_seed(7)
    # lengths 3 (< a block), 4 and 8 (block boundaries), 11, and a second 4 (batched with the first)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 4, 11, 8, 4)]


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_prompts_equal_one_at_a_time(name):
    m = MODELS[name]()
    prompts = _prompts()
    out = generate(m, prompts, 18, temperature=0)  # 11 + 18 > 24: the longest slides
    assert isinstance(out, list) and len(out) == len(prompts)
    for p, o in zip(prompts, out):
        alone = generate(m, p, 18, temperature=0)
        assert o.tolist() == alone.tolist() and o[:len(p)].tolist() == p
    # the same prompts padded into one tensor (left and right padding mixed), with a padding mask
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), 99, dtype=torch.long)
    mask = torch.ones(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        s = 0 if i % 2 else T - len(p)
        ids[i, s:s + len(p)] = torch.tensor(p)
        mask[i, s:s + len(p)] = False
    padded = generate(m, ids, 18, temperature=0, padding_mask=mask)
    assert [o.tolist() for o in padded] == [o.tolist() for o in out]
    # recompute path: the same tokens
    assert [o.tolist() for o in generate(m, prompts, 18, temperature=0, use_cache=False)] == \
        [o.tolist() for o in out]


@pytest.mark.parametrize("name", ["gpt", "block-rope"])
def test_eos_stops_each_row_by_itself(name):
    m = MODELS[name]()
    prompts = _prompts()
    free = [o.tolist() for o in generate(m, prompts, 12, temperature=0)]
    # the eos: a token row 2 emits at its 3rd new step (other rows may stop earlier, or not at all)
    eos = free[2][len(prompts[2]) + 2]
    out = generate(m, prompts, 12, temperature=0, eos_id=eos)
    for p, f, o in zip(prompts, free, out):
        new = f[len(p):]
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert o.tolist() == p + new[:stop]
    assert len(out[2]) <= len(prompts[2]) + 3  # row 2 stopped early
    # a (B, T) batch: finished rows are filled with eos_id, the length is the longest row's
    batch = torch.tensor([prompts[1], prompts[4]])
    res = generate(m, batch, 12, temperature=0, eos_id=eos)
    for i, row in enumerate(res.tolist()):
        alone = generate(m, prompts[1 + 3 * i], 12, temperature=0, eos_id=eos).tolist()
        assert row[:len(alone)] == alone and all(t == eos for t in row[len(alone):])
    # 1-D: the output ends at the eos
    one = generate(m, prompts[2], 12, temperature=0, eos_id=eos)
    assert one.tolist() == out[2].tolist()


def test_bad_batched_inputs_are_refused():
    m = MODELS["gpt"]()
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="padding_mask"):
        generate(m, torch.zeros(2, 3, dtype=torch.long), 3, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        generate(m, [1, 2, 3], 3, padding_mask=torch.zeros(1, 3, dtype=torch.bool))
