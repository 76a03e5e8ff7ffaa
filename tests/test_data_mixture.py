"""Training mixtures (`data.train` as a list of {source, weight, ...}): shares, seeded order, per-source
formats, the cache key, `validate`'s table, one-line errors, and a training run."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from deltafit.data import describe_data, prepare_data
from deltafit.data.cache import _cache_key
from deltafit.data.mixture import draw, mix, mixture_counts
from deltafit.recipe import DataSpec, recipe_from_dict
from tests.helpers import assert_one_clean_line, run_cli, write_recipe


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def sources(tmp_path):
    alpaca = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"alpha {i}", "output": f"ok {i}"} for i in range(60)])
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"beta {i}"},
                                                         {"role": "assistant", "content": f"yes {i}"}]}
                                           for i in range(40)])
    return alpaca, chat


def mixture(alpaca, chat, w_alpaca=1.0, w_chat=3.0, **data):
    return DataSpec(train=[{"source": alpaca, "weight": w_alpaca},
                           {"source": chat, "weight": w_chat, "format": "chat"}], packing=False, **data)


def origin(tok, example) -> str:
    text = tok.decode(example["input_ids"])
    return "alpaca" if "### Instruction" in text else "chat" if "beta" in text else "?"


def test_counts_follow_the_weights_and_add_up():
    assert mixture_counts([60, 40], [1, 3]) == [25, 75]
    assert mixture_counts([60, 40], [1, 1, ][:2], cap=9) == [5, 4]  # largest remainder, ties to the first
    assert sum(mixture_counts([7, 5, 3], [0.3, 0.2, 0.5])) == 15
    counts = Counter(draw(10, 4, __import__("random").Random(0)))
    assert sorted(counts.values()) == [2, 2, 3, 3]  # upsampled: whole passes before any third repeat


def test_shares_match_weights_and_each_source_keeps_its_format(tok, sources):
    prepared = prepare_data(mixture(*sources), tok, "causal-lm", seed=0)
    kinds = Counter(origin(tok, ex) for ex in prepared.train)
    assert kinds == {"alpaca": 25, "chat": 75}  # 100 examples, shares 1/4 and 3/4
    rows = prepared.stats["train_mixture"]
    assert [(r["rows"], r["drawn"], r["share"]) for r in rows] == [(60, 25, 0.25), (40, 75, 0.75)]
    assert prepared.stats["train_examples"] == 100 and prepared.stats["train_rows"] == 100
    # alpaca prompts are masked up to the response; chat trains only the assistant turn
    first_chat = next(ex for ex in prepared.train if origin(tok, ex) == "chat")
    trained = tok.decode([t for t, label in zip(first_chat["input_ids"], first_chat["labels"]) if label != -100])
    assert "yes" in trained and "beta" not in trained


def test_downsampled_sources_repeat_nothing_and_the_cap_sizes_the_mixture(tok, sources):
    prepared = prepare_data(mixture(*sources, max_train_examples=40), tok, "causal-lm", seed=0)
    assert len(prepared.train) == 40
    texts = [tuple(ex["input_ids"]) for ex in prepared.train if origin(tok, ex) == "chat"]
    assert len(texts) == 30 and len(set(texts)) == 30  # 30 of the 40 chat rows, none twice


def test_the_mixture_is_seeded(tok, sources):
    spec = mixture(*sources, cache=False)
    ids = [[tuple(ex["input_ids"]) for ex in prepare_data(spec, tok, "causal-lm", seed).train] for seed in (0, 0, 1)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert Counter(ids[0]) != Counter(ids[2]) or ids[0] != ids[2]
    picked, _ = mix([list(range(50)), list(range(100, 150))], [1, 1], seed=3)
    assert picked == mix([list(range(50)), list(range(100, 150))], [1, 1], seed=3)[0]


def test_cache_key_includes_the_mixture(tok, sources):
    keys = {_cache_key(spec, tok, "causal-lm", 0, None, True)
            for spec in (mixture(*sources), mixture(*sources, w_chat=2.0), mixture(*sources[::-1]))}
    assert len(keys) == 3
    assert _cache_key(mixture(*sources), tok, "causal-lm", 0, None, True) != \
        _cache_key(mixture(*sources), tok, "causal-lm", 1, None, True)  # the seed picks the rows


def test_describe_data_gives_each_source_its_rows_and_share(sources):
    info = describe_data(mixture(*sources))
    assert info["train_rows"] == 100
    assert [(m["key"], m["rows"], m["share"], m["drawn"]) for m in info["mixture"]] == [
        ("data.train.0", 60, 0.25, 25), ("data.train.1", 40, 0.75, 75)]


def test_classification_mixture_with_its_own_columns(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    a = jsonl(tmp_path / "a.jsonl", [{"text": f"good {i}", "label": "pos"} for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [{"sentence": f"bad {i}", "y": "neg"} for i in range(10)])
    spec = DataSpec(train=[{"source": a}, {"source": b, "text_column": "sentence", "label_column": "y"}],
                    format="classification")
    prepared = prepare_data(spec, AutoTokenizer.from_pretrained(tiny_bert), "seq-cls", 0)
    assert prepared.label_names == ["neg", "pos"]
    assert Counter(ex["labels"] for ex in prepared.train) == {0: 10, 1: 10}
    assert describe_data(spec)["labels"] == ["neg", "pos"]


def test_a_single_source_is_still_a_string(sources):
    spec = DataSpec(train=sources[0])
    assert spec.train == sources[0] and "mixture" not in describe_data(spec)


@pytest.mark.parametrize(("override", "needles"), [
    ("data.train.1.weight=0", ["data.train.1.weight", "greater than 0"]),
    ("data.train.1.weight=-2", ["data.train.1.weight"]),
    ("data.train=[]", ["data.train", "at least 1"]),
    ("data.train.0.colour=red", ["unknown recipe key 'data.train.0.colour'", "weight"]),
    ("data.train.0.format=classification", ["data.train.0.format", "causal-lm"]),
    ("data.train.0.prompt_template={prompt}:", ["data.train.0.prompt_template"]),
    ("data.eval_fraction=0.1", ["data.eval_fraction", "mixture"]),
    ("data.eval_split=validation", ["data.eval_split", "data.eval"]),
    ("data.train.5.weight=1", ["data.train.5.weight", "no entry"]),
])
def test_bad_mixtures_are_one_line_errors(capsys, tmp_path, tiny_llama, sources, override, needles):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": [{"source": sources[0]}, {"source": sources[1], "format": "chat"}]})
    code, out, err = run_cli(capsys, "validate", recipe, "--set", override)
    assert_one_clean_line(code, err, *needles, out=out)


def test_a_missing_column_names_the_source(capsys, tmp_path, tiny_llama, sources):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": [{"source": sources[0]}, {"source": sources[1]}]})  # chat rows read as alpaca
    code, out, err = run_cli(capsys, "validate", recipe)
    assert_one_clean_line(code, err, "data.instruction_column", "data.train.1", out=out)


def test_validate_prints_each_source(capsys, tmp_path, tiny_llama, sources):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": [
        {"source": sources[0], "weight": 1}, {"source": sources[1], "weight": 3, "format": "chat"}]})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert code == 0, err
    flat = " ".join(out.replace("│", " ").split())  # wrapped cells read on: the key column is blank there
    assert "mixture of 2 sources" in flat
    assert "(alpaca): 60 rows, weight 1, share 25.0% = 25 rows" in flat
    assert "(chat): 40 rows, weight 3, share 75.0% = 75 rows (upsampled)" in flat


def test_schema_describes_the_mixture():
    from deltafit.recipe import recipe_schema

    schema = recipe_schema()
    train = schema["$defs"]["DataSpec"]["properties"]["train"]
    assert {"$ref": "#/$defs/TrainSource"} in [branch.get("items") for branch in train["anyOf"]]
    assert schema["$defs"]["TrainSource"]["properties"]["weight"]["exclusiveMinimum"] == 0


def test_trains_and_resumes_from_a_mixture(capsys, tmp_path, tiny_llama, sources):
    data = {"train": [{"source": sources[0], "weight": 1}, {"source": sources[1], "weight": 1, "format": "chat"}],
            "max_length": 256}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, data, train={"max_steps": 2, "save_every": 1})
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--output", out_dir)
    assert code == 0, err
    assert (out_dir / "final").is_dir()
    saved = recipe_from_dict(__import__("yaml").safe_load((out_dir / "final" / "recipe.yaml").read_text()))
    assert [entry.source for entry in saved.data.train] == list(sources)
    # the same mixture resumes; another weight is a changed data.train
    code, _, err = run_cli(capsys, "train", recipe, "--output", out_dir, "--resume", "--set", "train.max_steps=3")
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", recipe, "--output", out_dir, "--resume",
                             "--set", "data.train.1.weight=2", "--set", "train.max_steps=4")
    assert_one_clean_line(code, err, "data.train", out=out)
