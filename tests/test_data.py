"""The data pipeline: loading, formats, masking, truncation, splits, collation and user errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from deltafit.data import describe_data, load_rows, make_collator, prepare_data
from deltafit.errors import UserError
from deltafit.recipe import DataSpec

# The first rows of GLUE files, committed with the tests (tests/fixtures/README.md gives source and counts).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RTE_DEV = FIXTURES / "glue_rte_dev_100.tsv"  # 100 rows: 52 entailment, 48 not_entailment
SST2_DEV = FIXTURES / "glue_sst2_dev_200.tsv"  # 200 rows
SST2_TRAIN = FIXTURES / "glue_sst2_train_300.tsv"  # 300 rows

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:\n"
)
INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n"
    "### Response:\n"
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)  # no pad token, no BOS by default, has a chat template


@pytest.fixture(scope="module")
def bos_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama, add_bos_token=True)


def write_json(path, rows, lines=False):
    path.write_text("\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows), encoding="utf-8")
    return path


def prep(tokenizer, task="causal-lm", seed=0, **spec):
    # One example per row, as encoded: packing (the causal-LM default) is tested in test_packing.py.
    spec.setdefault("packing", False)
    return prepare_data(DataSpec(**spec), tokenizer, task, seed)


def masked_prefix(labels):
    """How many leading labels are -100, checking that none after them are."""
    n = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label != -100 for label in labels[n:])
    return n


def trained_runs(tokenizer, ex):
    """Decoded text of each contiguous run of trained (label != -100) positions."""
    runs, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


# ----------------------------------------------------------------------------------------------
# Formats and masking


def test_alpaca_masks_exactly_the_prompt_and_appends_eos(tok, alpaca_file):
    data = prep(tok, train=str(alpaca_file))
    ex = data.train[0]
    n = masked_prefix(ex["labels"])
    assert tok.decode(ex["input_ids"][:n]) == NO_INPUT_PROMPT.format("Add 0 and 1.")
    assert ex["input_ids"][n:] == tok("1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert len(data.train) == 24 and data.eval is None and data.label_names is None
    assert data.stats["train_rows"] == 24 and data.stats["train_truncated"] == 0


def test_alpaca_with_input_uses_the_input_template(tok, tmp_path):
    path = write_json(tmp_path / "a.json", [{"instruction": "Translate.", "input": "hello world", "output": "bonjour"}])
    ex = prep(tok, train=str(path)).train[0]
    n = masked_prefix(ex["labels"])
    assert tok.decode(ex["input_ids"][:n]) == INPUT_PROMPT.format("Translate.", "hello world")
    assert tok.decode(ex["input_ids"][n:]) == "bonjour</s>"


def test_train_on_inputs_unmasks_the_prompt(tok, alpaca_file):
    ex = prep(tok, train=str(alpaca_file), train_on_inputs=True).train[0]
    assert ex["labels"] == ex["input_ids"]


def test_bos_is_added_when_the_tokenizer_adds_it(bos_tok, alpaca_file):
    ex = prep(bos_tok, train=str(alpaca_file)).train[0]
    assert ex["input_ids"][0] == bos_tok.bos_token_id and ex["input_ids"][1] != bos_tok.bos_token_id
    assert ex["labels"][0] == -100 and ex["input_ids"][-1] == bos_tok.eos_token_id


def test_no_bos_when_the_tokenizer_adds_none(tok, alpaca_file):
    assert tok.bos_token_id not in prep(tok, train=str(alpaca_file)).train[0]["input_ids"]


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "and the cat?"},
    {"role": "assistant", "content": "it sat on the mat"},
]


def test_chat_trains_only_assistant_turns(tok, tmp_path):
    path = write_json(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}], lines=True)
    ex = prep(tok, train=str(path), format="chat").train[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # Each assistant turn trains on its content and the template's end-of-turn (here EOS), nothing else.
    assert trained_runs(tok, ex) == ["hello world</s>", "it sat on the mat</s>"]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_chat_train_on_inputs_and_conversations_without_replies(tok, tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}]
    path = write_json(tmp_path / "chat.json", rows)
    data = prep(tok, train=str(path), format="chat")
    assert len(data.train) == 1 and data.stats["train_dropped"] == 1  # nothing to learn from a user-only chat
    full = prep(tok, train=str(path), format="chat", train_on_inputs=True)
    assert len(full.train) == 2 and all(ex["labels"] == ex["input_ids"] for ex in full.train)


def test_chat_template_writing_bos_gets_no_second_bos(bos_tok, tmp_path):
    bos_tok = bos_tok.__class__.from_pretrained(bos_tok.name_or_path, add_bos_token=True)
    bos_tok.chat_template = "{{ bos_token }}" + bos_tok.chat_template
    path = write_json(tmp_path / "chat.json", [{"messages": CONVERSATION}])
    ex = prep(bos_tok, train=str(path), format="chat").train[0]
    assert ex["input_ids"][0] == bos_tok.bos_token_id and ex["input_ids"].count(bos_tok.bos_token_id) == 1


def test_completion_plain_text_trains_every_token(tok, tmp_path):
    path = write_json(tmp_path / "c.json", [{"text": "the cat sat on the mat"}])
    ex = prep(tok, train=str(path), format="completion").train[0]
    assert ex["input_ids"] == tok("the cat sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"]


def test_completion_with_prompt_column_masks_the_prompt(tok, tmp_path):
    path = write_json(tmp_path / "c.json", [{"q": "What is the capital of France?", "a": " Paris."}])
    ex = prep(tok, train=str(path), format="completion", prompt_column="q", text_column="a").train[0]
    n = masked_prefix(ex["labels"])
    assert n == len(tok("What is the capital of France?", add_special_tokens=False)["input_ids"])
    assert tok.decode(ex["input_ids"][n:]) == " Paris.</s>"


# ----------------------------------------------------------------------------------------------
# Classification


def test_classification_string_labels_and_text_pairs(tok):
    data = prep(tok, "seq-cls", train=str(RTE_DEV), format="classification", text_column="sentence1",
                text_pair_column="sentence2", max_length=4096)
    assert data.label_names == ["entailment", "not_entailment"]
    with open(RTE_DEV, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(data.train) == len(rows) == 100
    for ex, row in zip(data.train, rows):  # one row has an unbalanced double quote: plain text in a TSV
        assert ex["labels"] == data.label_names.index(row["label"])
        assert ex["input_ids"] == tok(row["sentence1"], row["sentence2"])["input_ids"]
    assert sum(ex["labels"] for ex in data.train) == 48  # not_entailment rows (fixtures/README.md)


def test_classification_numeric_labels_from_tsv(tok):
    data = prep(tok, "seq-cls", train=str(SST2_DEV), format="classification", text_column="sentence", max_length=4096)
    assert data.label_names == ["0", "1"] and len(data.train) == 200
    with open(SST2_DEV, encoding="utf-8", newline="") as f:
        labels = [int(r["label"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert [ex["labels"] for ex in data.train] == labels


def test_numeric_labels_sort_numerically(tok, tmp_path):
    rows = [{"text": f"row {i}", "label": label} for i, label in enumerate([10, 2, 1, 2.0, "10"])]
    path = write_json(tmp_path / "n.json", [dict(r, label=str(r["label"])) for r in rows])
    data = prep(tok, "seq-cls", train=str(path), format="classification")
    assert data.label_names == ["1", "2", "10"]
    assert [ex["labels"] for ex in data.train] == [2, 1, 0, 1, 2]


def test_saved_label_names_are_used_and_unknown_eval_labels_rejected(tok, cls_file, tmp_path):
    spec = DataSpec(train=str(cls_file), format="classification", text_column="sentence")
    data = prepare_data(spec, tok, "seq-cls", 0, label_names=["pos", "neg"])
    assert data.label_names == ["pos", "neg"] and data.train[0]["labels"] == 1  # row 0 is 'neg'
    bad = tmp_path / "eval.tsv"
    bad.write_text("sentence\tlabel\nso so\tneutral\n")
    with pytest.raises(UserError, match=r"'neutral'.*pos, neg"):
        prepare_data(spec.model_copy(update={"eval": str(bad)}), tok, "seq-cls", 0, label_names=["pos", "neg"])
    with pytest.raises(UserError, match=r"'neutral'.*neg, pos"):  # labels learned from data.train
        prepare_data(spec.model_copy(update={"eval": str(bad)}), tok, "seq-cls", 0)


def test_eval_only_uses_the_checkpoint_labels(tok, cls_file):
    spec = DataSpec(train=str(cls_file), eval=str(cls_file), format="classification", text_column="sentence")
    data = prepare_data(spec, tok, "seq-cls", 0, label_names=["neg", "pos"], want_train=False)
    assert data.train is None and len(data.eval) == 32 and data.eval[1]["labels"] == 1


# ----------------------------------------------------------------------------------------------
# Truncation


def test_truncation_is_counted_and_fully_masked_examples_dropped(tok, tmp_path):
    rows = [
        {"q": "hello world " * 20, "a": "x"},  # the prompt alone fills max_length: nothing left to learn
        {"q": "hi", "a": "the cat sat on the mat " * 10},  # truncated, still has trained tokens
        {"q": "hi", "a": "ok"},
    ]
    path = write_json(tmp_path / "t.json", rows)
    spec = dict(train=str(path), format="completion", prompt_column="q", text_column="a")
    full = prep(tok, max_length=4096, **spec).train
    data = prep(tok, max_length=16, **spec)
    assert data.stats["train_truncated"] == 2 and data.stats["train_dropped"] == 1
    assert [ex["input_ids"] for ex in data.train] == [full[1]["input_ids"][:16], full[2]["input_ids"]]
    assert [ex["labels"] for ex in data.train] == [full[1]["labels"][:16], full[2]["labels"]]
    assert data.stats["train_tokens"] == 16 + len(full[2]["input_ids"])


@pytest.mark.parametrize("blank", [None, "", "  \n"], ids=["null", "empty", "spaces"])
def test_alpaca_rows_with_a_blank_output_are_dropped_and_counted(tok, tmp_path, blank):
    """Such a row would only teach the model to stop at once (its one trained token is EOS)."""
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(4)]
    blanks = [{"instruction": "Say nothing."}] if blank is None else [{"instruction": "Say nothing.", "output": blank}]
    full = prep(tok, train=str(write_json(tmp_path / "a.json", rows)), format="alpaca")
    data = prep(tok, train=str(write_json(tmp_path / "b.json", rows[:2] + blanks + rows[2:])), format="alpaca")
    assert data.train == full.train and data.stats["train_dropped"] == 1 and data.stats["train_rows"] == 5
    # With train_on_inputs the prompt is trained on too, so the row has something to teach.
    kept = prep(tok, train=str(tmp_path / "b.json"), format="alpaca", train_on_inputs=True)
    assert len(kept.train) == 5 and kept.stats["train_dropped"] == 0


def test_classification_truncation_counts(tok):
    data = prep(tok, "seq-cls", train=str(SST2_DEV), format="classification", text_column="sentence", max_length=8)
    full = prep(tok, "seq-cls", train=str(SST2_DEV), format="classification", text_column="sentence", max_length=4096)
    assert data.stats["train_truncated"] == sum(len(ex["input_ids"]) > 8 for ex in full.train) > 0
    assert all(len(ex["input_ids"]) <= 8 for ex in data.train) and len(data.train) == 200


# ----------------------------------------------------------------------------------------------
# Evaluation splits and caps


def test_eval_fraction_is_a_seeded_disjoint_holdout(tok, alpaca_file):
    def split(seed):
        data = prep(tok, seed=seed, train=str(alpaca_file), eval_fraction=0.25)
        return [tuple(ex["input_ids"]) for ex in data.train], [tuple(ex["input_ids"]) for ex in data.eval]

    train, held = split(1)
    assert len(train) == 18 and len(held) == 6 and not set(train) & set(held)
    assert split(1) == (train, held) and split(2)[1] != held


def test_eval_file_and_max_examples(tok, alpaca_file):
    data = prep(tok, train=str(alpaca_file), eval=str(alpaca_file), max_train_examples=5, max_eval_examples=3)
    every = prep(tok, train=str(alpaca_file)).train
    assert len(data.train) == 5 and len(data.eval) == 3
    assert [ex["input_ids"] for ex in data.eval] == [ex["input_ids"] for ex in every[:3]]  # eval: first N, in order
    assert [ex["input_ids"] for ex in data.train] != [ex["input_ids"] for ex in every[:5]]  # train: shuffled first
    again = prep(tok, train=str(alpaca_file), max_train_examples=5).train
    assert again == data.train and data.stats["eval_rows"] == 3


def test_eval_split_of_a_dataset_folder(tok, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_json(folder / "train.jsonl", [{"text": f"row {i}"} for i in range(5)], lines=True)
    write_json(folder / "validation.jsonl", [{"text": "held out"}], lines=True)
    data = prep(tok, train=str(folder), format="completion", eval_split="validation")
    assert len(data.train) == 5 and len(data.eval) == 1
    assert tok.decode(data.eval[0]["input_ids"]) == "held out</s>"


def test_eval_split_is_routed_to_the_hub_loader(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load(source, config=None, split=None):
        calls.append((source, config, split))
        return datasets.Dataset.from_dict({"sentence": [f"{split} a", f"{split} b"], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    # Without the data cache, whose key would load each split once more to read its fingerprint.
    data = prep(tok, "seq-cls", train="glue", config="sst2", eval_split="validation", format="classification",
                text_column="sentence", cache=False)
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert len(data.train) == 2 and len(data.eval) == 2 and data.label_names == ["0", "1"]


def test_describe_data_on_sst2_is_tokenizer_free():
    spec = DataSpec(train=str(SST2_TRAIN), eval=str(SST2_DEV), format="classification", text_column="sentence")
    info = describe_data(spec)
    assert info["train_rows"] == 300 and info["eval_rows"] == 200
    assert info["columns"] == ["sentence", "label"] and str(SST2_DEV) in info["eval_source"]
    assert info["labels"] == ["0", "1"]
    held = describe_data(spec.model_copy(update={"eval": None, "eval_fraction": 0.1}))
    assert held["eval_rows"] == 30 and held["train_rows"] == 300 - 30


# ----------------------------------------------------------------------------------------------
# Loading


def test_file_kinds_load_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": '"an unbalanced, quote', "label": "x"}, {"text": "b", "label": "y"}]
    write_json(tmp_path / "r.json", rows)
    write_json(tmp_path / "r.jsonl", rows, lines=True)
    with open(tmp_path / "r.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "r.tsv").write_text('text\tlabel\n"an unbalanced, quote\tx\nb\ty\n')  # quotes are plain text in TSV
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    for ext in ("json", "jsonl", "csv", "tsv", "parquet"):
        ds = load_rows(str(tmp_path / f"r.{ext}"), None, "train")
        assert ds.column_names == ["text", "label"] and list(ds["text"]) == [r["text"] for r in rows], ext


def test_collator_pads_right_to_the_longest(tok, alpaca_file):
    data = prep(tok, train=str(alpaca_file))
    batch = make_collator(None, "causal-lm")(data.train[:2] + [data.train[10]])
    long = max(len(ex["input_ids"]) for ex in data.train[:2] + [data.train[10]])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, long)
    for row, ex in enumerate(data.train[:2] + [data.train[10]]):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert batch["labels"][row, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (long - n)
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == 0).all()
    cls = make_collator(7, "seq-cls")([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
                                        {"input_ids": [4], "attention_mask": [1], "labels": 0}])
    assert cls["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]] and cls["labels"].tolist() == [1, 0]
    assert cls["labels"].dtype == torch.long


# ----------------------------------------------------------------------------------------------
# User errors: one line naming the recipe key and what would be valid


def test_missing_files_name_the_recipe_key(tok, tmp_path, alpaca_file):
    with pytest.raises(UserError, match=r"data\.train.*nope\.json.*does not exist"):
        prep(tok, train=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match=r"data\.eval\b.*dev\.tsv.*does not exist"):
        prep(tok, train=str(alpaca_file), eval="data/dev.tsv")
    with pytest.raises(UserError, match=r"data\.train.*does not exist"):
        describe_data(DataSpec(train="some/dir/file"))


def test_missing_column_suggests_the_close_one(tok, cls_file):
    with pytest.raises(UserError) as err:
        prep(tok, "seq-cls", train=str(cls_file), format="classification", text_column="sentence", label_column="lable")
    message = str(err.value)
    assert "data.label_column" in message and "'lable'" in message and "did you mean 'label'" in message
    assert "available columns: sentence, label" in message and "\n" not in message
    with pytest.raises(UserError, match=r"data\.text_column.*'sentenc'.*did you mean 'sentence'"):
        describe_data(DataSpec(train=str(cls_file), format="classification", text_column="sentenc"))


@pytest.mark.parametrize("name, content, pattern", [
    ("empty.csv", "text,label\n", r"has no rows"),
    ("empty.json", "[]", r"has no rows"),
    ("blank.tsv", "", r"has no rows"),
    ("obj.json", '{"data": [{"text": "a"}]}', r"not a list of records"),
    ("nums.json", "[1, 2, 3]", r"not a list of records"),
    ("broken.json", '[{"text": "a"', r"not valid JSON"),
    ("ragged.tsv", "text\tlabel\na\tb\tc\n", r"line 2 has 3 fields"),
])
def test_bad_files(tok, tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=rf"data\.train.*{pattern}"):
        prep(tok, train=str(path), format="completion")


def test_non_utf8_file_is_named(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"data\.train.*latin1\.jsonl.*not UTF-8"):
        prep(tok, train=str(path), format="completion")


def test_chat_needs_a_chat_template(tok, tmp_path):
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = None
    path = write_json(tmp_path / "chat.json", [{"messages": CONVERSATION}])
    with pytest.raises(UserError, match=r"data\.format.*chat template"):
        prep(plain, train=str(path), format="chat")


def test_hub_failure_is_a_user_error(tok, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode makes the real load_dataset fail at once instead of retrying the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"data\.train.*'nobody/no-such-dataset'.*could not be loaded \(offline\?"):
        prep(tok, train="nobody/no-such-dataset")


def test_format_must_match_the_task_and_eval_options_must_not_conflict(tok, alpaca_file, tmp_path):
    with pytest.raises(UserError, match=r"data\.format.*seq-cls"):
        prep(tok, "seq-cls", train=str(alpaca_file))
    with pytest.raises(UserError, match=r"data\.eval_fraction"):
        prep(tok, train=str(alpaca_file), eval=str(alpaca_file), eval_fraction=0.1)
    with pytest.raises(UserError, match=r"data\.eval_split.*single file"):
        prep(tok, train=str(alpaca_file), eval_split="validation")
    with pytest.raises(UserError, match=r"data\.label_column.*only one distinct value in data\.train \(\d+\)"):
        prep(tok, "seq-cls", train=str(alpaca_file), format="classification", text_column="instruction",
             label_column="output", max_train_examples=1)
    two = write_json(tmp_path / "two_classes.json",
                     [{"instruction": "good", "output": "x"}, {"instruction": "bad", "output": "y"}])
    with pytest.raises(UserError, match=r"only one distinct value in data\.train \([xy]\) once "
                                        r"data\.eval_fraction=0\.5 held rows out.*lower it, or give data\.eval"):
        prep(tok, "seq-cls", train=str(two), format="classification", text_column="instruction",
             label_column="output", eval_fraction=0.5)
    with pytest.raises(UserError, match=r"data\.label_column.*no value in column 'input'"):
        prep(tok, "seq-cls", train=str(alpaca_file), format="classification", text_column="instruction",
             label_column="input")
