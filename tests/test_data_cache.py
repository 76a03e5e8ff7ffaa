"""The tokenized-data cache: a second run reads what the first one built, and a change to anything
that decides the content (data bytes, tokenizer, chat template, format, columns, max_length,
packing, masking, any module of the data package) builds a new entry whose content reflects the change.

`stats["data_cache"]` says "built ..." or "hit ..." for each call: that is the build counter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from deltafit.data import cache as data_cache
from deltafit.data import data_cache_root, prepare_data
from deltafit.recipe import DataSpec

PACKAGE = Path(data_cache.__file__).resolve().parent  # deltafit/data
MODULES = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py"))

CONVERSATION = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "and the cat?"}, {"role": "assistant", "content": "it sat on the mat"}]


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture()
def rows_file(tmp_path):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1),
             "answer": f"the sum is {2 * i + 1}", "messages": CONVERSATION} for i in range(12)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def run(tok, path, task="causal-lm", seed=0, **options):
    spec = DataSpec(train=str(path), **{"max_length": 200, **options})
    return prepare_data(spec, tok, task, seed)


def status(prepared) -> str:
    return prepared.stats["data_cache"].split()[0]


def content(prepared):
    return prepared.train, prepared.eval, prepared.label_names


def test_second_run_reads_the_same_data_from_the_cache(tok, rows_file, cache_root):
    first = run(tok, rows_file)
    second = run(tok, rows_file)
    assert (status(first), status(second)) == ("built", "hit")
    assert content(second) == content(first) and first.train
    assert {k: v for k, v in second.stats.items() if k != "data_cache"} == \
        {k: v for k, v in first.stats.items() if k != "data_cache"}
    # Stored without pickle: Arrow IPC files and JSON only, and no temporary folder left behind.
    (entry,) = cache_root.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train.arrow"]
    assert str(entry) in first.stats["data_cache"]


def test_same_bytes_rewritten_or_copied_still_hit(tok, rows_file, tmp_path):
    run(tok, rows_file)
    rows_file.write_bytes(rows_file.read_bytes())
    os.utime(rows_file, (1, 1))  # a new mtime alone does not change the content
    assert status(run(tok, rows_file)) == "hit"
    copy = tmp_path / "elsewhere" / "copy.json"  # nor does the path: files are keyed by their bytes
    copy.parent.mkdir()
    copy.write_bytes(rows_file.read_bytes())
    assert status(run(tok, copy)) == "hit"


def _retrain_tokenizer(tok, tmp_path):
    """A tokenizer with a different vocabulary (trained on other text), same class and specials."""
    import conftest
    from conftest import make_tokenizer

    saved = conftest._CORPUS
    conftest._CORPUS = ["Add the numbers and give the sum", "one two three", "the answer is"]
    try:
        return make_tokenizer(tmp_path / "other-tok", pad=False)
    finally:
        conftest._CORPUS = saved


# Each case: (what changes, options before, options after). Content must change with each of them.
CHANGES = {
    "format": ({"format": "alpaca"}, {"format": "completion", "text_column": "output"}),
    "column": ({"format": "completion", "text_column": "output"}, {"format": "completion", "text_column": "answer"}),
    "max_length": ({}, {"max_length": 40}),
    "packing": ({"max_length": 400, "packing": True}, {"max_length": 400, "packing": False}),
    "train_on_inputs": ({}, {"train_on_inputs": True}),
    "max_train_examples": ({}, {"max_train_examples": 5}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_data_option_rebuilds(tok, rows_file, change):
    before, after = CHANGES[change]
    old = run(tok, rows_file, **before)
    assert status(run(tok, rows_file, **before)) == "hit"
    new = run(tok, rows_file, **after)
    assert status(new) == "built" and content(new) != content(old)


def test_changed_file_bytes_rebuild(tok, rows_file):
    old = run(tok, rows_file)
    rows = json.loads(rows_file.read_text())
    rows[3]["output"] = "forty-two"
    rows_file.write_text(json.dumps(rows))  # same path, new content
    new = run(tok, rows_file)
    assert status(new) == "built" and content(new) != content(old)


def test_eval_file_bytes_are_part_of_the_key(tok, rows_file, tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(rows_file.read_text())
    old = run(tok, rows_file, eval=str(eval_file))
    eval_file.write_text(json.dumps(json.loads(rows_file.read_text())[:4]))
    new = run(tok, rows_file, eval=str(eval_file))
    assert status(new) == "built" and len(new.eval) == 4 != len(old.eval)


def test_another_tokenizer_rebuilds(tok, rows_file, tmp_path):
    old = run(tok, rows_file)
    other = _retrain_tokenizer(tok, tmp_path)
    assert other.get_vocab() != tok.get_vocab()
    new = run(other, rows_file)
    assert status(new) == "built" and content(new) != content(old)


def test_tokenizer_that_adds_bos_rebuilds(tok, rows_file, tiny_llama):
    from transformers import AutoTokenizer

    old = run(tok, rows_file)
    new = run(AutoTokenizer.from_pretrained(tiny_llama, add_bos_token=True), rows_file)
    assert status(new) == "built" and new.train[0]["input_ids"][0] == tok.bos_token_id != old.train[0]["input_ids"][0]


def test_another_chat_template_rebuilds(tok, rows_file, tiny_llama):
    from transformers import AutoTokenizer

    old = run(tok, rows_file, format="chat")
    other = AutoTokenizer.from_pretrained(tiny_llama)
    other.chat_template = tok.chat_template.replace("</s>", "<|end|>")  # another end-of-turn marker
    new = run(other, rows_file, format="chat")
    assert status(new) == "built" and content(new) != content(old)
    assert status(run(tok, rows_file, format="chat")) == "hit"  # the first template's entry is still there


def test_seed_matters_only_when_it_picks_rows(tok, rows_file):
    run(tok, rows_file, seed=0)
    assert status(run(tok, rows_file, seed=1)) == "hit"  # every row is used either way
    old = run(tok, rows_file, seed=0, max_train_examples=5)
    new = run(tok, rows_file, seed=1, max_train_examples=5)
    assert status(new) == "built" and content(new) != content(old)


@pytest.fixture()
def package_copy(tmp_path, monkeypatch):
    """A copy of the data package that the cache key fingerprints instead of the real one."""
    real = data_cache._code_fingerprint()
    copy = tmp_path / "copy-of-data-package"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(data_cache, "PACKAGE_DIR", copy)
    assert data_cache._code_fingerprint() == real  # module names and bytes, not where they are
    return copy


def test_the_code_fingerprint_covers_the_whole_package():
    assert {"__init__.py", "cache.py", "collate.py", "formats.py", "packing.py", "prepare.py", "sources.py",
            "splits.py"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_a_change_to_any_module_of_the_data_code_rebuilds(tok, rows_file, package_copy, module):
    first = run(tok, rows_file)
    assert status(run(tok, rows_file)) == "hit"
    with open(package_copy / module, "a", encoding="utf-8") as f:
        f.write("\n# a change\n")
    again = run(tok, rows_file)
    assert status(again) == "built" and content(again) == content(first)


def test_renamed_or_added_modules_change_the_code_fingerprint(package_copy):
    before = data_cache._code_fingerprint()
    (package_copy / "formats.py").rename(package_copy / "formats_v2.py")  # same bytes, another name
    renamed = data_cache._code_fingerprint()
    (package_copy / "formats_v2.py").rename(package_copy / "formats.py")
    assert renamed != before == data_cache._code_fingerprint()
    (package_copy / "extra.py").write_text("")
    assert data_cache._code_fingerprint() != before


def test_classification_labels_come_back_from_the_cache(tok, tmp_path):
    path = tmp_path / "cls.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(8)))
    options = {"format": "classification", "text_column": "sentence", "max_length": 16}
    first = run(tok, path, "seq-cls", **options)
    second = run(tok, path, "seq-cls", **options)
    assert status(second) == "hit" and second.label_names == first.label_names == ["neg", "pos"]
    assert second.train == first.train and isinstance(second.train[0]["labels"], int)
    fixed = prepare_data(DataSpec(train=str(path), **options), tok, "seq-cls", 0, label_names=["pos", "neg"])
    assert status(fixed) == "built" and fixed.train[0]["labels"] != first.train[0]["labels"]


def test_an_unreadable_entry_is_rebuilt(tok, rows_file, cache_root):
    first = run(tok, rows_file)
    (entry,) = cache_root.iterdir()
    (entry / "train.arrow").write_bytes(b"not arrow")
    again = run(tok, rows_file)
    assert status(again) == "built" and again.train == first.train
    assert status(run(tok, rows_file)) == "hit"


def test_cache_off_writes_nothing(tok, rows_file, cache_root):
    result = run(tok, rows_file, cache=False)
    assert result.stats["data_cache"] == "off" and result.train
    assert not cache_root.exists()


def test_cache_lives_under_deltafit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "elsewhere"))
    assert data_cache_root() == tmp_path / "elsewhere" / "data"
