"""E2E NLG-style data: header-less `.txt` files split on `data.delimiter`, and `data.prompt_template`
rendering completion prompts the same way for training, evaluation and `deltafit generate --data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltafit.data import describe_data, load_rows, prepare_data
from deltafit.errors import UserError
from deltafit.recipe import DataSpec
from tests.helpers import assert_one_clean_line, run_cli, write_recipe

TINY_E2E = Path(__file__).resolve().parent / "fixtures" / "e2e_nlg_tiny.txt"  # 4 `MR||reference` lines, 1 blank
COLUMNS = ["meaning_representation", "target"]
TEMPLATE = "{prompt}\nText:\n"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def e2e_spec(**extra) -> DataSpec:
    return DataSpec(**{"train": str(TINY_E2E), "delimiter": "||", "columns": COLUMNS, "format": "completion",
                       "prompt_column": "meaning_representation", "text_column": "target",
                       "prompt_template": TEMPLATE, "packing": False, **extra})


def test_txt_lines_split_on_the_delimiter():
    rows = load_rows(str(TINY_E2E), columns=COLUMNS, delimiter="||")
    assert len(rows) == 4 and rows.column_names == COLUMNS
    assert rows["meaning_representation"][0] == "name : The Spoon | food : Thai"  # single '|' stays inside a field
    assert rows["target"][0] == "The Spoon serves Thai food ."  # surrounding spaces stripped
    assert rows.row_origin(2) == f"line 4 of '{TINY_E2E}'"  # the blank line 3 is skipped, numbers stay true


def test_a_line_with_other_fields_names_its_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a||b\nc||d||e\n")
    with pytest.raises(UserError, match=r"line 2 has 3 fields split on '\|\|'.*names 2"):
        load_rows(str(bad), columns=["x", "y"], delimiter="||")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"columns": COLUMNS}, "data.delimiter"),
    ({"delimiter": "||"}, "data.columns"),
    ({}, "data.delimiter and data.columns"),
])
def test_txt_needs_delimiter_and_columns(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        load_rows(str(TINY_E2E), **kwargs)


def test_delimiter_is_refused_elsewhere(tmp_path):
    other = tmp_path / "rows.jsonl"
    other.write_text(json.dumps({"a": "b"}))
    with pytest.raises(UserError, match="data.delimiter.*not one"):
        load_rows(str(other), delimiter="||")


def test_prompt_template_renders_and_masks_the_prompt(tok):
    prepared = prepare_data(e2e_spec(), tok, "causal-lm", 0)
    example = prepared.train[0]
    prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
    answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    expected = tok("name : The Spoon | food : Thai\nText:\n", add_special_tokens=False)["input_ids"]
    assert prompt == expected
    assert tok.decode(answer).startswith("The Spoon serves Thai food .")


def test_template_changes_the_cache_key(tok):
    from deltafit.data.cache import _cache_key

    keys = {_cache_key(e2e_spec(prompt_template=t), tok, "causal-lm", 0, None, True) for t in (TEMPLATE, "{prompt}:")}
    assert len(keys) == 2


def test_generate_renders_data_rows_through_the_same_template(tok, tmp_path):
    from deltafit.generate import data_rows

    rows = tmp_path / "e2e.jsonl"
    rows.write_text(json.dumps({"meaning_representation": "name : X", "target": "X is here ."}))
    spec = e2e_spec().model_copy(update={"columns": None, "delimiter": None})
    [row] = data_rows(tok, spec, str(rows))
    assert row.pieces == ["name : X\nText:\n"] and row.reference == "X is here ."


def test_describe_reads_the_txt_file():
    info = describe_data(e2e_spec(eval=str(TINY_E2E), max_eval_examples=2))
    assert info["train_rows"] == 4 and info["eval_rows"] == 2 and info["columns"] == COLUMNS


@pytest.mark.parametrize(("data", "needles"), [
    ({"prompt_template": "no placeholder"}, ["data.prompt_template", "{prompt}"]),
    ({"format": "alpaca", "prompt_column": None}, ["data.prompt_template", "alpaca"]),
    ({"delimiter": None}, ["data.delimiter", ".txt"]),
])
def test_bad_e2e_settings_are_one_line_errors(capsys, tmp_path, tiny_llama, data, needles):
    base = e2e_spec().model_dump(exclude_defaults=True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {**base, **data})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert_one_clean_line(code, err, *needles, out=out)


def test_trains_two_steps_on_txt_data(capsys, tmp_path, tiny_llama):
    data = {**e2e_spec().model_dump(exclude_defaults=True), "eval": str(TINY_E2E), "max_length": 64}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, train={"max_steps": 2, "batch_size": 2})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()
