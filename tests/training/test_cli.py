"""The `hilt` CLI: train / eval / generate / info smoke runs, --help, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hilt.cli import main
from hilt.training.cli import build_parser

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "32", "--ilt-dim", "16",
        "--batch-size", "4", "--eval-iters", "2", "--no-progress", "--seed", "0", "--threads", "1"]


def test_train_eval_generate_smoke(tmp_path, text_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_dir), "--out", str(out), "--max-steps", "3",
                 "--sample-tokens", "8", *TINY]) == 0
    text = capsys.readouterr().out
    assert "val bits/byte" in text and str(out / "checkpoint") in text
    for name in ("metrics.csv", "loss.png", "sample.txt", "train_config.json", "corpus.json", "checkpoint"):
        assert (out / name).exists(), name
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model"] == "hilt" and saved["model_config"]["d_model"] == 32

    assert main(["eval", "--ckpt", str(out / "checkpoint"), "--eval-iters", "2", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "bits/byte" in text and "hilt, step 3" in text

    assert main(["generate", "--ckpt", str(out / "checkpoint"), "--prompt", "def f", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f") and len(text.encode()) >= len("def f") + 1
    alone = text

    # several prompts (repeated --prompt and a file): one batch, each output equal to its prompt run alone
    (tmp_path / "prompts.txt").write_text("class A:\n\nimport os\n")
    assert main(["generate", "--ckpt", str(out / "checkpoint"), "--prompt", "def f", "--prompt", "x = 1",
                 "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    parts = text.split("=== ")[1:]
    assert [p.split(" ===\n", 1)[0] for p in parts] == ["1", "2", "3", "4"]
    bodies = [p.split(" ===\n", 1)[1] for p in parts]
    assert bodies[0] == alone
    for body, prompt in zip(bodies, ["def f", "x = 1", "class A:", "import os"]):
        assert body.startswith(prompt)
        main(["generate", "--ckpt", str(out / "checkpoint"), "--prompt", prompt, "--max-new-tokens", "5",
              "--temperature", "0"])
        assert capsys.readouterr().out == body
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(out / "checkpoint"), "--prompt-file", str(tmp_path / "missing.txt")])
    assert "--prompt-file: cannot read" in capsys.readouterr().err


def test_config_file_and_flags(tmp_path, text_dir, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "gpt", "max_steps": 2, "model_config": {"d_model": 32, "n_layers": 1,
                                                                              "n_heads": 2, "max_seq_len": 32}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(text_dir), "--out", str(out), "--batch-size", "4",
                 "--eval-iters", "1", "--no-progress", "--sample-tokens", "0", "--no-plot"]) == 0
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    assert st["model_type"] == "gpt" and st["config"]["n_layers"] == 1 and st["step"] == 2
    # a model config (a checkpoint's config.json) works as --config too
    out2 = tmp_path / "run2"
    assert main(["train", "--config", str(out / "checkpoint" / "config.json"), "--data", str(text_dir),
                 "--out", str(out2), "--max-steps", "1", "--batch-size", "4", "--eval-iters", "1",
                 "--no-progress", "--sample-tokens", "0", "--no-plot"]) == 0
    assert json.loads((out2 / "checkpoint" / "state.json").read_text())["config"]["n_layers"] == 1


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--max-steps", "1", "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--max-steps", "1", "--no-progress"]) == 1
    assert "no text files" in capsys.readouterr().err
    assert main(["train", "--model", "gpt", "--block-size", "4", "--max-steps", "1"]) == 1
    assert "--block-size does not apply to --model gpt" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "nope")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_every_flag_has_help(capsys):
    p = build_parser()
    for action in p._actions:
        assert action.help, f"{action.option_strings} has no help"
    for cmd in ("train", "eval", "generate", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: hilt " + cmd in capsys.readouterr().out


def test_console_script_and_python_m(tmp_path, text_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "hilt.train", "--data", str(text_dir), "--out", str(tmp_path / "r"),
                        "--max-steps", "2", "--sample-tokens", "0", "--no-plot", *TINY],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").exists()
    exe = os.path.join(os.path.dirname(sys.executable), "hilt")
    if os.path.exists(exe):
        r = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and "--ckpt" in r.stdout
