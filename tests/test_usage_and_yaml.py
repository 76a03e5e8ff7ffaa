"""Command-line usage errors and recipe YAML edge cases, through real processes where the point is
what a user's terminal shows: one usage message or one error line, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deltafit.recipe import load_recipe
from tests.helpers import assert_one_clean_line, run_cli


def deltafit(*argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltafit", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv, says", [
    (["trian"], "No such command 'trian'"),
    (["train"], "Missing argument"),
    (["train", "r.yaml", "--bogus"], "No such option: --bogus"),
    (["eval", "ckpt", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["train", "r.yaml", "--set"], "'--set' requires an argument"),
    (["merge", "ckpt"], "Missing option '--output'"),
])
def test_usage_errors_print_the_usage_and_exit_2_without_a_traceback(argv, says):
    done = deltafit(*argv)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_bare_command_prints_help():
    done = deltafit()
    assert "Usage" in done.stdout + done.stderr and "Traceback" not in done.stderr


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "model: {name: some/model}\ndata: {train: rows.json}\n"


def test_merge_keys_and_x_anchor_keys_work(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "x-short: &short {max_steps: 20, batch_size: 4, lr: 0.1}\n" + BASE
                                 + "train:\n  <<: *short\n  lr: 0.001\n"))
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.train.lr) == (20, 4, 0.001)
    assert "x-short" not in recipe.to_dict()


def test_a_key_given_twice_beside_a_merge_is_still_refused(tmp_path, capsys):
    path = _recipe(tmp_path, "x-a: &a {max_steps: 2}\n" + BASE + "train:\n  <<: *a\n  lr: 0.1\n  lr: 0.2\n")
    code, _, err = run_cli(capsys, "validate", path)
    assert_one_clean_line(code, err, "key 'lr' is given twice")


def test_an_alias_bomb_is_refused_at_once_in_bounded_memory(tmp_path):
    lines = ['x-a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"x-{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = _recipe(tmp_path, "\n".join(lines) + "\n" + BASE + "name: *i\n")
    done = deltafit("validate", path, timeout=60)  # expanded, it would never finish
    assert done.returncode == 2, done.stderr
    assert "expands to 926,177,123 values" in done.stderr and "at most 100,000" in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1


def test_a_data_file_passed_as_the_recipe_is_refused_before_it_is_parsed(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"instruction": f"row {i} " + "x" * 100, "output": "y" * 100} for i in range(6000)]))
    assert path.stat().st_size > 1 << 20
    code, _, err = run_cli(capsys, "validate", path)
    assert_one_clean_line(code, err, "train.json", "MiB", "is it a data file?")


@pytest.mark.parametrize("value, shown", [("#1 String", "None"), ("a #b", "'a'")])
def test_a_set_value_that_yaml_reads_as_a_comment_asks_for_quotes(tmp_path, capsys, value, shown):
    path = _recipe(tmp_path, BASE)
    code, _, err = run_cli(capsys, "validate", path, "--set", f"data.text_column={value}")
    assert_one_clean_line(code, err, "starts a comment", f"read as {shown}", f'data.text_column="{value}"')


def test_a_quoted_set_value_keeps_its_hash(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, BASE), ['data.text_column="#1 String"', "data.prompt_column=a#b"])
    assert (recipe.data.text_column, recipe.data.prompt_column) == ("#1 String", "a#b")
