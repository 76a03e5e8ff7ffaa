"""`deltafit report RUN_DIR`: charts of a run's metrics.jsonl and its summary; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import assert_one_clean_line, run_cli, write_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def flat(text: str) -> str:
    """A rich table's text with its borders gone and spaces squeezed."""
    for border in "│┃|":
        text = text.replace(border, " ")
    return " ".join(text.split())


def write_metrics(run: Path, with_eval: bool = True) -> Path:
    """metrics.jsonl as MetricsLog writes it: step records, eval records, an event, and a line cut short."""
    run.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(1, 11):
        records.append({"step": step, "epoch": 0, "loss": 2.0 - 0.1 * step + (0.5 if step == 10 else 0),
                        "lr": 1e-3 * step / 10, "grad_norm": 1.0, "tokens": 100 * step, "tokens_per_s": 50.0})
        if with_eval and step % 5 == 0:
            records.append({"step": step, "eval_accuracy": 0.6 if step == 5 else 0.55, "eval_f1": 0.5,
                            "eval_examples": 32})
    records.append({"step": 10, "early_stopping": "stopped", "metric": "eval_accuracy", "best": 0.6,
                    "best_step": 5, "evaluations_without_improvement": 1, "patience": 1})
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "loss"', encoding="utf-8")
    return path


def test_report_draws_charts_and_summarizes(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run)
    code, out, err = run_cli(capsys, "report", run)
    assert code == 0, err
    for name in ("loss.png", "lr.png", "eval.png", "tokens_per_s.png"):
        assert_png(run / name)
    text = flat(out)
    assert "steps 10" in text
    assert "final train loss 1.5000" in text  # the last step's loss (not the minimum)
    assert "min train loss 1.1000 (step 9)" in text
    assert "best eval accuracy 0.6000 (step 5)" in text  # the best, not the last
    assert "mean tokens/s 50" in text and "train time (est.) 20.0 s" in text
    assert "early stopping step 10" in text
    assert "examples" not in text  # counts are not metrics


def test_report_output_dir_and_a_run_without_evaluation(tmp_path, capsys):
    run, charts = tmp_path / "run", tmp_path / "charts"
    write_metrics(run, with_eval=False)
    code, out, err = run_cli(capsys, "report", run, "--output", charts)
    assert code == 0, err
    assert sorted(p.name for p in charts.iterdir()) == ["loss.png", "lr.png", "tokens_per_s.png"]
    assert not list(run.glob("*.png"))
    assert "best eval" not in out


def test_report_on_a_real_training_run(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca",
                                                            "eval_fraction": 0.25, "max_length": 256},
                          train={"max_steps": 3})
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "-o", run)[0] == 0
    code, out, err = run_cli(capsys, "report", run)
    assert code == 0, err
    assert "steps 3" in flat(out) and "best eval loss" in flat(out)
    assert_png(run / "loss.png")
    assert_png(run / "eval.png")


@pytest.mark.parametrize("setup, needles", [
    (lambda d: None, ["is not a directory"]),
    (lambda d: d.mkdir(), ["no metrics.jsonl"]),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), ["holds no metric records"]),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("not json\n")), ["holds no metric records"]),
])
def test_report_bad_run_dir_is_one_line(tmp_path, capsys, setup, needles):
    run = tmp_path / "run"
    setup(run)
    code, out, err = run_cli(capsys, "report", run)
    assert_one_clean_line(code, err, str(run), *needles, out=out)


def test_report_output_that_is_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run)
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(capsys, "report", run, "--output", tmp_path / "file")
    assert_one_clean_line(code, err, "--output", "is a file", out=out)
    # A file on the way to the directory: used to be a NotADirectoryError traceback.
    code, out, err = run_cli(capsys, "report", run, "--output", tmp_path / "file" / "charts")
    assert_one_clean_line(code, err, "--output", "is a file, so no directory can be made there", out=out)


def test_report_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_metrics(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, out, err = run_cli(capsys, "report", run)
    assert_one_clean_line(code, err, "deltafit report needs matplotlib", "pip install 'deltafit[plots]'", out=out)
    assert not list(run.glob("*.png"))
