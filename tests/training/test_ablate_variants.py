"""``hilt ablate --models`` variants: parsing (good and bad strings, nested commas), overrides checked
against the config classes, --match flops within 10% of GPT's FLOPs, a CLI smoke run with a variant,
--resume."""
from __future__ import annotations

import json

import pytest

from hilt.training.ablate import ABLATION_MODELS, count_flops, count_parameters, size_entries
from hilt.cli import main as cli_main
from hilt.training.variants import Variant, parse_value, parse_variants, run_dir_name, split_top_level

M = ABLATION_MODELS


def test_parse_the_issue_example():
    vs = parse_variants("gpt,hilt,hilt[ilt_scale_start=1,ilt_scale_end=1],block[block_size=16]", M)
    assert [v.label for v in vs] == ["gpt", "hilt", "hilt[ilt_scale_start=1,ilt_scale_end=1]",
                                     "block[block_size=16]"]
    assert [v.model for v in vs] == ["gpt", "hilt", "hilt", "block"]
    assert vs[2].overrides == (("ilt_scale_start", 1), ("ilt_scale_end", 1))
    assert vs[3].override_dict == {"block_size": 16}
    assert len({v.dir_name for v in vs}) == 4
    assert vs[2].dir_name == "hilt-ilt_scale_start=1-ilt_scale_end=1"


def test_parse_values_whitespace_and_nested_commas():
    (v,) = parse_variants(" lformer[ aggregator = gru , alpha_init=0.2, detach_taps=true, min_lr=none] ", M)
    assert v.override_dict == {"aggregator": "gru", "alpha_init": 0.2, "detach_taps": True, "min_lr": None}
    assert v.label == "lformer[aggregator=gru,alpha_init=0.2,detach_taps=true,min_lr=none]"
    # commas nested inside a JSON value stay in the entry
    a, b = parse_variants('hilt[x=[1,2],y={"a":1,"b":2}],gpt', M)
    assert a.override_dict == {"x": [1, 2], "y": {"a": 1, "b": 2}} and b == Variant("gpt", (), "gpt")
    assert split_top_level('a[b,c],d(e,f),"g,h",i') == ["a[b,c]", "d(e,f)", '"g,h"', "i"]
    assert [parse_value(s) for s in ("3", "-2", "1e-3", "0.5", "False", "NULL", "abc", '"7"')] == \
        [3, -2, 1e-3, 0.5, False, None, "abc", "7"]


@pytest.mark.parametrize("text, message", [
    ("gpt,,hilt", "empty --models entry"),
    ("gpt,", "empty --models entry"),
    ("gpt,nope", "unknown model 'nope'"),
    ("hilt[ilt_dim=8", "unclosed '\\['"),
    ("hilt]", "unbalanced"),
    ("hilt[ilt_dim=8]x", "after the closing"),
    ("hilt[ilt_dim=8][ilt_layers=1]", "unbalanced"),
    ("hilt[ilt_dim]", "not field=value"),
    ("hilt[=3]", "not a field name"),
    ("hilt[ilt_dim=]", "empty value"),
    ("hilt[]", "empty brackets"),
    ("hilt[ilt_dim=8,ilt_dim=16]", "given twice"),
    ("hilt,hilt", "twice"),
    ("block_size=16", "in brackets"),
    ("hilt[x=[1,2]", "unclosed"),
    ("hilt[x={bad]", "unbalanced"),
    ('hilt[x="abc]', "unterminated quote"),
    ("block[block_size=a/b],block[block_size=a_b]", "share the run folder"),
])
def test_bad_strings_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(text, M)


def test_run_dir_names_are_safe():
    assert run_dir_name("block[block_size=16]") == "block-block_size=16"
    assert run_dir_name('lformer[aggregator="gru x/y"]') == "lformer-aggregator=_gru_x_y_"


@pytest.mark.parametrize("models, match, message", [
    ("hilt[ilt_dimm=8]", "params", "unknown field 'ilt_dimm'"),
    ("block[ilt_dim=8]", "params", "unknown field 'ilt_dim'"),  # a HILT field on a block model
    ("hilt[ilt_heads=0]", "params", "ilt_heads must be >= 1"),  # the config's own validation
    ("block[block_size=0]", "flops", "block_size must be >= 1"),
    ("hilt[d_model=64]", "params", "d_model cannot be overridden with --match params"),
    ("block[d_ff=64]", "flops", "d_ff cannot be overridden with --match flops"),
    ("hilt[seed=3]", "params", "'seed' cannot be set per entry"),
    ("gpt[n_layers=zero]", "none", "n_layers must be an int"),
])
def test_bad_overrides_name_the_field(models, match, message):
    with pytest.raises(ValueError, match=message):
        size_entries(parse_variants(models, M), 48, 2, 64, match)


def test_match_none_takes_the_overrides_as_given():
    (e,) = size_entries(parse_variants("hilt[d_model=64,d_ff=100,ilt_dim=32]", M), 48, 2, 64, "none")[0]
    assert (e.config["d_model"], e.config["d_ff"], e.config["ilt_dim"]) == (64, 100, 32)
    assert e.params == count_parameters("hilt", e.config)


def test_overrides_apply_before_matching():
    entries, target = size_entries(parse_variants("block,block[block_size=16,n_global_layers=1]", M), 64, 2, 128)
    plain, variant = entries
    assert variant.config["block_size"] == 16 and variant.config["n_global_layers"] == 1
    assert variant.config["d_model"] != plain.config["d_model"] or variant.config["d_ff"] != plain.config["d_ff"]
    for e in entries:
        assert abs(e.params - target["params"]) / target["params"] < 0.10


def test_match_flops_within_10_percent():
    models = "gpt,hilt,block,lformer,hilt[ilt_scale_start=1,ilt_scale_end=1],block[block_size=16]"
    entries, target = size_entries(parse_variants(models, M), 64, 2, 128, "flops")
    gpt = entries[0]
    assert gpt.flops == target["flops"] == count_flops("gpt", gpt.config, 128)
    for e in entries:
        assert e.flops == count_flops(e.model, e.config, 128)
        assert abs(e.flops - target["flops"]) / target["flops"] < 0.10, (e.label, e.flops, target)
    by = {e.label: e for e in entries}
    # the block model is cheaper per parameter at this context, so matching FLOPs makes it bigger
    assert by["block"].params > gpt.params
    assert by["hilt[ilt_scale_start=1,ilt_scale_end=1]"].train_overrides == {"ilt_scale_start": 1,
                                                                             "ilt_scale_end": 1}


def test_smoke_ablation_with_a_variant_through_the_cli(tmp_path, text_dir, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--models", "gpt,hilt[ilt_scale_start=1,ilt_scale_end=1,lr=0.001],block[block_size=4]",
            "--match", "flops", "--steps", "2", "--d-model", "32", "--n-layers", "2", "--seq-len", "32",
            "--batch-size", "4", "--eval-every", "1", "--eval-iters", "1", "--seeds", "1", "--data", str(text_dir),
            "--out", str(out), "--threads", "1", "--device", "cpu"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "FLOPs/token" in printed
    labels = ["gpt", "hilt[ilt_scale_start=1,ilt_scale_end=1,lr=0.001]", "block[block_size=4]"]
    table = (out / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == labels
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == labels
    for row in results["rows"]:
        assert abs(row["flops_vs_gpt"]) < 0.10 and row["flops_per_token"] > 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["block-block_size=4-seed0", "gpt-seed0", "hilt-ilt_scale_start=1-ilt_scale_end=1-lr=0.001-seed0"]
    # the variant's training overrides reached its run: a fixed ILT scale of 1 and its own lr
    hilt_dir = out / dirs[2]
    tc = json.loads((hilt_dir / "train_config.json").read_text())
    assert (tc["ilt_scale_start"], tc["ilt_scale_end"], tc["lr"]) == (1, 1, 0.001)
    csv = (hilt_dir / "metrics.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert {float(line.split(",")[head.index("ilt_scale")]) for line in csv[1:]} == {1.0}
    block_tc = json.loads((out / dirs[0] / "train_config.json").read_text())
    assert block_tc["model_config"]["block_size"] == 4 and block_tc["ilt_scale_start"] == 0.01

    # --resume: nothing is trained again, the table is rebuilt from the finished runs
    stamps = {d: (out / d / "metrics.csv").stat().st_mtime_ns for d in dirs}
    assert cli_main(args + ["--resume"]) == 0
    assert "finished before" in capsys.readouterr().out
    assert {d: (out / d / "metrics.csv").stat().st_mtime_ns for d in dirs} == stamps
    again = json.loads((out / "results.json").read_text())
    assert [r["val_bpb"] for r in again["runs"]] == [r["val_bpb"] for r in results["runs"]]
    # --report-only: tables what finished, trains nothing
    (out / "gpt-seed0" / "ablate_run.json").unlink()
    assert cli_main(args + ["--report-only"]) == 0
    assert "gpt seed 0: not finished" in capsys.readouterr().out
    assert {d: (out / d / "metrics.csv").stat().st_mtime_ns for d in dirs} == stamps
    report = json.loads((out / "results.json").read_text())
    assert [r["n_seeds"] for r in report["rows"]] == [0, 1, 1] and len(report["runs"]) == 2
    assert "| gpt | " in (out / "ablation.md").read_text() and "| not run | 0 |" in (out / "ablation.md").read_text()
    # a finished run with other settings is not silently reused
    changed = list(args)
    changed[changed.index("--steps") + 1] = "3"
    assert cli_main(changed + ["--resume"]) == 1
    assert "other settings (max_steps" in capsys.readouterr().err


def test_cli_rejects_a_bad_variant(tmp_path, capsys):
    assert cli_main(["ablate", "--models", "gpt,block[blocksize=4]", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "blocksize" in err and "block[blocksize=4]" in err


def test_resume_lock_claims_a_run_once_and_takes_over_stale_locks(tmp_path):
    import subprocess
    import sys

    from hilt.training.ablate import _claim

    run = tmp_path / "gpt-seed0"
    lock = _claim(run)
    assert lock == tmp_path / "gpt-seed0.lock" and lock.read_text() == str(__import__("os").getpid())
    assert _claim(run) is None  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # a process that has exited
    assert _claim(run) == lock and lock.read_text() == str(__import__("os").getpid())
