"""`deltafit compare`: per-method recipes, the table (terminal, compare.md, compare.json), the charts,
reuse of finished runs, resuming an interrupted one, per-method overrides and bad input.

Most tests train in this process (`_train_process` replaced by the child's own function, called
directly) to stay fast; `test_real_training_processes` goes through the real subprocess path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltafit import compare as compare_mod

from helpers import assert_one_clean_line, run_cli, write_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


@pytest.fixture()
def in_process(monkeypatch):
    """Train each method in this process; returns the list of (method, mode) trainings started."""
    started = []

    def train(plan, mode):
        started.append((plan.method, mode))
        (plan.out / compare_mod.LOG_FILE).touch()
        return compare_mod._child(str(plan.out / compare_mod.RECIPE_FILE), str(plan.out), mode), None

    monkeypatch.setattr(compare_mod, "_train_process", train)
    return started


@pytest.fixture()
def cls_recipe(tmp_path, tiny_bert, cls_file) -> Path:
    return write_recipe(tmp_path / "cls.yaml", tiny_bert,
                        {"train": str(cls_file), "eval": str(cls_file), "format": "classification",
                         "text_column": "sentence", "max_length": 32},
                        delta={"method": "lora", "r": 2, "alpha": 4}, task="seq-cls", train={"max_steps": 2})


def test_table_markdown_json_plots_and_per_method_override(tmp_path, cls_recipe, in_process, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", cls_recipe, "--methods", "lora,ia3", "--set", "ia3:train.lr=0.05",
                                "--set", "train.seed=3", "-o", out)
    assert code == 0, err
    assert [m for m, _ in in_process] == ["lora", "ia3"]
    result = json.loads((out / "compare.json").read_text())
    assert result["metric"] == "accuracy" and result["task"] == "seq-cls"
    lora, ia3 = result["runs"]
    # The recipe's own method keeps its delta section and lr; ia3 gets the table's options and the override.
    assert lora["method"] == "lora" and lora["delta"]["r"] == 2 and lora["lr"] == 1e-2
    assert ia3["lr"] == 0.05 != compare_mod.RECOMMENDED["ia3"]["lr"]
    ia3_recipe = json.loads((out / "ia3" / compare_mod.RUN_FILE).read_text())["recipe"]
    assert ia3_recipe["train"]["lr"] == 0.05 and ia3_recipe["train"]["seed"] == 3
    assert json.loads((out / "lora" / compare_mod.RUN_FILE).read_text())["recipe"]["train"]["seed"] == 3
    for row in (lora, ia3):
        assert row["status"] == "done" and 0 < row["trainable"] < row["total"]
        assert 0 < row["trainable_share"] < 1 and row["checkpoint_bytes"] > 0 and row["steps"] == 2
        assert 0 <= row["eval"]["accuracy"] <= 1 and row["final_train_loss"] > 0
        assert row["train_seconds"] > 0
    assert lora["trainable"] != ia3["trainable"]
    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    for column in ("trainable", "share", "eval accuracy", "time (s)", "peak RSS", "checkpoint"):
        assert column in header
    assert any(line.startswith("| ia3 | 0.05 |") for line in md.splitlines()), md
    assert "ia3" in stdout and "lora" in stdout and "compare.md" in stdout
    assert_png(out / "metric_vs_trainable.png")
    assert_png(out / "loss_curves.png")


def test_finished_runs_are_reused_and_an_interrupted_one_resumes(tmp_path, cls_recipe, in_process, capsys):
    out = tmp_path / "cmp"
    args = ("compare", cls_recipe, "--methods", "lora,bitfit", "--set", "train.save_every=1", "-o", out)
    assert run_cli(capsys, *args)[0] == 0
    assert [m for m, _ in in_process] == ["lora", "bitfit"]
    stamp = (out / "lora" / "final" / "deltafit.json").stat().st_mtime_ns
    # Again: nothing trains, the table is the same.
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and len(in_process) == 2 and "reused" in stdout
    assert (out / "lora" / "final" / "deltafit.json").stat().st_mtime_ns == stamp
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert all(r["reused"] and r["status"] == "done" for r in runs)
    # bitfit as if killed before its end: no final checkpoint, step checkpoints left -> resumes.
    import shutil

    shutil.rmtree(out / "bitfit" / "final")
    (out / "bitfit" / compare_mod.RUN_FILE).unlink()
    assert run_cli(capsys, *args)[0] == 0
    assert in_process[2:] == [("bitfit", "resume")]
    bitfit = json.loads((out / "compare.json").read_text())["runs"][1]
    assert bitfit["resumed"] and not bitfit["reused"] and (out / "bitfit" / "final" / "deltafit.json").is_file()
    # A changed setting for one method retrains that one afresh (its old run is replaced).
    assert run_cli(capsys, *args, "--set", "bitfit:train.lr=0.002")[0] == 0
    assert in_process[3:] == [("bitfit", "overwrite")]


def test_real_training_processes_and_a_method_the_model_cannot_take(tmp_path, tiny_llama, alpaca_file, capsys):
    """Through the subprocess: BitFit on Llama (no biases) fails with its reason, LoRA trains."""
    recipe = write_recipe(tmp_path / "lm.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca",
                                                             "eval_fraction": 0.25, "max_length": 256},
                          train={"max_steps": 2})
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", recipe, "--methods", "bitfit,lora", "-o", out)
    assert code == 0, err
    bitfit, lora = json.loads((out / "compare.json").read_text())["runs"]
    assert bitfit["status"] == "failed" and "no bias terms" in bitfit["reason"]
    assert lora["status"] == "done" and lora["eval"]["loss"] > 0 and lora["peak_rss_bytes"] > 10 * 2**20
    assert json.loads((out / "compare.json").read_text())["metric"] == "loss"
    md = (out / "compare.md").read_text()
    assert "- bitfit: " in md and "no bias terms" in md
    assert "bitfit failed" in stdout
    assert_png(out / "loss_curves.png")


def test_every_recommended_setting_is_a_valid_recipe(tmp_path, tiny_llama):
    from deltafit.deltas import METHODS
    from deltafit.recipe import recipe_from_dict

    assert set(compare_mod.RECOMMENDED) == set(METHODS)
    base = {"model": {"name": str(tiny_llama)}, "data": {"train": "x.jsonl"}, "delta": {"method": "full"}}
    # Options without a default, which name a user's files: AdapterFusion's stage-1 checkpoints.
    own = {"adapter-fusion": ["delta.adapters=[runs/stage1-a/final, runs/stage1-b/final]"]}
    for method in METHODS:
        raw = compare_mod.method_recipe(base, method, [], own.get(method, []))
        recipe = recipe_from_dict(raw, source=method)
        assert recipe.delta.method == method
        if method != "full":
            assert recipe.train.lr == compare_mod.RECOMMENDED[method]["lr"]


@pytest.mark.parametrize("argv, needles", [
    (["--methods", "lora,bitfti"], ["bitfti", "did you mean 'bitfit'", "valid:"]),
    (["--methods", " , "], ["--methods", "valid:"]),
    (["--methods", "lora,lora"], ["'lora' twice"]),
    (["--methods", "lora,ia3", "--set", "adapter:train.lr=1"], ["adapter", "lora, ia3"]),
    (["--methods", "lora,ia3", "--set", "ia3:delta.bogus=1"], ["[ia3]", "delta.bogus"]),
    (["--methods", "lora", "--output", " "], ["--output"]),
])
def test_bad_input_is_one_line(tmp_path, cls_recipe, in_process, capsys, argv, needles):
    code, out, err = run_cli(capsys, "compare", cls_recipe, "-o", tmp_path / "cmp", *argv)  # a later -o wins
    assert_one_clean_line(code, err, *needles, out=out)
    assert in_process == []


def test_missing_recipe_and_a_recipe_every_method_refuses(tmp_path, cls_recipe, in_process, capsys):
    code, out, err = run_cli(capsys, "compare", tmp_path / "nope.yaml", "--methods", "lora")
    assert_one_clean_line(code, err, "nope.yaml", out=out)
    code, out, err = run_cli(capsys, "compare", cls_recipe, "--methods", "lora,ia3", "--set", "data.max_length=4096",
                             "-o", tmp_path / "cmp")
    assert_one_clean_line(code, err, "data.max_length", out=out)
    assert in_process == []


def test_missing_matplotlib_is_one_line_before_training(tmp_path, cls_recipe, in_process, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = run_cli(capsys, "compare", cls_recipe, "--methods", "lora", "-o", tmp_path / "cmp")
    assert_one_clean_line(code, err, "needs matplotlib", "pip install 'deltafit[plots]'", out=out)
    assert in_process == []
