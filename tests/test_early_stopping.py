"""Early stopping and the best checkpoint (train.early_stopping, train.keep_best).

Most runs here score each periodic evaluation from a script (evaluation is replaced by a function of
the step), so the step where training must stop and the step whose delta is the best are known in
advance. Two runs keep the real evaluation, to hold the metric names to what evaluation returns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltafit.train
from deltafit.errors import UserError
from deltafit.recipe import EVAL_METRICS, load_recipe
from deltafit.train import TrainHooks, Watch, fit
from tests.helpers import assert_one_clean_line, run_cli, write_recipe

# eval_loss by step (eval_every 2, patience 3): best at 4, then 6, 8 and 10 fail to beat it: stop at 10.
SCRIPT = {2: 1.0, 4: 0.8, 6: 0.9, 8: 0.85, 10: 0.95, 12: 0.5}
STOP, BEST = 10, 4


class Crash(Exception):
    """Stands for a kill: the run ends where it is, without its final checkpoint."""


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "delta.safetensors"))


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)


def records(output: Path) -> list[dict]:
    """metrics.jsonl without its timings (which differ from run to run)."""
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in logged]


def train(recipe: Path, output: Path, resume: str | None = None, crash_before_step: int = 0,
          crash_writing_final: bool = False) -> Path:
    """fit() with evaluation scored by SCRIPT; optionally dies before a step or while writing final/."""
    seen = {}

    def before_forward(run, batch):
        seen["run"] = run
        if run.progress.step + 1 == crash_before_step:
            raise Crash

    def during_save(run, tmp_dir):
        if crash_writing_final and ".final" in Path(tmp_dir).name:
            raise Crash

    def scripted(model, delta, loader, task, accelerator=None) -> dict:
        loss = SCRIPT.get(seen["run"].progress.step, 2.0)
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": 100}

    real = deltafit.train.evaluate_loop
    deltafit.train.evaluate_loop = scripted
    try:
        return fit(load_recipe(recipe), output_dir=output, resume=resume,
                   hooks=TrainHooks(before_forward=before_forward, during_save=during_save))
    finally:
        deltafit.train.evaluate_loop = real


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("es-data") / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(24)]))
    return path


def make_recipe(path: Path, model: Path, data: Path, **train) -> Path:
    # Dropout on the LoRA path: the run depends on the RNG state, which resume must restore.
    return write_recipe(path, model, {"train": str(data), "format": "alpaca", "eval_fraction": 0.25},
                        delta={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        train={"max_steps": 16, "batch_size": 2, "lr": 5e-3, "eval_every": 2, "save_every": 1,
                               "keep_last": 20, "early_stopping": {"patience": 3}, **train})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama, data):
    """An uninterrupted keep_best run with early stopping: the reference the other runs must match."""
    root = tmp_path_factory.mktemp("es-straight")
    recipe = make_recipe(root / "r.yaml", tiny_llama, data, keep_best=True)
    train(recipe, root / "run")
    return recipe, root / "run"


def test_watch_counts_evaluations_without_an_improvement_by_more_than_min_delta():
    watch = Watch("eval_loss", "min", min_delta=0.05, patience=2)
    assert watch.update(1.0, 2) and watch.best == 1.0
    assert not watch.update(0.97, 4)  # better, but not by more than min_delta
    assert watch.stale == 1 and not watch.exhausted
    assert watch.update(0.9, 6) and (watch.best, watch.best_step, watch.stale) == (0.9, 6, 0)
    assert not watch.update(float("nan"), 8) and not watch.update(0.88, 10)
    assert watch.exhausted and watch.best_step == 6
    higher = Watch("eval_accuracy", "max")
    assert not higher.update(float("nan"), 1) and higher.best is None  # a NaN is never the best
    assert higher.update(0.5, 2) and not higher.update(0.5, 3) and higher.update(0.6, 4)


def test_training_stops_at_the_evaluation_where_patience_runs_out(straight):
    _, run = straight
    logged = records(run)
    assert max(r["step"] for r in logged if "loss" in r) == STOP
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 4, 6, 8, 10]  # no second evaluation of step 10
    stops = [r for r in logged if r.get("early_stopping")]
    assert stops == [{"step": STOP, "early_stopping": "stopped", "metric": "eval_loss", "best": SCRIPT[BEST],
                      "best_step": BEST, "evaluations_without_improvement": 3, "patience": 3}]
    assert not (run / "checkpoints" / f"step-{STOP + 1:08d}").exists()


def test_keep_best_final_holds_the_best_evaluated_delta_and_says_so(straight):
    _, run = straight
    assert_equal(tensors(run / "final"), tensors(run / "checkpoints" / f"step-{BEST:08d}"))
    meta = json.loads((run / "final" / "deltafit.json").read_text())
    assert meta["step"] == BEST
    assert meta["best"] == {"metric": "eval_loss", "value": SCRIPT[BEST], "mode": "min", "step": BEST,
                            "trained_steps": STOP}
    assert not (run / "best").exists()  # final/ holds it now
    with pytest.raises(AssertionError):  # the last delta differs: final/ really is the best, not the last
        assert_equal(tensors(run / "final"), tensors(run / "checkpoints" / f"step-{STOP:08d}"))


def test_without_keep_best_final_is_the_delta_of_the_stopping_step(tmp_path, tiny_llama, data):
    recipe = make_recipe(tmp_path / "r.yaml", tiny_llama, data, save_every=5)
    final = train(recipe, tmp_path / "run")
    assert json.loads((final / "deltafit.json").read_text())["step"] == STOP
    assert "best" not in json.loads((final / "deltafit.json").read_text())
    assert_equal(tensors(final), tensors(tmp_path / "run" / "checkpoints" / f"step-{STOP:08d}"))


def test_a_run_killed_and_resumed_stops_at_the_same_step_with_the_same_tensors(straight, tmp_path):
    recipe, reference = straight
    run = tmp_path / "run"
    # Killed before step 8: its checkpoint of step 7 holds the best (step 4) and one evaluation without improvement.
    with pytest.raises(Crash):
        train(recipe, run, crash_before_step=8)
    assert (run / "best" / "deltafit.json").is_file() and not (run / "final").exists()
    assert json.loads((run / "best" / "deltafit.json").read_text())["best"]["step"] == BEST  # kept while training
    train(recipe, run, resume="latest")
    assert_equal(tensors(run / "final"), tensors(reference / "final"))
    assert_equal(tensors(run / "checkpoints" / f"step-{STOP:08d}"), tensors(reference / "checkpoints" /
                                                                           f"step-{STOP:08d}"))
    assert records(run) == records(reference)  # the same steps and evaluations, the stop logged once
    assert not (run / "checkpoints" / f"step-{STOP + 1:08d}").exists()


def test_killed_writing_final_after_stopping_the_resumed_run_trains_no_further(straight, tmp_path):
    recipe, reference = straight
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(recipe, run, crash_writing_final=True)
    assert not (run / "final").exists()
    train(recipe, run, resume="latest")  # resumes from the checkpoint of the stopping step
    assert_equal(tensors(run / "final"), tensors(reference / "final"))
    assert json.loads((run / "final" / "deltafit.json").read_text())["best"]["step"] == BEST
    assert records(run) == records(reference)
    assert not (run / "checkpoints" / f"step-{STOP + 1:08d}").exists()


def float_eval_keys(output: Path) -> set[str]:
    return {k for r in records(output) for k, v in r.items() if k.startswith("eval_") and isinstance(v, float)}


def test_the_metric_names_are_those_evaluation_logs_causal_lm(tmp_path, tiny_llama, data):
    recipe = make_recipe(tmp_path / "r.yaml", tiny_llama, data, max_steps=4, save_every=None, keep_best=True,
                         early_stopping={"metric": "eval_perplexity", "patience": 1})
    final = fit(load_recipe(recipe), output_dir=tmp_path / "run")
    assert float_eval_keys(tmp_path / "run") == set(EVAL_METRICS["causal-lm"])
    assert json.loads((final / "deltafit.json").read_text())["best"]["metric"] == "eval_perplexity"


def test_the_metric_names_are_those_evaluation_logs_seq_cls(tmp_path, tiny_bert, cls_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, {"train": str(cls_file), "format": "classification",
                          "text_column": "sentence", "eval_fraction": 0.25, "max_length": 32}, task="seq-cls",
                          train={"max_steps": 2, "eval_every": 1, "keep_best": True, "best_metric": "eval_f1",
                                 "early_stopping": {}})
    final = fit(load_recipe(recipe), output_dir=tmp_path / "run")
    assert float_eval_keys(tmp_path / "run") == set(EVAL_METRICS["seq-cls"])
    best = json.loads((final / "deltafit.json").read_text())["best"]
    assert best["metric"] == "eval_f1" and best["mode"] == "max" and best["step"] in (1, 2)


@pytest.mark.parametrize("train, needles", [
    ({"early_stopping": {"patience": 2}}, ["train.early_stopping", "train.eval_every"]),
    ({"keep_best": True}, ["train.keep_best", "train.eval_every"]),
    ({"eval_every": 2, "early_stopping": {"patiense": 2}}, ["train.early_stopping", "did you mean 'patience'"]),
    ({"eval_every": 2, "early_stopping": 3}, ["train.early_stopping", "metric, mode, patience, min_delta"]),
    ({"eval_every": 2, "early_stopping": {"metric": "loss"}}, ["train.early_stopping.metric", "'eval_loss'"]),
    ({"eval_every": 2, "keep_best": True, "best_metric": "acc"}, ["train.best_metric", "'eval_accuracy'"]),
], ids=["es-no-eval-every", "kb-no-eval-every", "unknown-key", "not-a-mapping", "unknown-metric", "unknown-best"])
def test_recipes_without_periodic_evaluation_or_with_unknown_names_are_refused(tmp_path, tiny_llama, train, needles):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": "a.json"}, train=train)
    with pytest.raises(UserError) as error:
        load_recipe(recipe)
    assert "\n" not in str(error.value)
    for needle in needles:
        assert needle in str(error.value)


@pytest.fixture()
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run loaded a model before refusing its recipe")

    monkeypatch.setattr(deltafit.train, "build_model", refuse)


@pytest.mark.parametrize("task, data, train, needles", [
    ("causal-lm", {}, {"early_stopping": {}}, ["train.early_stopping", "evaluation data", "data.eval_fraction"]),
    ("causal-lm", {}, {"keep_best": True}, ["train.keep_best", "evaluation data"]),
    ("seq-cls", {"eval_fraction": 0.25}, {"early_stopping": {"metric": "eval_loss"}},
     ["train.early_stopping.metric", "seq-cls", "eval_accuracy, eval_f1, eval_matthews_correlation"]),
    ("causal-lm", {"eval_fraction": 0.25}, {"keep_best": True, "best_metric": "eval_accuracy"},
     ["train.best_metric", "train.keep_best", "eval_loss, eval_perplexity"]),
    ("causal-lm", {"eval_fraction": 0.25}, {"early_stopping": {"mode": "max"}},
     ["train.early_stopping.mode", "lower", "leave mode out"]),
], ids=["no-eval-data", "kb-no-eval-data", "metric-of-other-task", "best-metric-of-other-task", "wrong-mode"])
def test_a_metric_the_run_does_not_evaluate_is_refused_before_loading(tmp_path, tiny_llama, alpaca_file, cls_file,
                                                                      capsys, no_model_loading, task, data, train,
                                                                      needles):
    source = {"train": str(alpaca_file), "format": "alpaca"} if task == "causal-lm" else \
        {"train": str(cls_file), "format": "classification", "text_column": "sentence"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {**source, **data}, task=task,
                          train={"eval_every": 2, **train})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert_one_clean_line(code, err, *needles, out=out)
    assert not (tmp_path / "run").exists()
