"""The builtin quickstart data (deltafit/tasks.py): seeded, varied, and every record copied from its sentence."""

import json
from pathlib import Path

import pytest

from deltafit.errors import UserError
from deltafit.tasks import BUILTIN, JOBS, PROMPT, REAL_CITIES, REAL_FIRST, REAL_LAST, load_builtin

KEYS = ["name", "age", "job", "city"]
# Hand-written sentences for scripts/quickstart_heldout.py. The second file was written after the
# generator's phrasings and the recipe were tuned against the first, so it is unseen by both.
HELDOUT = [Path(__file__).parent / "fixtures" / f"quickstart_heldout{n}.jsonl" for n in ("", "2")]


@pytest.fixture(scope="module")
def train():
    return load_builtin("quickstart")


@pytest.fixture(scope="module")
def evaluation():
    return load_builtin("quickstart-eval")


def records(rows):
    return [json.loads(r["completion"]) for r in rows]


def test_same_rows_every_time(train, evaluation):
    assert load_builtin("quickstart") == train and load_builtin("quickstart-eval") == evaluation
    assert (len(train), len(evaluation)) == (512, 64)
    # pinned: a change of generator (or of Python's random) shows here, not as a silently different quickstart
    assert train[0]["prompt"] == "Person: Everyone in San Grufoadaex knows Cuourt Shykriar, the carpenter.\nJSON:"


def test_eval_sentences_are_not_training_sentences(train, evaluation):
    prompts = {r["prompt"] for r in train}
    assert not prompts & {r["prompt"] for r in evaluation}
    assert len(prompts) == len(train)  # no duplicates either


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_record_is_copied_from_its_sentence(name):
    for row in load_builtin(name):
        assert row["prompt"].startswith("Person: ") and row["prompt"].endswith("\nJSON:")
        assert row["completion"].startswith(" ")
        record = json.loads(row["completion"])
        assert list(record) == KEYS  # the convention: four keys, this order, null where missing
        assert record["age"] is None or isinstance(record["age"], int)
        assert sum(v is not None for v in record.values()) >= 2
        sentence = row["prompt"][len("Person: "):-len("\nJSON:")]
        for key, value in record.items():
            if value is not None:
                assert str(value) in sentence, (key, value, sentence)
        assert "{" not in sentence and "}" not in sentence, sentence  # every slot filled


def test_vocabulary_and_phrasing_are_varied(train):
    recs = records(train)
    names = {r["name"] for r in recs if r["name"]}
    cities = {r["city"] for r in recs if r["city"]}
    jobs = {r["job"] for r in recs if r["job"]}
    assert len(names) > 400 and len(cities) > 350 and len(jobs) > 200
    assert sum(" " in c for c in cities) > 100 and sum(" " in j for j in jobs) > 100  # multi-word values
    # most values come from parts, not from whole-value lists the model could memorise
    assert sum(c not in REAL_CITIES for c in cities) > 0.7 * len(cities)
    assert sum(j not in JOBS for j in jobs) > 0.5 * len(jobs)
    # every field is missing sometimes, and sentences follow many shapes
    for key in KEYS:
        assert 10 <= sum(r[key] is None for r in recs) <= 0.3 * len(recs), key
    assert sum(all(v is not None for v in r.values()) for r in recs) > 0.4 * len(recs)
    shapes = {_shape(row, rec) for row, rec in zip(train, recs)}
    assert len(shapes) > 100
    # the fields appear in many orders
    orders = {tuple(sorted((k for k in KEYS if rec[k] is not None), key=lambda k: row["prompt"].find(str(rec[k]))))
              for row, rec in zip(train, recs)}
    assert len(orders) > 20


def _shape(row, rec):
    text = row["prompt"]
    for key in KEYS:
        if rec[key] is not None:
            text = text.replace(str(rec[key]), "{" + key + "}")
    return text


@pytest.mark.parametrize("fixture", HELDOUT, ids=lambda p: p.name)
def test_heldout_fixture_is_unlike_the_generator(train, fixture):
    rows = [json.loads(line) for line in fixture.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 40
    train_shapes = {_shape(r, rec) for r, rec in zip(train, records(train))}
    train_values = {v for rec in records(train) for v in rec.values() if isinstance(v, str)}
    for row in rows:
        record = json.loads(row["completion"])
        assert list(record) == KEYS
        sentence = row["prompt"][len("Person: "):-len("\nJSON:")]
        assert row["prompt"] == PROMPT.format(sentence=sentence)
        for value in record.values():
            if value is not None:
                assert str(value) in sentence
        assert record["job"] not in JOBS and record["city"] not in REAL_CITIES
        assert not set((record["name"] or "").split()) & set(REAL_FIRST + REAL_LAST)
        assert _shape(row, record) not in train_shapes
        assert not {v for v in record.values() if isinstance(v, str)} & train_values  # no value seen in training
    assert sum(None in json.loads(r["completion"]).values() for r in rows) >= 8


def test_unknown_builtin_is_refused_with_a_suggestion():
    with pytest.raises(UserError, match="did you mean.*quickstart"):
        load_builtin("quickstrat")
