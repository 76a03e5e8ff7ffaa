"""Bad input: exit code 2 and one clear line naming the key, file or value; never a traceback.

Broken recipes, data files and checkpoints live in the corpus under tests/malformed/ (run by
tests/test_malformed.py); the cases here need a setup of their own.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, write_recipe


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def lm_data(path):
    return {"train": str(path), "format": "alpaca"}


def test_missing_recipe_file(tmp_path, capsys):
    assert_clean_error(*run_cli(capsys, "train", tmp_path / "nope.yaml")[::2], "nope.yaml", "does not exist")


def test_a_directory_given_as_the_recipe_says_so_and_lists_its_recipes(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "lora.yaml").write_text("model: {name: x}\n")
    for command in ("train", "validate"):
        assert_clean_error(*run_cli(capsys, command, tmp_path / "recipes")[::2], "is a directory", "lora.yaml")


@pytest.mark.parametrize("setup", ["missing", "empty_dir", "pickle", "bad_json", "truncated"])
def test_not_a_checkpoint(tmp_path, capsys, setup):
    path = tmp_path / "ckpt"
    if setup != "missing":
        path.mkdir()
    if setup == "pickle":
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    if setup in ("bad_json", "truncated"):
        (path / "deltafit.json").write_text("{not json" if setup == "bad_json" else json.dumps(
            {"format": "deltafit-checkpoint", "method": "lora", "delta_config": {"method": "lora"},
             "model": {"name": "x"}, "task": "causal-lm"}))
        (path / "delta.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code, _, err = run_cli(capsys, "eval", path)
    assert_clean_error(code, err, str(path))
    if setup == "pickle":
        assert "never loaded" in err


def test_merge_of_unmergeable_method_says_why(tmp_path, capsys):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "deltafit.json").write_text(json.dumps(
        {"format": "deltafit-checkpoint", "method": "prompt", "delta_config": {"method": "prompt"},
         "model": {"name": "x"}, "task": "causal-lm"}))
    (path / "recipe.yaml").write_text("model: {name: x}\ndata: {train: x.json}\n")  # every checkpoint has one
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path / "delta.safetensors"))
    code, _, err = run_cli(capsys, "merge", path, "--output", tmp_path / "m")
    assert_clean_error(code, err, "cannot be merged")


def test_bad_set_syntax(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, lm_data(alpaca_file))
    assert_clean_error(*run_cli(capsys, "validate", recipe, "--set", "train.lr")[::2], "section.key=value")


def test_tracker_without_its_package(tmp_path, tiny_llama, alpaca_file, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, lm_data(alpaca_file), log={"trackers": ["tensorboard"]})
    assert_clean_error(*run_cli(capsys, "train", recipe, "-o", tmp_path / "o")[::2], "log.trackers", "tensorboard")
