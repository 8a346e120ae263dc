"""``hilt ablate``: matched parameter counts, a tiny smoke run through the CLI (table, PNG, finite numbers)."""
from __future__ import annotations

import json
import math


from hilt.training.ablate import ABLATION_MODELS, count_parameters, matched_model_configs
from hilt.cli import main as cli_main


def test_parameter_counts_are_matched_within_10_percent():
    configs, counts, target = matched_model_configs(ABLATION_MODELS, 48, 2, 64)
    assert counts["gpt"] == target == count_parameters("gpt", configs["gpt"])
    for m in ABLATION_MODELS:
        assert abs(counts[m] - target) / target < 0.10, (m, counts[m], target)
    assert configs["lformer"]["blend_into_lm"] and configs["lformer"]["tap_mode"] == "token"
    assert configs["lformer"]["n_tools"] == 0 and not configs["lformer"]["value_head"]  # a plain LM
    assert configs["hilt"]["ilt_layers"] > 0


def test_ablate_smoke_through_the_cli(tmp_path, text_dir, capsys):
    out = tmp_path / "abl"
    rc = cli_main(["ablate", "--models", "gpt,hilt,block,lformer", "--steps", "2", "--d-model", "32",
                   "--n-layers", "2", "--seq-len", "32", "--batch-size", "4", "--eval-every", "1",
                   "--eval-iters", "1", "--seeds", "2", "--data", str(text_dir), "--out", str(out),
                   "--threads", "1", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "ablation.md") in printed and str(out / "val_curves.png") in printed
    assert "34,688" in printed  # the GPT count is printed
    table = (out / "ablation.md").read_text()
    assert (out / "val_curves.png").stat().st_size > 1000
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == list(ABLATION_MODELS)
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 8  # 4 models x 2 seeds
    for row in results["rows"]:
        assert math.isfinite(row["val_bpb_mean"]) and math.isfinite(row["val_bpb_std"])
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert abs(row["params_vs_gpt"]) < 0.10
    for run in results["runs"]:
        assert [s for s, _ in run["curve"]] == [1, 2]


def test_ablate_rejects_unknown_models(tmp_path, capsys):
    assert cli_main(["ablate", "--models", "gpt,nope", "--out", str(tmp_path / "x")]) == 1
    assert "nope" in capsys.readouterr().err
