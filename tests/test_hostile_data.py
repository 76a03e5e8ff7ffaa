"""Hostile but plausible inputs: each is a `UserError` (exit 2, one `error:` line naming the recipe
key or file and key, no traceback), or, for an over-long CSV/TSV field, simply loads.

1. Cells that are no text or label: NaN labels (pandas/JSON floats), lists and mappings (parquet list
   and struct columns, JSON arrays/objects) in the text, text pair, label, prompt, instruction, input
   and output columns. They used to be trained on as their Python repr ("['a', 'b']", "nan").
2. A CSV/TSV field longer than the csv module's default limit (128 KiB) loads, then is truncated
   to data.max_length like any long row.
3. A checkpoint's deltafit.json with a field of the wrong type (used to be a TypeError later on).
4. A PEFT adapter_config.json with null or wrongly typed fields (used to be a TypeError in import).

At least one case of each class runs as a real `python -m deltafit` process (what a user sees,
including anything libraries print); the others run the CLI in this process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deltafit.errors import UserError
from tests.helpers import assert_one_clean_line, run_cli, write_recipe

TIMEOUT = 300  # seconds for one real process (imports torch and transformers on a shared machine)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))


def run_process(tmp_path: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "DELTAFIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deltafit", *map(str, argv)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=Path(__file__).resolve().parents[1])


def one_error_line(code: int, out: str, err: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line `error: ...` holding every fragment, no traceback; the line."""
    return assert_one_clean_line(code, err, *fragments, out=out)


def process_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    return one_error_line(result.returncode, result.stdout, result.stderr, *fragments)


# ----------------------------------------------------------------------------------------------
# 1. Cells that are no text or label


def cls_recipe(tmp_path: Path, model: Path, data: Path, **extra) -> Path:
    data = {"train": str(data), "format": "classification", "text_column": "sentence", **extra}
    return write_recipe(tmp_path / "cls.yaml", model, data, task="seq-cls")


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return path


def sentences(n: int) -> list[str]:
    return [f"{'a great fine movie' if i % 2 else 'terrible boring film'} {i}" for i in range(n)]


def test_nan_label_in_a_parquet_float_column_is_refused_real_process(tmp_path, tiny_bert):
    """pandas writes a missing number as NaN: a float label column with one is refused, naming the
    key, the column and the row (row 4 of the file, and its text), not trained as a class 'nan'."""
    labels = [0.0, 1.0, 0.0, math.nan, 1.0, 0.0]
    data = write_parquet(tmp_path / "train.parquet", {"sentence": sentences(6), "label": labels})
    result = run_process(tmp_path, "validate", cls_recipe(tmp_path, tiny_bert, data))
    process_error(result, "'data.label_column'", "column 'label'", "NaN", f"row 4 of '{data}'",
                  "whose sentence is 'a great fine movie 3'")


@pytest.mark.parametrize("lines", [False, True], ids=["json", "jsonl"])
def test_nan_label_in_json_is_refused(tmp_path, tiny_bert, capsys, lines):
    """Python's JSON reader takes the NaN literal (pandas' to_json writes it) as a float NaN."""
    rows = [f'{{"sentence": "{text}", "label": {"NaN" if i == 2 else i % 2}}}' for i, text in enumerate(sentences(6))]
    data = tmp_path / ("train.jsonl" if lines else "train.json")
    data.write_text("\n".join(rows) if lines else "[" + ",\n".join(rows) + "]")
    where = "line 3" if lines else "record 3"
    one_error_line(*run_cli(capsys, "validate", cls_recipe(tmp_path, tiny_bert, data)),
                   "'data.label_column'", "column 'label' of data.train", "NaN", f"{where} of '{data}'")


def test_the_string_nan_in_a_tsv_is_a_label(tmp_path, tiny_bert, capsys):
    """A TSV cell is text, taken as written: "nan" there is a class name, not a missing number.
    Language identification data uses it (ISO 639-3 'nan' is Min Nan Chinese), and a TSV has no
    way to write a float NaN anyway (a missing label is an empty cell, refused as such)."""
    data = tmp_path / "lang.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{'nan' if i % 2 else 'eng'}\n"
                                                   for i, s in enumerate(sentences(8))))
    from deltafit.data import describe_data
    from deltafit.recipe import DataSpec

    code, out, err = run_cli(capsys, "validate", cls_recipe(tmp_path, tiny_bert, data))
    assert code == 0, err
    spec = DataSpec(train=str(data), format="classification", text_column="sentence")
    assert describe_data(spec)["labels"] == ["eng", "nan"]


def test_a_label_of_only_spaces_is_a_missing_label(tmp_path, tiny_bert, capsys):
    data = tmp_path / "cls.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{'  ' if i == 3 else i % 2}\n"
                                                   for i, s in enumerate(sentences(6))))
    one_error_line(*run_cli(capsys, "validate", cls_recipe(tmp_path, tiny_bert, data)),
                   "'data.label_column'", "no value", f"line 5 of '{data}'", "'a great fine movie 3'")


def test_the_row_keeps_its_file_line_through_shuffles_and_caps(tmp_path, tiny_bert, capsys):
    """Held-out and capped rows are a seeded shuffle of the file: the report still gives the file line."""
    texts = sentences(20)
    rows = [{"sentence": t, "label": ["pos"] if i == 16 else ("pos" if i % 2 else "neg")} for i, t in enumerate(texts)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = cls_recipe(tmp_path, tiny_bert, data, eval_fraction=0.25, max_train_examples=14)
    # Arrow refuses a column mixing lists and strings when reading: the file's problem, named by file.
    one_error_line(*run_cli(capsys, "validate", recipe), "'data.train'", "column 'label' (str and list)")
    rows = [{**r, "label": ["pos"] if i == 16 else ["pos" if i % 2 else "neg"]} for i, r in enumerate(rows)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    line = one_error_line(*run_cli(capsys, "train", recipe, "--output", tmp_path / "run"),
                          "'data.label_column'", "column 'label'", "a list", "one label per row")
    assert f"of '{data}'" in line and "line " in line
    # whichever row is reported, its line and its text agree with the file
    number = int(line.split(" of '")[0].rsplit("line ", 1)[1])
    assert f"whose sentence is {texts[number - 1]!r}" in line


# (data format, recipe key, column, cell value): every column a format reads as text or as a label.
LIST_CELLS = [
    ("classification", "data.text_column", "sentence", ["a", "list"]),
    ("classification", "data.text_column", "sentence", {"text": "a mapping"}),
    ("classification", "data.text_pair_column", "hypothesis", ["x"]),
    ("classification", "data.label_column", "label", ["pos", "neg"]),
    ("classification", "data.label_column", "label", {"name": "pos"}),
    ("alpaca", "data.instruction_column", "instruction", ["step 1", "step 2"]),
    ("alpaca", "data.input_column", "input", {"k": "v"}),
    ("alpaca", "data.output_column", "output", ["a", "b"]),
    ("completion", "data.text_column", "text", ["one", "two"]),
    ("completion", "data.prompt_column", "prompt", ["q"]),
]


def _row(fmt: str, i: int, column: str, value) -> dict:
    row = {"classification": {"sentence": f"sentence {i}", "hypothesis": f"h {i}", "label": "pos" if i % 2 else "neg"},
           "alpaca": {"instruction": f"Say {i}.", "input": "", "output": str(i)},
           "completion": {"prompt": f"Q{i}:", "text": f"answer {i}"}}[fmt]
    return {**row, column: value}


@pytest.mark.parametrize("fmt, key, column, value", LIST_CELLS,
                         ids=[f"{c[0]}-{c[2]}-{type(c[3]).__name__}" for c in LIST_CELLS])
def test_list_and_mapping_cells_are_refused(tmp_path, tiny_llama, tiny_bert, capsys, fmt, key, column, value):
    """Every row holds a list/mapping in one column (Arrow types a column as a whole), as a
    parquet list or struct column or a JSON array/object would; the row reported is the first."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(_row(fmt, i, column, value)) for i in range(8)))
    extra = {"text_column": "sentence", "text_pair_column": "hypothesis"} if fmt == "classification" else {}
    extra.update({"prompt_column": "prompt"} if fmt == "completion" else {})
    task = "seq-cls" if fmt == "classification" else "causal-lm"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert if task == "seq-cls" else tiny_llama,
                          {"train": str(data), "format": fmt, **extra}, task=task)
    kind = "a list" if isinstance(value, list) else "a mapping"
    line = one_error_line(*run_cli(capsys, "train", recipe, "--output", tmp_path / "run"),
                          f"recipe key '{key}'", f"column '{column}'", kind, f"line 1 of '{data}'")
    assert repr(value)[:20] in line


def test_a_parquet_list_column_is_refused_real_process(tmp_path, tiny_llama):
    data = write_parquet(tmp_path / "train.parquet", {"instruction": [f"Say {i}." for i in range(6)],
                                                      "output": [[str(i), "more"] for i in range(6)]})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(data), "format": "alpaca"})
    result = run_process(tmp_path, "train", recipe, "--output", tmp_path / "run")
    process_error(result, "'data.output_column'", "column 'output'", "a list", f"row 1 of '{data}'",
                  "whose instruction is 'Say 0.'", "['0', 'more']")


def test_rows_of_a_hub_dataset_are_named_by_their_text():
    """Hub datasets and folders come as `datasets.Dataset`, whose rows carry no file position (and may
    be shuffled by now): the row is named by its text."""
    import datasets

    from deltafit.data.formats import _label_names_from
    from deltafit.recipe import DataSpec

    rows = datasets.Dataset.from_dict({"sentence": sentences(6), "label": [0.0, 1.0, math.nan, 1.0, 0.0, 1.0]})
    spec = DataSpec(train="glue", format="classification", text_column="sentence")
    with pytest.raises(UserError, match=r"holds NaN \(not a number\) \(nan\) at the row whose sentence is "
                                        r"'terrible boring film 2'; drop the row"):
        _label_names_from(rows, spec, "data.train")


# ----------------------------------------------------------------------------------------------
# 2. A CSV/TSV field longer than the csv module's default limit


LONG = 200_000  # characters: over csv's 131072 default field size limit


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_a_200kb_field_loads_and_is_truncated(tmp_path, tiny_llama, suffix):
    from transformers import AutoTokenizer

    from deltafit.data import load_rows, prepare_data
    from deltafit.recipe import DataSpec

    long_text = ("word " * (LONG // 5)).strip()
    if suffix == ".csv":
        long_text = long_text.replace("word word", 'a "quoted", comma\nand newline', 1000)  # CSV quoting at work
    rows = [("a great fine movie", "pos"), (long_text, "neg"), ("terrible boring film", "neg"), ("fine", "pos")]
    data = tmp_path / f"train{suffix}"
    with open(data, "w", newline="", encoding="utf-8") as f:
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        writer = csv.writer(f, delimiter="," if suffix == ".csv" else "\t", quoting=quoting, escapechar=None)
        writer.writerows([("sentence", "label"), *rows])
    limit = csv.field_size_limit()
    loaded = load_rows(str(data))
    assert csv.field_size_limit() == limit  # the module-wide limit is put back
    assert loaded["sentence"][1] == long_text and len(loaded) == 4
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    spec = DataSpec(train=str(data), format="classification", text_column="sentence", max_length=64, cache=False)
    prepared = prepare_data(spec, tok, "seq-cls", 0)
    assert prepared.stats["train_truncated"] == 1
    assert max(len(ex["input_ids"]) for ex in prepared.train) == 64


def test_a_200kb_field_validates_real_process(tmp_path, tiny_bert):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "x" * LONG + "\tpos\nshort\tneg\n")
    result = run_process(tmp_path, "validate", cls_recipe(tmp_path, tiny_bert, data))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# 3. Checkpoint metadata (deltafit.json) with a field of the wrong type


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama) -> Path:
    """A 2-step LoRA run of the tiny Llama: final/ plus checkpoints/step-00000001 (with trainer/)."""
    from deltafit.cli import main

    root = tmp_path_factory.mktemp("hostile-run")
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(16)]
    (root / "alpaca.json").write_text(json.dumps(rows))
    recipe = write_recipe(root / "recipe.yaml", tiny_llama, {"train": str(root / "alpaca.json"), "format": "alpaca"},
                          train={"max_steps": 2, "save_every": 1}, name="hostile")
    try:
        main(["train", str(recipe), "--output", str(root / "run")])
    except SystemExit as e:
        assert not e.code, e.code
    return root / "run"


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def damage_meta(checkpoint: Path, **fields) -> None:
    path = checkpoint / "deltafit.json"
    meta = json.loads(path.read_text())
    for key, value in fields.items():
        if "." in key:  # a key of the model section
            section, sub = key.split(".")
            meta[section][sub] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


# (deltafit.json key, bad value, what the message says it must be)
META_DAMAGES = [
    ("step", "x", "a whole number >= 0"),
    ("step", True, "a whole number >= 0"),
    ("step", -3, "a whole number >= 0"),
    ("epoch", "half", "a number >= 0"),
    ("label_names", 5, "a list of at least two distinct label strings"),
    ("label_names", ["a", 1], "a list of at least two distinct label strings"),
    ("label_names", ["a", "a"], "a list of at least two distinct label strings"),
    ("model", "abc", "a mapping (the recipe's model section"),
    ("model", {"task": "causal-lm"}, "lacks key 'model.name'"),
    ("model.name", 7, "valid string"),
    ("model.num_labels", "two", "valid integer"),
    ("model.revision", ["main"], "valid string"),
    ("task", 3, "one of causal-lm, seq-cls"),
    ("task", "regression", "one of causal-lm, seq-cls"),
    ("method", ["lora"], "a method name (a string)"),
    ("files", [], "a mapping of file names to"),
    ("files", {"delta.safetensors": {"bytes": "12", "sha256": "00"}}, "a mapping of file names to"),
    ("format_version", "1", "a whole number"),
    ("deltafit_version", 1, "a version string"),
    ("delta_config", [], "a mapping of the method's options"),
]


@pytest.mark.parametrize("key, value, expected", META_DAMAGES, ids=[f"{k}={json.dumps(v)}" for k, v, _ in META_DAMAGES])
def test_wrong_types_in_checkpoint_metadata_are_refused(run_copy, capsys, key, value, expected):
    final = run_copy / "final"
    damage_meta(final, **{key: value})
    line = one_error_line(*run_cli(capsys, "eval", final), f"'{final}'", "deltafit.json", f"key '{key}", expected)
    assert "lacks" in expected or f"got {json.dumps(value)}" in line


@pytest.mark.parametrize("command", ["merge", "export", "resume"])
def test_every_command_reads_the_metadata_through_the_check(run_copy, tmp_path, capsys, command):
    step = run_copy / "checkpoints" / "step-00000001"
    target = step if command == "resume" else run_copy / "final"
    damage_meta(target, label_names=5)
    argv = {"merge": ["merge", target, "--output", tmp_path / "merged"],
            "export": ["export", target, "--format", "peft", "--output", tmp_path / "adapter"],
            "resume": ["train", run_copy / "final" / "recipe.yaml", "--output", run_copy, "--resume", target]}[command]
    one_error_line(*run_cli(capsys, *argv), "deltafit.json", "key 'label_names'", "got 5")


def test_a_step_that_is_a_string_is_refused_real_process(run_copy, tmp_path):
    damage_meta(run_copy / "final", step="x")
    result = run_process(tmp_path, "export", run_copy / "final", "--format", "peft", "--output", tmp_path / "a")
    process_error(result, "deltafit.json", "key 'step' must be a whole number >= 0", 'got "x"')


def test_metadata_without_optional_fields_is_still_read(run_copy):
    """Older or hand-written metadata may lack the optional fields: only those present are checked."""
    from deltafit import checkpoint

    final = run_copy / "final"
    meta = json.loads((final / "deltafit.json").read_text())
    meta = {k: meta[k] for k in ("format", "method", "delta_config", "model", "task")}
    meta["model"]["from_an_older_deltafit"] = True  # unknown model keys are not this check's business
    (final / "deltafit.json").write_text(json.dumps(meta))
    assert checkpoint.read_meta(final)["method"] == "lora"


# ----------------------------------------------------------------------------------------------
# 4. PEFT adapter_config.json with null or wrongly typed fields

PEFT_METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "vera": {"method": "vera", "r": 4},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3},
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """One PEFT adapter per importable method, exported from a saved deltafit checkpoint of the tiny Llama."""
    import torch

    from deltafit import checkpoint, deltas
    from deltafit.model import build_model
    from deltafit.peft_io import export_checkpoint
    from deltafit.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("hostile-adapters")
    out = {}
    for name, delta in PEFT_METHODS.items():
        recipe = recipe_from_dict({"model": {"name": str(tiny_llama)}, "data": {"train": "unused.json"},
                                   "delta": delta})
        model, _, head = build_model(recipe.model)
        torch.manual_seed(0)
        attached = deltas.build(recipe.delta)
        attached.attach(model, head=head)
        meta = checkpoint.metadata(recipe, attached, None, step=3, epoch=0.0)
        checkpoint.save(root / f"{name}-ckpt", meta, attached.final_state_dict(), recipe.to_dict())
        export_checkpoint(str(root / f"{name}-ckpt"), str(root / name))
        out[name] = root / name
    return out


def edited_adapter(adapters: dict, method: str, where: Path, **changes) -> Path:
    shutil.copytree(adapters[method], where)
    config = json.loads((where / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (where / "adapter_config.json").write_text(json.dumps(config))
    return where


# (method, adapter_config.json key, bad value, what the message says); ... removes the key
PEFT_DAMAGES = [
    ("lora", "r", None, "a whole number >= 1"),
    ("lora", "r", "8", "a whole number >= 1"),
    ("lora", "r", ..., "lacks 'r'"),
    ("lora", "lora_alpha", None, "a number"),
    ("lora", "lora_dropout", "0.1", "a number or null"),
    ("lora", "use_rslora", "false", "true, false or null"),
    ("lora", "peft_type", None, "a PEFT type name"),
    ("lora", "task_type", None, "task_type null is not supported"),
    ("lora", "task_type", ["CAUSAL_LM"], "task_type ['CAUSAL_LM'] is not supported"),
    ("lora", "modules_to_save", [1], "null or a list of module names"),
    ("lora", "base_model_name_or_path", 5, "a model name or path"),
    ("lora", "revision", 1, "a revision name"),
    ("vera", "r", None, "a whole number >= 1"),
    ("vera", "d_initial", None, "a number"),
    ("vera", "projection_prng_key", "seed", "a whole number or null"),
    ("adalora", "init_r", "x", "a whole number >= 1 or null"),
    ("adalora", "target_r", [], "a whole number or null"),
    ("adalora", "beta1", "0.85", "a number or null"),
    ("prefix", "num_transformer_submodules", "1", "a whole number or null"),
    ("prompt", "num_transformer_submodules", [1], "a whole number or null"),
]


@pytest.mark.parametrize("method, key, value, expected", PEFT_DAMAGES,
                         ids=[f"{m}-{k}={'absent' if v is ... else json.dumps(v)}" for m, k, v, _ in PEFT_DAMAGES])
def test_wrong_types_in_a_peft_config_are_refused(adapters, tmp_path, tiny_llama, alpaca_file, capsys,
                                                  method, key, value, expected):
    adapter = edited_adapter(adapters, method, tmp_path / "adapter", **{key: value})
    line = one_error_line(*run_cli(capsys, "eval", adapter, "--data", alpaca_file, "--base-model", tiny_llama),
                          f"'{adapter}'", "adapter_config.json", expected)
    assert f"'{key}'" in line or f"{key} " in line


@pytest.mark.parametrize("key", ["target_modules", "lora_dropout", "use_rslora", "bias", "inference_mode"])
def test_null_where_the_import_has_a_default_is_accepted(adapters, tmp_path, key):
    """target_modules is not read (the tensors name the modules); the others default as in PEFT."""
    from deltafit.loading import load_source

    _, meta, _ = load_source(str(edited_adapter(adapters, "lora", tmp_path / "adapter", **{key: None})))
    assert meta["method"] == "lora" and meta["delta_config"]["r"] == 4


def test_every_config_field_of_every_method_is_either_read_or_refused(adapters, tmp_path):
    """Each field of each exported config, set to values of every JSON type: the import either
    works (the field is not read, or null means its default) or is a UserError; never anything else."""
    from deltafit.loading import load_source, source_recipe
    from deltafit.recipe import validate_delta

    tried = 0
    for method, adapter in adapters.items():
        config = json.loads((adapter / "adapter_config.json").read_text())
        for key in config:
            for value in (None, "x", [1], {"a": 1}, True, -1.5):
                where = tmp_path / f"{method}-{key}-{tried}"
                tried += 1
                try:
                    directory, meta, _ = load_source(str(edited_adapter(adapters, method, where, **{key: value})))
                    validate_delta(meta["delta_config"])
                    source_recipe(directory, meta)
                except UserError:
                    pass
                shutil.rmtree(where)
    assert tried > 100


def test_a_null_rank_is_refused_real_process(adapters, tmp_path):
    adapter = edited_adapter(adapters, "lora", tmp_path / "adapter", r=None)
    result = run_process(tmp_path, "merge", adapter, "--output", tmp_path / "merged")
    process_error(result, f"PEFT adapter '{adapter}'", "adapter_config.json key 'r' must be a whole number >= 1",
                  "got null")


# ----------------------------------------------------------------------------------------------
# 5. JSON that is valid but used to break the reader


def alpaca_recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", model, {"train": str(data), "format": "alpaca"})


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])  # json.dumps escapes \x0b, \x0c
def test_line_separators_inside_json_lines_strings_are_text(tmp_path, tiny_llama, capsys, char):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+0085 and the like raw inside a string; a JSON
    lines file ends its lines at \\n only, so each row stays one record with the character in it."""
    from deltafit.data.sources import _read_json

    rows = [{"instruction": f"Say{char}{i}.", "input": "", "output": f"{i}{char}done"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert _read_json(data)["instruction"] == [r["instruction"] for r in rows]
    code, out, err = run_cli(capsys, "validate", alpaca_recipe(tmp_path, tiny_llama, data))
    assert code == 0, err


@pytest.mark.parametrize("value", [2**64 - 1, 2**70, -(2**63) - 1])
def test_a_whole_number_beyond_64_bits_is_refused_naming_its_column(tmp_path, tiny_llama, capsys, value):
    """Arrow's integers are 64-bit; an id column of uint64 hashes used to end in an OverflowError."""
    rows = [{"id": value if i == 3 else i, "instruction": f"Say {i}.", "output": str(i)} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    one_error_line(*run_cli(capsys, "validate", alpaca_recipe(tmp_path, tiny_llama, data)),
                   str(data), "64-bit", "column 'id' (row 4)", "as strings")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_past_the_recursion_limit_is_refused(tmp_path, tiny_llama, capsys, suffix):
    deep = "[" * 5000 + "]" * 5000
    row = f'{{"instruction": {deep}, "output": "b"}}'
    data = tmp_path / f"train{suffix}"
    data.write_text(f"[{row}]" if suffix == ".json" else row + '\n{"instruction": "a", "output": "b"}\n')
    one_error_line(*run_cli(capsys, "validate", alpaca_recipe(tmp_path, tiny_llama, data)),
                   str(data), "too deeply")
