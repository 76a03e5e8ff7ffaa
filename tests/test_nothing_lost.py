"""Nothing the user has is lost: no command writes into a checkpoint, outputs are checked before any
work, and a mistaken output path is one clean error (exit 2) that leaves every existing file as it was."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_an_output_that_is_the_input_data_file_is_refused(run, capsys, tmp_path, no_model_loading, command):
    """`-o` naming the very --data file would replace the user's data with the results."""
    data = tmp_path / "eval.json"
    shutil.copy(run.parent / "alpaca.json", data)
    before = data.read_bytes()
    code, _, err = run_cli(capsys, command, run / "final", "--data", data, "--output", tmp_path / "." / "eval.json")
    assert_one_clean_line(code, err, "--output", "is the data file this command reads")
    assert data.read_bytes() == before


def test_eval_output_over_the_recipes_eval_data_is_refused(run, capsys, no_model_loading):
    data = run.parent / "alpaca.json"  # the recipe's data.train, from which eval_fraction held rows out
    before = data.read_bytes()
    code, _, err = run_cli(capsys, "eval", run / "final", "--output", data)
    assert_one_clean_line(code, err, "--output", "is the data file this command reads")
    assert data.read_bytes() == before


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


def test_training_again_into_a_finished_run_is_refused(run, capsys, tmp_path):
    """Without --resume a new run would silently replace final/: refused, naming the ways out;
    --overwrite trains afresh and replaces it."""
    recipe = run.parent / "r.yaml"
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    before = tree_digest(copy / "final")
    code, _, err = run_cli(capsys, "train", recipe, "--output", copy)
    assert_one_clean_line(code, err, f"--output '{copy}'", "already holds a trained run", "--resume", "--overwrite")
    assert tree_digest(copy / "final") == before
    code, _, err = run_cli(capsys, "train", recipe, "--output", copy, "--overwrite", "--set", "train.seed=7")
    assert code == 0, err
    assert tree_digest(copy / "final") != before


def test_training_into_a_checkpoint_directory_is_refused(run, capsys):
    code, _, err = run_cli(capsys, "train", run.parent / "r.yaml", "--output", run / "final" / "again")
    assert_one_clean_line(code, err, "--output", "inside the checkpoint")


@pytest.fixture(scope="module")
def stepped(tmp_path_factory, run):
    """The same recipe with a step checkpoint at step 1 of 3."""
    out = tmp_path_factory.mktemp("stepped") / "run"
    code = subprocess.run([sys.executable, "-m", "deltafit", "train", str(run.parent / "r.yaml"), "--output", str(out),
                           "--set", "train.max_steps=3", "--set", "train.save_every=1", "--set", "train.keep_last=3"],
                          capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stderr
    return out


@pytest.mark.parametrize("change, key", [("delta.alpha=64", "delta.alpha"), ("delta.r=2", "delta.r"),
                                         ("train.batch_size=2", "train.batch_size"), ("train.seed=5", "train.seed"),
                                         # data keys that change which rows train (held out, capped, masked)
                                         ("data.eval_fraction=0.5", "data.eval_fraction"),
                                         ("data.max_train_examples=4", "data.max_train_examples"),
                                         ("data.train_on_inputs=true", "data.train_on_inputs")])
def test_resume_with_a_changed_delta_or_data_order_is_refused(run, stepped, capsys, change, key):
    step = stepped / "checkpoints" / "step-00000001"
    recipe = run.parent / "r.yaml"
    base = ["train", recipe, "--output", stepped, "--set", "train.max_steps=3", "--set", "train.save_every=1",
            "--set", "train.keep_last=3", "--resume", step]
    before = tree_digest(stepped)
    code, _, err = run_cli(capsys, *base, "--set", change)
    assert_one_clean_line(code, err, f"'{key}'", "--allow-changes", str(step))
    assert tree_digest(stepped) == before


def test_resume_over_a_data_file_rewritten_in_place_is_refused(run, stepped, capsys, tmp_path):
    """Same recipe, same path, other rows: the step checkpoint's hash of its training rows tells."""
    data = run.parent / "alpaca.json"  # the file the recipe (and so the checkpoint) names
    original = data.read_bytes()
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(stepped), str(copy)], check=True)
    step = copy / "checkpoints" / "step-00000001"
    common = ["train", run.parent / "r.yaml", "--output", copy, "--set", "train.max_steps=3",
              "--set", "train.save_every=1", "--set", "train.keep_last=3", "--resume", step]
    try:
        data.write_text(json.dumps([{**row, "output": row["output"] + "!"} for row in json.loads(original)]))
        code, _, err = run_cli(capsys, *common)
        assert_one_clean_line(code, err, "--resume", "training rows differ", str(step), "--allow-changes")
        code, _, err = run_cli(capsys, *common, "--allow-changes")
        assert code == 0, err
    finally:
        data.write_bytes(original)
    code, _, err = run_cli(capsys, *common[:-2], "--set", "train.max_steps=4", "--resume", step)
    assert code == 0, err  # the original rows again: resumes


def test_resume_may_change_what_does_not_shape_the_run_and_allow_changes_overrides(run, stepped, capsys, tmp_path):
    recipe = run.parent / "r.yaml"
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(stepped), str(copy)], check=True)
    step = copy / "checkpoints" / "step-00000001"
    common = ["train", recipe, "--output", copy, "--set", "train.save_every=1", "--set", "train.keep_last=3"]
    code, _, err = run_cli(capsys, *common, "--set", "train.max_steps=4", "--set", "train.lr=0.001", "--resume", step)
    assert code == 0, err  # a longer run at another learning rate: allowed
    code, _, err = run_cli(capsys, *common, "--set", "train.max_steps=4", "--set", "delta.alpha=64",
                           "--resume", step, "--allow-changes")
    assert code == 0, err


def test_an_unwritable_home_still_trains_evaluates_and_saves(tmp_path, tiny_bert):
    """Every cache (data, evaluate's modules, metrics) lives under HOME by default: when it cannot be
    written, training and its end-of-run evaluation go on, and the delta is saved."""
    data = tmp_path / "cls.tsv"
    rows = "".join(f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}\n" for i in range(16))
    data.write_text("sentence\tlabel\n" + rows)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, {"train": str(data), "format": "classification",
                          "text_column": "sentence", "label_column": "label", "eval_fraction": 0.25,
                          "max_length": 32}, task="seq-cls", train={"max_steps": 2})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "DELTAFIT_"))}
    env["HOME"] = "/proc/no-such-home"  # not creatable, even for root
    done = subprocess.run([sys.executable, "-m", "deltafit", "train", str(recipe), "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "run" / "final" / "deltafit.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)
    assert not (tmp_path / "deltafit").exists()  # no cache fell back into the working directory


def test_train_output_mistakes_are_refused_before_any_work(run, capsys, tmp_path, no_model_loading):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    cases = {"": "--output is empty", str(a_file): "not writable", "/proc/deltafit-run": "not writable"}
    for output, message in cases.items():
        code, _, err = run_cli(capsys, "train", run.parent / "r.yaml", "--output", output)
        assert_one_clean_line(code, err, message)
    assert a_file.read_text() == "mine"
