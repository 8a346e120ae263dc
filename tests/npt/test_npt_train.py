"""`hilt npt-train`: a tiny smoke run through the CLI, errors, data sharding, the loss going down."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from hilt.training.checkpoint import save_checkpoint
from hilt.cli import main
from hilt.training.data import load_corpus
from hilt.models import GPT, GPTConfig, convert_to_npt, freeze_base
from hilt.models import npt as N
from hilt.training.npt import NPTTrainConfig, make_sampler, npt_loss, parse_curriculum
from hilt.training.distributed import Dist

from .helpers import rand_ids, tiny_llama


@pytest.fixture
def base_ckpt(tmp_path, text_dir):
    m = tiny_llama()
    return save_checkpoint(tmp_path / "base", m, step=1, train_config={"data": str(text_dir)})


def test_npt_train_smoke(tmp_path, base_ckpt, capsys):
    out = tmp_path / "npt"
    rc = main(["npt-train", "--ckpt", str(base_ckpt), "--layers", "2-3", "--np-rank", "8", "--num-ranks", "2",
               "--curriculum", "teacher:2,mixed:2:0.25:0.5,student:2", "--layer-weights", "linear",
               "--batch-size", "2", "--seq-len", "16", "--eval-iters", "1", "--eval-every", "3", "--threads", "1",
               "--no-progress", "--out", str(out), "--lr", "1e-2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "before: KL(teacher||student)" in text and "after:" in text and "val bits/byte student" in text
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["stage"] for r in rows] == ["teacher"] * 2 + ["mixed"] * 2 + ["student"] * 2
    assert [(float(r["attn_ratio"]), float(r["mlp_ratio"])) for r in rows] == \
        [(0, 0)] * 2 + [(0.25, 0.5)] * 2 + [(1, 1)] * 2
    for i in (2, 3):
        for col in ("direct", "v_a_norm", "v_b_norm", "v_a_attn_cos", "v_a_attn_cos_r0", "v_a_attn_cos_r1"):
            assert rows[-1][f"layer{i}_{col}"] != ""
        assert float(rows[-1][f"layer{i}_v_a_attn_cos_r1"]) != 0.0
    assert [r["val_kl"] != "" for r in rows] == [False, False, True, False, False, True]
    summary = json.loads((out / "summary.json").read_text())
    for k in ("kl", "agreement", "teacher_bpb", "student_bpb"):
        assert k in summary["before"] and k in summary["after"]
    assert summary["before"]["teacher_bpb"] == pytest.approx(summary["after"]["teacher_bpb"])  # base frozen
    # the NP weights load onto the base checkpoint again
    model = N.load_npt(out / "np_weights.safetensors")
    assert N.npt_layers(model) == [2, 3]
    assert N.read_np_metadata(out / "np_weights.safetensors")["step"] == 6


def test_npt_train_errors(tmp_path, base_ckpt, text_dir, capsys):
    rc = main(["npt-train", "--ckpt", str(base_ckpt), "--curriculum", "teacher:2,mixd:3", "--no-progress"])
    assert rc == 1 and "curriculum part 2 'mixd:3': unknown stage 'mixd'" in capsys.readouterr().err
    rc = main(["npt-train", "--ckpt", str(base_ckpt), "--layers", "4-9", "--curriculum", "teacher:1",
               "--no-progress", "--out", str(tmp_path / "x")])
    assert rc == 1 and "out of range (valid layers are 0..3)" in capsys.readouterr().err
    rc = main(["npt-train", "--ckpt", str(base_ckpt), "--layers", "all", "--layer-weights", "1,2",
               "--curriculum", "teacher:1", "--no-progress", "--out", str(tmp_path / "y")])
    assert rc == 1 and "4 comma-separated numbers" in capsys.readouterr().err
    gpt = save_checkpoint(tmp_path / "gpt", GPT(GPTConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=16)))
    rc = main(["npt-train", "--ckpt", str(gpt), "--curriculum", "teacher:1", "--no-progress"])
    assert rc == 1 and "needs a Llama checkpoint" in capsys.readouterr().err


def test_ranks_read_disjoint_shards_of_each_global_batch(text_dir):
    corpus = load_corpus(str(text_dir))
    cfg = NPTTrainConfig(ckpt="x", batch_size=4, seed=5)
    single = make_sampler(corpus.train, cfg, 16, Dist(), "cpu")
    shards = [make_sampler(corpus.train, cfg, 16, Dist(rank=r, world_size=2, enabled=True), "cpu") for r in (0, 1)]
    for _ in range(3):
        ids, _ = single.next_batch()
        parts = [s.next_batch()[0] for s in shards]
        assert all(p.shape == (2, 16) for p in parts)
        assert torch.equal(torch.cat(parts), ids)  # each row read by exactly one rank


def test_scaffolded_training_lowers_the_loss():
    m = tiny_llama(init_std=0.2)  # the scale of a trained model's hidden states, not of a 0.02 init
    convert_to_npt(m, "2-3", np_rank=16, num_ranks=2)
    freeze_base(m)
    opt = torch.optim.Adam(N.np_parameters(m), lr=1e-2)
    cfg = NPTTrainConfig(ckpt="x", reg_weight=1e-4)
    ids = rand_ids(4, 32)
    stages = parse_curriculum("teacher:15,student:15")
    losses = []
    for step in range(30):
        st = next(s for s in stages if step < s.end)
        loss, parts = npt_loss(N.scaffolded_forward(m, ids, st.attn_ratio, st.mlp_ratio), [1.0, 1.0], cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((parts["direct"].item(), parts["kl"].item()))
    assert losses[14][0] < 0.7 * losses[0][0]  # direct loss in the teacher stage
    assert losses[-1][1] < losses[15][1]        # KL in the student stage


def test_hilt_train_llama_then_eval_and_generate(tmp_path, text_dir, capsys):
    out = tmp_path / "llama"
    assert main(["train", "--model", "llama", "--data", str(text_dir), "--out", str(out), "--max-steps", "2",
                 "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "32", "--batch-size", "2",
                 "--eval-iters", "1", "--threads", "1", "--no-progress", "--no-plot", "--sample-tokens", "4",
                 "--grad-checkpoint"]) == 0
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    assert st["model_type"] == "llama" and st["config"]["pos_encoding"] == "rope"
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out / "checkpoint"), "--eval-iters", "1", "--batch-size", "2"]) == 0
    assert "llama, step 2" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(out / "checkpoint"), "--prompt", "def ", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
