"""LFormer (token-wise taps with the blend, sequence-wise taps), Llama (grouped-query heads) and NPT
(NP layers in NPT and standard mode), HILT: cached logits equal the full forward's at every step, also
past the context; greedy tokens equal the recompute path's; ``hilt generate`` uses the cache for every
model type and prints the same text without it."""
from __future__ import annotations

import pytest
import torch

from hilt.generate import generate, supports_cache
from hilt.models import GPT, BlockHierarchicalLM, GPTConfig, npt

from .helpers import block_model, check_every_step, gpt_model, hilt_model, lformer_model, llama_model

BUILDERS = {
    "lformer-token-ema": lambda: lformer_model("token", "ema", tree_checkpoint=2),
    "lformer-token-gru": lambda: lformer_model("token", "gru"),
    "lformer-token-attn": lambda: lformer_model("token", "attn"),
    "lformer-sequence": lambda: lformer_model("sequence", "ema"),
    "llama": lambda: llama_model(),
    "npt": lambda: llama_model(npt=True),
    "hilt": lambda: hilt_model("rope"),
    "hilt-learned": lambda: hilt_model("learned"),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_cached_logits_equal_full_forward_every_step(name):
    m = BUILDERS[name]()
    assert supports_cache(m)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    check_every_step(m, ids, 5)  # 30 > max_seq_len 24: the window slides (cache rebuilt)
    check_every_step(m, ids[:, :20], 1)


def test_lformer_blend_and_npt_modulation_matter():
    """The paths the cache must reproduce are not no-ops: the blend moves the logits, so do NP layers
    (by far more than the 1e-5 tolerance of the cached-vs-full comparisons)."""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    m = lformer_model("token")
    with torch.no_grad():
        blended = m(ids).logits
        m.blend_gate.zero_()
        assert (blended - m(ids).logits).abs().max() > 1e-3
    n = llama_model(npt=True)
    with torch.no_grad():
        modulated = n(ids).logits
        with npt.standard_mode(n):
            standard = n(ids).logits
            check_every_step(n, ids, 3)  # the cached path follows the layers' mode
        assert (modulated - standard).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["lformer-token-ema", "lformer-sequence", "llama", "npt"])
def test_greedy_same_tokens_with_and_without_cache(name):
    m = BUILDERS[name]()
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    a = generate(m, prompt, 30, temperature=0, use_cache=True)
    b = generate(m, prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 36) and torch.equal(a, b)


def test_a_model_without_a_cache_falls_back_to_recompute():
    class Doubled(GPT):  # its own forward: GPT's cached path would not reproduce it
        def forward(self, ids, targets=None, key_padding_mask=None):
            out = super().forward(ids)
            out.logits = 2 * out.logits
            return out

    torch.manual_seed(0)
    m = Doubled(GPTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.0))
    assert not supports_cache(m)
    assert generate(m, [1, 2, 3], 20, temperature=0).shape == (23,)
    with pytest.raises(ValueError, match="no KV-cache"):
        generate(m, [1, 2, 3], 2, use_cache=True)


CLI_MODELS = {"gpt": lambda: gpt_model("learned"), "hilt": lambda: hilt_model("rope"),
              "block": lambda: block_model("rope", 4, max_seq_len=24), "lformer": lambda: lformer_model("token"),
              "llama": lambda: llama_model()}


@pytest.mark.parametrize("kind", list(CLI_MODELS))
def test_cli_generate_uses_the_cache_for_every_model(kind, tmp_path, capsys, monkeypatch):
    from hilt.checkpoint import save_checkpoint
    from hilt.cli import main as cli_main

    m = CLI_MODELS[kind]()
    save_checkpoint(tmp_path / "ckpt", m)
    cls = type(m)
    steps = []
    orig = cls.forward_step

    def counting(self, ids, cache, *a, **k):
        steps.append(ids.shape[1])
        return orig(self, ids, cache, *a, **k)

    monkeypatch.setattr(cls, "forward_step", counting)
    texts = []
    for extra in ([], ["--no-kv-cache"]):
        rc = cli_main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "def f(x):", "--max-new-tokens",
                       "30", "--temperature", "0", "--device", "cpu", "--threads", "1", *extra])
        assert rc == 0
        texts.append(capsys.readouterr().out)
        if not extra:  # the cached run: a prefill, then one step per token (9 + 30 tokens: the window slides)
            assert len(steps) == 30 and steps[0] == 9 and steps.count(1) >= 15
            n_cached = len(steps)
    assert len(steps) == n_cached  # --no-kv-cache never steps
    assert texts[0] == texts[1] and texts[0].startswith("def f(x):")
