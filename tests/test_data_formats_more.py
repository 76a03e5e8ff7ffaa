"""The data formats users bring (issue 13): ShareGPT chat rows, header-less CSV/TSV files (GLUE's
CoLA) named by data.columns, and TSV quotes read literally."""

from __future__ import annotations

import pytest

from deltafit.data import describe_data, load_rows, prepare_data
from deltafit.errors import UserError
from deltafit.recipe import DataSpec, recipe_from_dict
from tests.helpers import assert_one_clean_line, run_cli, write_recipe
from tests.test_data import CONVERSATION, trained_runs, write_json

SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
COLA = ["source", "label", "orig", "sentence"]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)  # has a chat template


def prep(tokenizer, task="causal-lm", **spec):
    # Unpacked (one example per row) and uncached: these tests are about how rows encode.
    return prepare_data(DataSpec(packing=False, cache=False, **spec), tokenizer, task, 0)


def sharegpt(messages, speakers=SHAREGPT_FROM):
    return [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]


# ----------------------------------------------------------------------------------------------
# ShareGPT chat rows


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_sharegpt_rows_encode_exactly_like_messages_rows(tok, tmp_path, train_on_inputs):
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:4]]
    openai = write_json(tmp_path / "openai.jsonl", [{"messages": c} for c in conversations], lines=True)
    # No data.messages_column: the default finds ShareGPT's 'conversations' column.
    share = write_json(tmp_path / "share.jsonl", [{"conversations": sharegpt(c)} for c in conversations], lines=True)
    want = prep(tok, train=str(openai), format="chat", train_on_inputs=train_on_inputs).train
    got = prep(tok, train=str(share), format="chat", train_on_inputs=train_on_inputs).train
    assert len(want) == 3 and got == want
    if not train_on_inputs:
        assert trained_runs(tok, got[0]) == ["hello world</s>", "it sat on the mat</s>"]


def parts(messages, split=False):
    """OpenAI content parts: each content as a list of text parts (split in two where asked)."""
    def as_parts(text):
        cut = len(text) // 2 if split else len(text)
        return [{"type": "text", "text": t} for t in (text[:cut], text[cut:]) if t]
    return [{**m, "content": as_parts(m["content"])} for m in messages]


@pytest.mark.parametrize("split", [False, True])
def test_openai_text_content_parts_encode_like_content_strings(tok, tmp_path, split):
    """A chat template of a text model would render a list of parts as its Python repr."""
    conversations = [CONVERSATION, CONVERSATION[1:3]]
    strings = write_json(tmp_path / "s.jsonl", [{"messages": c} for c in conversations], lines=True)
    listed = write_json(tmp_path / "p.jsonl", [{"messages": parts(c, split)} for c in conversations], lines=True)
    want = prep(tok, train=str(strings), format="chat").train
    got = prep(tok, train=str(listed), format="chat").train
    assert len(want) == 2 and got == want
    assert "'type'" not in tok.decode(got[0]["input_ids"])


def test_an_image_content_part_is_refused_naming_the_message_and_the_row(tok, tmp_path):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    rows = [{"messages": parts(CONVERSATION)} for _ in range(3)]
    rows[2]["messages"][1]["content"].append(image)
    data = write_json(tmp_path / "p.jsonl", rows, lines=True)
    with pytest.raises(UserError, match=r"data\.messages_column.*message 2 .*line 3 .*type 'image_url'.*text parts"):
        prep(tok, train=str(data), format="chat")


def test_sharegpt_accepts_user_and_assistant_and_a_named_column(tok, tmp_path):
    openai = write_json(tmp_path / "openai.json", [{"messages": CONVERSATION}])
    plain = {"system": "system", "user": "user", "assistant": "assistant"}
    share = write_json(tmp_path / "share.json", [{"dialog": sharegpt(CONVERSATION, plain)}])
    want = prep(tok, train=str(openai), format="chat").train
    assert prep(tok, train=str(share), format="chat", messages_column="dialog").train == want


def test_messages_column_is_preferred_and_a_named_column_is_never_replaced(tok, tmp_path):
    other = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
    both = write_json(tmp_path / "both.json", [{"messages": CONVERSATION, "conversations": sharegpt(other)}])
    only_messages = write_json(tmp_path / "m.json", [{"messages": CONVERSATION}])
    assert prep(tok, train=str(both), format="chat").train == prep(tok, train=str(only_messages), format="chat").train
    share = write_json(tmp_path / "share.json", [{"conversations": sharegpt(CONVERSATION)}])
    with pytest.raises(UserError, match=r"data\.messages_column.*'dialog' is not in data\.train.*conversations"):
        prep(tok, train=str(share), format="chat", messages_column="dialog")


def test_unknown_sharegpt_role_names_the_key_the_row_and_the_valid_roles(tok, tmp_path):
    good = {"conversations": sharegpt(CONVERSATION)}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    path = write_json(tmp_path / "share.jsonl", [good, bad], lines=True)
    with pytest.raises(UserError) as err:
        prep(tok, train=str(path), format="chat")
    message = str(err.value)
    for needle in ("recipe key 'data.messages_column'", "turn 2", "line 2 of", "share.jsonl", "'bot'",
                   "valid roles: human, gpt, system, user, assistant"):
        assert needle in message, (needle, message)


def test_validate_refuses_an_unknown_role_with_exit_2(tmp_path, tiny_llama, capsys):
    rows = [{"conversations": [{"from": "narrator", "value": "once"}]}]
    path = write_json(tmp_path / "share.jsonl", rows, lines=True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(path), "format": "chat"})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert_one_clean_line(code, err, "data.messages_column", "'narrator'", "line 1 of", "valid roles: human, gpt",
                          out=out)


def test_a_turn_that_is_neither_layout_is_refused(tok, tmp_path):
    path = write_json(tmp_path / "share.json", [{"conversations": [{"speaker": "human", "text": "hi"}]}])
    with pytest.raises(UserError, match=r"data\.messages_column.*'conversations'.*\{from, value\}.*record 1"):
        prep(tok, train=str(path), format="chat")


# ----------------------------------------------------------------------------------------------
# Header-less CSV/TSV files (data.columns) and TSV quotes


# Quotes as GLUE writes them: inside text, opening a field, and unbalanced (CSV quoting would drop them,
# or join the following lines into one field).
COLA_LINES = [
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
    '"cj99"\t1\t\t"great" film , it \'s a "great" film',
    'bc01\t0\t*\t"The unbalanced quote, which must not swallow the next lines',
    "bc01\t1\t\tOne more pseudo generalization and I'm giving up.",
    "gj04\t0\t*\tThe more you eat, the less \"'s you want.",
]


def cola_file(tmp_path, lines=COLA_LINES, name="in_domain_train.tsv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_headerless_tsv_rows_are_read_literally(tmp_path):
    rows = load_rows(str(cola_file(tmp_path)), columns=COLA)
    assert rows.column_names == COLA and len(rows) == 5  # the first line is data
    assert rows["sentence"] == [line.split("\t")[3] for line in COLA_LINES]
    assert rows["sentence"][1] == '"great" film , it \'s a "great" film' and rows["source"][1] == '"cj99"'
    assert rows["orig"] == ["", "", "*", "", "*"]
    assert rows.row_origin(2).startswith("line 3 of")


def test_headerless_tsv_classification(tok, tmp_path):
    path = cola_file(tmp_path)
    data = prep(tok, "seq-cls", train=str(path), columns=COLA, format="classification", text_column="sentence",
                max_length=4096)
    assert data.label_names == ["0", "1"] and [ex["labels"] for ex in data.train] == [1, 1, 0, 1, 0]
    assert data.train[1]["input_ids"] == tok('"great" film , it \'s a "great" film')["input_ids"]
    info = describe_data(DataSpec(train=str(path), eval=str(path), columns=COLA, format="classification",
                                  text_column="sentence"))
    assert info["columns"] == COLA and info["train_rows"] == info["eval_rows"] == 5


def test_headerless_csv_keeps_csv_quoting(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('a,"hello, ""world""",1\nb,"two\nlines",0\n', encoding="utf-8")
    rows = load_rows(str(path), columns=["id", "text", "label"])
    assert rows["text"] == ['hello, "world"', "two\nlines"] and rows["label"] == ["1", "0"]
    assert rows.numbers == [1, 2]


def test_a_row_of_another_width_names_the_file_line_and_count(tok, tmp_path):
    path = cola_file(tmp_path, COLA_LINES[:2] + ["gj04\t1\tthree fields only"] + COLA_LINES[2:])
    with pytest.raises(UserError, match=r"data\.train.*in_domain_train\.tsv.*line 3 has 3 fields but data\.columns "
                                        r"names 4 \(source, label, orig, sentence\)"):
        prep(tok, "seq-cls", train=str(path), columns=COLA, format="classification", text_column="sentence")


def test_columns_on_another_kind_of_source_is_refused(tmp_path, cls_file):
    path = write_json(tmp_path / "rows.json", [{"text": "a", "label": "x"}])
    for source in (str(path), "nyu-mll/glue", "builtin:quickstart"):  # refused before any loading
        with pytest.raises(UserError, match=rf"recipe key 'data\.columns'.*data\.train '{source}' is not one"):
            load_rows(source, columns=["text", "label"])
    spec = DataSpec(train=str(cls_file), eval=str(path), columns=["sentence", "label"], format="classification",
                    text_column="sentence")
    with pytest.raises(UserError, match=r"data\.columns.*data\.eval '.*rows\.json' is not one"):
        describe_data(spec)


@pytest.mark.parametrize("columns, pattern", [
    (["a", "a"], r"unique \(a repeated\)"),
    (["a", " "], r"every column needs a name"),
    ([], r"at least 1 item"),
    ("sentence", r"valid list"),
])
def test_bad_columns_key(columns, pattern):
    raw = {"model": {"name": "m", "task": "seq-cls"}, "data": {"train": "x.tsv", "format": "classification",
                                                                "columns": columns}}
    with pytest.raises(UserError, match=rf"recipe key 'data\.columns'.*{pattern}"):
        recipe_from_dict(raw)


def test_headerless_file_without_columns_gets_a_hint(tmp_path):
    path = cola_file(tmp_path, ["gj04\t1\t1\tsentence one", "gj04\t0\t*\tsentence two"])
    with pytest.raises(UserError, match=r"repeated column name.*data\.columns"):
        load_rows(str(path))


# ----------------------------------------------------------------------------------------------
# Folders and compressed files


@pytest.fixture()
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


ROWS = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)]


def test_a_folder_mixing_formats_is_refused_not_read_in_part(tok, tmp_path, datasets_cache):
    """The datasets library reads one format per folder and skips the rest without a word."""
    import csv

    folder = tmp_path / "mixed"
    folder.mkdir()
    write_json(folder / "a.json", ROWS[:3])
    with open(folder / "b.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(ROWS[3:])
    with pytest.raises(UserError, match=r"data\.train.*folder .*mixed.* mixes \.csv and \.json files"):
        prep(tok, train=str(folder), format="alpaca")


def test_an_empty_folder_is_named_as_a_folder_not_a_hub_dataset(tok, tmp_path, datasets_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no data here")
    with pytest.raises(UserError, match=r"folder .*empty' holds no data files") as err:
        prep(tok, train=str(tmp_path / "empty"), format="alpaca")
    assert "hub" not in str(err.value)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_save_to_disk_folder_loads(tok, tmp_path, datasets_cache, as_dict):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    plain = write_json(tmp_path / "plain.json", ROWS)
    assert prep(tok, train=str(tmp_path / "saved"), format="alpaca").train == \
        prep(tok, train=str(plain), format="alpaca").train


@pytest.mark.parametrize("name", ["train.jsonl.gz", "train.json.gz", "train.csv.gz", "train.tsv.gz"])
def test_a_compressed_file_loads_like_the_plain_one(tok, tmp_path, datasets_cache, name):
    import csv
    import gzip
    import io
    import json

    kind = name.split(".")[1]
    if kind in ("csv", "tsv"):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["instruction", "output"], delimiter="," if kind == "csv" else "\t")
        writer.writeheader()
        writer.writerows(ROWS)
        body = text.getvalue()
    else:
        body = "\n".join(map(json.dumps, ROWS)) if kind == "jsonl" else json.dumps(ROWS)
    (tmp_path / name).write_bytes(gzip.compress(body.encode()))
    (tmp_path / name.removesuffix(".gz")).write_text(body)
    assert prep(tok, train=str(tmp_path / name), format="alpaca").train == \
        prep(tok, train=str(tmp_path / name.removesuffix(".gz")), format="alpaca").train


def test_a_compressed_file_of_another_kind_is_refused(tok, tmp_path):
    (tmp_path / "notes.md.gz").write_bytes(b"")
    with pytest.raises(UserError, match=r"data\.train.*compressed.*\.json/\.jsonl/\.csv/\.tsv"):
        prep(tok, train=str(tmp_path / "notes.md.gz"), format="alpaca")


def test_a_json_column_mixing_numbers_and_text_reads_as_text(tok, tmp_path):
    """Labels 1 and "1" (hand-edited files, merged exports) are one class, as in a CSV file; Arrow
    alone would refuse the column."""
    texts = [f"{'good' if i % 2 else 'bad'} film {i}" for i in range(8)]
    mixed = [{"text": t, "label": (i % 2) if i < 4 else str(i % 2)} for i, t in enumerate(texts)]
    plain = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    got = prep(tok, "seq-cls", train=str(write_json(tmp_path / "m.jsonl", mixed, lines=True)), format="classification")
    want = prep(tok, "seq-cls", train=str(write_json(tmp_path / "p.jsonl", plain, lines=True)), format="classification")
    assert got.label_names == want.label_names == ["0", "1"] and got.train == want.train
