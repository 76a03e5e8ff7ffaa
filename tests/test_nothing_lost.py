"""Nothing the user has is lost: no command writes into a checkpoint, outputs are checked before any
work, and a mistaken output path is one clean error (exit 2) that leaves every existing file as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import assert_one_clean_line, run_cli, tree_digest, write_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """A 2-step LoRA run of the tiny Llama with eval data (final/ only)."""
    root = tmp_path_factory.mktemp("nothing-lost")
    data = root / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(16)]))
    recipe = write_recipe(root / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca", "eval_fraction": 0.25},
                          train={"max_steps": 2})
    done = subprocess.run([sys.executable, "-m", "deltafit", "train", str(recipe), "--output", str(root / "run")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model: its checks must come first."""
    import deltafit.model

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing its output")

    monkeypatch.setattr(deltafit.model, "build_model", refuse)


def test_eval_writes_its_results_beside_the_checkpoint_not_into_it(run, capsys):
    before = tree_digest(run / "final")
    code, _, err = run_cli(capsys, "eval", run / "final")
    assert code == 0, err
    assert json.loads((run / "final-eval.json").read_text())["tokens"] > 0
    assert tree_digest(run / "final") == before


@pytest.mark.parametrize("target", ["final/deltafit.json", "final/delta.safetensors", "final/new.json"])
def test_eval_output_inside_a_checkpoint_is_refused(run, capsys, target, no_model_loading):
    before = tree_digest(run / "final")
    code, _, err = run_cli(capsys, "eval", run / "final", "--output", run / target)
    assert_one_clean_line(code, err, "--output", "inside the checkpoint", "deltafit.json")
    assert tree_digest(run / "final") == before


def test_eval_output_that_is_a_directory_is_refused(run, capsys, tmp_path, no_model_loading):
    code, _, err = run_cli(capsys, "eval", run / "final", "--output", tmp_path)
    assert_one_clean_line(code, err, "--output", "is a directory")


def test_eval_split_on_a_single_local_file_is_refused(run, capsys, tmp_path):
    data = tmp_path / "more.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 4))
    code, _, err = run_cli(capsys, "eval", run / "final", "--data", data, "--split", "validation")
    assert_one_clean_line(code, err, "--split 'validation'", "more.json", "no named splits")


@pytest.mark.parametrize("command", ["merge", "export"])
def test_new_output_mistakes_are_refused_before_any_work(run, capsys, tmp_path, command, no_model_loading):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine too")
    extra = ["--format", "peft"] if command == "export" else []
    cases = {
        str(a_file): "is an existing file",
        str(full): "exists and is not empty",
        "": "give the path of a new directory",
        "/proc/deltafit-out": "is not writable",
        str(run / "final" / "sub"): "inside the checkpoint",
    }
    for output, message in cases.items():
        code, _, err = run_cli(capsys, command, run / "final", "--output", output, *extra)
        assert_one_clean_line(code, err, "--output", message)
    assert a_file.read_text() == "mine" and (full / "keep.txt").read_text() == "mine too"


def test_a_new_output_inside_another_checkpoint_is_refused(run, capsys, tmp_path):
    before = tree_digest(run / "final")
    code, _, err = run_cli(capsys, "export", run / "final", "--format", "peft", "--output", tmp_path / "adapter")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", run / "final", "--output", tmp_path / "adapter" / "merged")
    assert_one_clean_line(code, err, "--output", "inside the checkpoint", "adapter_config.json")
    assert tree_digest(run / "final") == before
