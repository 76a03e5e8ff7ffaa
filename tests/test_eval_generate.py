"""`deltafit eval --generate`: the shipped generation metric module agrees with sacreBLEU and
rouge_score called directly and with hand-computed exact-match and JSON shares; rows sharing a prompt
are answered once and scored against all their references; the CLI writes gen_* keys next to the
loss and the predictions beside the results; merged model directories evaluate like the checkpoint
they came from; a missing metric package and bad options are one line and exit 2."""

from __future__ import annotations

import json
import sys

import pytest

from deltafit.evaluate import default_metrics, group_by_prompt, metric_module
from deltafit.generate import Row, Settings, load_generator, open_source
from tests.deltas.delta_testkit import saved_checkpoint
from tests.helpers import assert_one_clean_line, run_cli

LORA = {"method": "lora", "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def generation():
    return metric_module("generation")


def test_exact_match_and_json_shares_are_the_hand_counted_ones(generation):
    predictions = [" 5\n", "6", '{"a": 1, "b": 2}', '{"a": 1, "b": 3}', "not json", "[1, 2]"]
    references = [["5"], ["7", "six"], ['{"b": 2, "a": 1}'], ['{"a": 1, "b": 2}'], ['{"a": 1}'], ["[1, 2]"]]
    scores = generation.compute(predictions=predictions, references=references, metrics=["exact_match", "json"])
    assert set(scores) == {"exact_match", "json_valid", "json_exact", "json_fields"}
    assert scores["exact_match"] == pytest.approx(2 / 6)  # " 5\n" (stripped) and "[1, 2]"
    # Valid JSON: all but "not json" (bare numbers are JSON too). Exact records: rows 3 and 6 (key order
    # does not matter), and "5" == 5. Fields: 1, 0 (6 != 7; "six" is not JSON), 1, 1/2, 0 (invalid), 1, over 6.
    assert scores["json_valid"] == pytest.approx(5 / 6)
    assert scores["json_exact"] == pytest.approx(3 / 6)
    assert scores["json_fields"] == pytest.approx((1 + 0 + 1 + 0.5 + 0 + 1) / 6)


def test_rouge_and_bleu_are_the_packages_own_numbers(generation):
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
    references = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumped"],
                  ["hello world", "hi there", "hello there, world!"]]
    scores = generation.compute(predictions=predictions, references=references, metrics=["rouge", "bleu"])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    assert scores["rougeL"] == pytest.approx(sum(best) / 3)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(3)]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert 0 < scores["bleu"] < 100 and 0 < scores["rougeL"] < 1


def test_rows_sharing_a_prompt_are_one_input_with_every_reference(generation):
    import sacrebleu

    rows = [Row(["name[Aromi] food[Chinese]"], "Aromi serves Chinese food."),
            Row(["name[Aromi] food[Chinese]"], "Chinese food is served at Aromi."),
            Row(["name[Blue] area[riverside]"], "Blue is by the riverside."),
            Row(["name[Aromi] food[Chinese]"], "At Aromi you can eat Chinese food.")]
    grouped = group_by_prompt(rows)
    assert [row.pieces for row, _ in grouped] == [["name[Aromi] food[Chinese]"], ["name[Blue] area[riverside]"]]
    assert grouped[0][1] == [rows[0].reference, rows[1].reference, rows[3].reference]
    predictions = ["Chinese food is served at Aromi.", "Blue is near the riverside."]
    scores = generation.compute(predictions=predictions, references=[refs for _, refs in grouped], metrics=["bleu"])
    expected = sacrebleu.corpus_bleu(predictions, [[rows[0].reference, rows[2].reference],
                                                   [rows[1].reference, None], [rows[3].reference, None]]).score
    assert scores["bleu"] == pytest.approx(expected)
    # Against the first reference only the Aromi answer is no exact hit: grouping is what scores it fully.
    single = sacrebleu.corpus_bleu(predictions, [[rows[0].reference, rows[2].reference]]).score
    assert scores["bleu"] > single


def test_json_joins_the_default_metrics_only_for_structured_references():
    assert default_metrics(['{"a": 1}', "[1]"]) == ("exact_match", "rouge", "bleu", "json")
    assert default_metrics(['{"a": 1}', "5"]) == ("exact_match", "rouge", "bleu")


# ----------------------------------------------------------------------------------------------
# Through the CLI, on a tiny checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("eval-generate")
    return saved_checkpoint(root / "lora", tiny_llama, LORA, scale=0.5, train={"batch_size": 2})[0]


@pytest.fixture()
def json_rows(tmp_path):
    """Alpaca rows with JSON answers; the first instruction appears twice, with two answers."""
    rows = [{"instruction": f"Describe item {i}.", "input": "", "output": json.dumps({"name": f"n{i}", "kind": "x"})}
            for i in range(4)]
    rows.append({"instruction": "Describe item 0.", "input": "", "output": json.dumps({"name": "zero", "kind": "x"})})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_generate_writes_scores_and_predictions_beside_the_results(checkpoint, json_rows, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    out.parent.mkdir()
    code, stdout, err = run_cli(capsys, "eval", checkpoint, "--data", json_rows, "--generate", "--max-new-tokens", 5,
                                "--batch-size", 2, "--output", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert {"loss", "perplexity", "gen_exact_match", "gen_rougeL", "gen_bleu", "gen_json_valid", "gen_json_exact",
            "gen_json_fields"} <= set(results)  # json joined the defaults: every answer is a JSON object
    assert results["gen_examples"] == 4  # five rows, four distinct prompts
    predictions = out.with_name("eval-predictions.jsonl")
    assert results["predictions"] == str(predictions) and "gen_bleu" in stdout and str(predictions) in stdout
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [len(r["references"]) for r in records] == [2, 1, 1, 1]
    gen = load_generator(open_source(str(checkpoint)), Settings(max_new_tokens=5))
    assert records[2]["prediction"] == gen.decode(gen.generate([gen.prompt_ids([records[2]["prompt"]])])[0])
    hits = sum(r["prediction"].strip() in [x.strip() for x in r["references"]] for r in records) / len(records)
    assert results["gen_exact_match"] == pytest.approx(hits)


def test_metrics_pick_the_scores_and_max_examples_the_prompts(checkpoint, json_rows, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, _, err = run_cli(capsys, "eval", checkpoint, "--data", json_rows, "--generate", "--metrics", "exact_match",
                           "--max-examples", 2, "--max-new-tokens", 3, "--output", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert [k for k in results if k.startswith("gen_")] == ["gen_exact_match", "gen_examples"]
    assert results["gen_examples"] == 2 and "loss" in results
    assert len((tmp_path / "eval-predictions.jsonl").read_text().splitlines()) == 2


def test_a_merged_model_evaluates_like_its_checkpoint(checkpoint, json_rows, tmp_path, capsys):
    from deltafit.merge import merge_checkpoint

    merge_checkpoint(str(checkpoint), str(tmp_path / "merged"))
    scored = {}
    for name, source, extra in (("ckpt", checkpoint, []), ("merged", tmp_path / "merged", ["--format", "alpaca"])):
        out = tmp_path / f"{name}.json"
        code, _, err = run_cli(capsys, "eval", source, "--data", json_rows, "--generate", "--metrics", "exact_match",
                               "--max-new-tokens", 6, "--output", out, *extra)
        assert code == 0, err
        scored[name] = json.loads(out.read_text())
    assert scored["merged"]["model"] == "merged"
    assert scored["merged"]["loss"] == pytest.approx(scored["ckpt"]["loss"], rel=1e-4)
    predictions = [(tmp_path / f"{name}-predictions.jsonl").read_text() for name in ("ckpt", "merged")]
    assert predictions[0] == predictions[1]
    code, _, err = run_cli(capsys, "eval", tmp_path / "merged")
    assert_one_clean_line(code, err, "merged model", "--data")


def test_a_missing_metric_package_is_one_line_naming_the_extra(checkpoint, json_rows, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # `import sacrebleu` raises ImportError
    code, _, err = run_cli(capsys, "eval", checkpoint, "--data", json_rows, "--generate", "--metrics", "rouge,bleu",
                           "--output", tmp_path / "eval.json")
    assert_one_clean_line(code, err, "--metrics bleu", "pip install 'deltafit[metrics]'")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("args, needles", [
    (["--metrics", "bleu"], ["--metrics", "--generate"]),
    (["--max-new-tokens", "4"], ["--max-new-tokens", "--generate"]),
    (["--generate", "--metrics", "bleuu"], ["--metrics 'bleuu'", "did you mean 'bleu'", "exact_match, rouge"]),
    (["--generate", "--metrics", ","], ["--metrics", "exact_match, rouge, bleu, json"]),
    (["--generate", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--generate", "--max-examples", "0"], ["--max-examples"]),
    (["--format", "yaml"], ["--format 'yaml'", "alpaca"]),
])
def test_bad_options_are_one_line_and_exit_2(checkpoint, json_rows, capsys, args, needles):
    code, _, err = run_cli(capsys, "eval", checkpoint, "--data", json_rows, *args)
    assert_one_clean_line(code, err, *needles)


def test_generate_on_a_classifier_is_refused(tmp_path, tiny_llama, capsys):
    ckpt = saved_checkpoint(tmp_path / "cls", tiny_llama, LORA, task="seq-cls")[0]
    code, _, err = run_cli(capsys, "eval", ckpt, "--data", tmp_path / "any.json", "--generate")
    assert_one_clean_line(code, err, "--generate", "seq-cls", "causal-lm")


def test_a_merged_classifier_scores_like_its_checkpoint(tmp_path, tiny_llama, capsys):
    from deltafit.merge import merge_checkpoint

    ckpt = saved_checkpoint(tmp_path / "cls", tiny_llama, LORA, task="seq-cls", scale=0.5)[0]
    merge_checkpoint(str(ckpt), str(tmp_path / "merged"))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"text": f"item {i} is {'good' if i % 3 else 'bad'}", "label": i % 2}
                                for i in range(12)]))
    scored = []
    for source in (ckpt, tmp_path / "merged"):
        code, _, err = run_cli(capsys, "eval", source, "--data", rows, "--output", tmp_path / f"{source.name}.json")
        assert code == 0, err
        scored.append(json.loads((tmp_path / f"{source.name}.json").read_text()))
    assert scored[1]["examples"] == scored[0]["examples"] == 12
    assert {k: scored[1][k] for k in ("accuracy", "f1")} == {k: scored[0][k] for k in ("accuracy", "f1")}
