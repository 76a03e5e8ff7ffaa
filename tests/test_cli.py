"""train -> eval -> merge end to end on tiny models, through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import assert_one_clean_line, run_cli, write_recipe


@pytest.fixture()
def lm_run(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          train={"max_steps": 6, "save_every": 3})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


def test_train_writes_a_self_describing_delta_only_checkpoint(lm_run):
    final = lm_run / "final"
    meta = json.loads((final / "deltafit.json").read_text())
    assert meta["method"] == "lora" and meta["task"] == "causal-lm" and meta["step"] == 6
    from safetensors.torch import load_file

    tensors = load_file(str(final / "delta.safetensors"))
    assert tensors and all(".lora." in k for k in tensors)  # nothing of the frozen base
    assert (final / "recipe.yaml").is_file()
    records = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert any("eval_loss" in r for r in records)
    assert (lm_run / "checkpoints" / "step-00000003" / "trainer" / "state.safetensors").is_file()


def test_eval_and_base_eval_report_loss_and_perplexity(lm_run, capsys):
    code, out, err = run_cli(capsys, "eval", lm_run / "final")
    assert code == 0, err
    tuned = json.loads((lm_run / "final-eval.json").read_text())
    code, out, err = run_cli(capsys, "eval", lm_run / "final", "--base")
    assert code == 0, err
    base = json.loads((lm_run / "final-eval-base.json").read_text())
    assert tuned["tokens"] == base["tokens"] > 0
    assert tuned["perplexity"] == pytest.approx(torch.tensor(tuned["loss"]).exp().item(), rel=1e-5)
    assert tuned["loss"] < base["loss"]  # 6 steps at lr 1e-2 on a learnable toy task


def test_eval_set_names_the_columns_of_other_data(lm_run, alpaca_file, tmp_path, capsys):
    """--set data.* reads a file whose columns have other names (a merged model or PEFT adapter records
    no data section, so this is the only way to score such a file); other keys are refused."""
    rows = json.loads(alpaca_file.read_text())
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps([{"q": r["instruction"], "ctx": r.get("input", ""), "a": r["output"]} for r in rows]))
    code, _, err = run_cli(capsys, "eval", lm_run / "final", "--data", alpaca_file, "-o", tmp_path / "plain.json")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", lm_run / "final", "--data", renamed, "-o", tmp_path / "renamed-eval.json",
                           "--set", "data.instruction_column=q", "--set", "data.input_column=ctx",
                           "--set", "data.output_column=a")
    assert code == 0, err
    plain, other = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "renamed-eval.json"))
    assert other["tokens"] == plain["tokens"] > 0 and other["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    code, _, err = run_cli(capsys, "eval", lm_run / "final", "--set", "delta.r=2")
    assert_one_clean_line(code, err, "--set 'delta.r=2'", "data.* keys only")


def test_a_run_with_relative_paths_evaluates_and_resumes_from_another_directory(tmp_path, tiny_llama, alpaca_file,
                                                                               capsys, monkeypatch):
    """The recipe names the model and data relative to where training ran; the checkpoint records
    them absolute, so eval from elsewhere finds them (it used to look 'model' up on the hub)."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_llama, work / "model")
    shutil.copy(alpaca_file, work / "train.json")
    monkeypatch.chdir(work)
    write_recipe(work / "r.yaml", "model", {"train": "train.json", "format": "alpaca", "eval_fraction": 0.25},
                 train={"max_steps": 2, "save_every": 1})
    code, _, err = run_cli(capsys, "train", "r.yaml", "--output", "run")
    assert code == 0, err
    for saved in (work / "run" / "final", work / "run" / "checkpoints" / "step-00000001"):
        recipe = yaml.safe_load((saved / "recipe.yaml").read_text())
        assert recipe["model"]["name"] == str(work / "model") and recipe["data"]["train"] == str(work / "train.json")
    meta = json.loads((work / "run" / "final" / "deltafit.json").read_text())
    assert meta["model"]["name"] == str(work / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "eval", work / "run" / "final")
    assert code == 0, err
    assert json.loads((work / "run" / "final-eval.json").read_text())["tokens"] > 0
    monkeypatch.chdir(work)  # the same relative recipe resumes: its paths compare as the absolute ones saved
    code, _, err = run_cli(capsys, "train", "r.yaml", "--output", "run", "--resume", "--set", "train.max_steps=3")
    assert code == 0, err


def test_merge_saves_a_plain_model_with_equal_logits(lm_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "merge", lm_run / "final", "--output", tmp_path / "merged")
    assert code == 0, err
    assert "max abs diff" in out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    from deltafit import checkpoint
    from deltafit.loading import attach_from_checkpoint
    from deltafit.model import build_model
    from deltafit.recipe import recipe_from_dict

    meta, tensors = checkpoint.load(lm_run / "final")
    recipe = recipe_from_dict(checkpoint.read_recipe_dict(lm_run / "final"))
    model, _, _ = build_model(recipe.model)
    attach_from_checkpoint(model, meta, tensors)
    ids = tok(["Add 3 and 4."], return_tensors="pt")
    with torch.no_grad():
        diff = (merged(**ids).logits - model(**ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_resume_continues_from_the_latest_step_checkpoint(lm_run, tmp_path, capsys):
    recipe = lm_run / "final" / "recipe.yaml"
    code, out, err = run_cli(capsys, "train", recipe, "--output", lm_run, "--set", "train.max_steps=8", "--resume")
    assert code == 0, err
    meta = json.loads((lm_run / "final" / "deltafit.json").read_text())
    assert meta["step"] == 8
    steps = [json.loads(line)["step"] for line in (lm_run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_classification_with_string_labels_end_to_end(tmp_path, tiny_bert, cls_file, capsys):
    recipe = write_recipe(tmp_path / "c.yaml", tiny_bert,
                          {"train": str(cls_file), "eval": str(cls_file), "format": "classification",
                           "text_column": "sentence", "label_column": "label", "max_length": 32},
                          task="seq-cls", train={"max_steps": 3})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "final" / "deltafit.json").read_text())
    assert meta["label_names"] == ["neg", "pos"]
    code, out, err = run_cli(capsys, "eval", tmp_path / "run")
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "final-eval.json").read_text())
    assert {"accuracy", "f1", "matthews_correlation"} <= set(result) and result["examples"] == 32
    code, out, err = run_cli(capsys, "merge", tmp_path / "run", "--output", tmp_path / "merged")
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_validate_prints_the_plan_without_weights(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert code == 0, err
    # tiny llama: 2 layers x (q: 32->32, v: 32->16) with r=4: 4*(64) + 4*(48) per layer = 448 per layer
    assert "896" in out and "recipe is valid" in out
    assert "q_proj" in out


def test_methods_lists_the_registry(capsys):
    from deltafit.deltas import METHODS

    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in METHODS:
        assert name in out


def test_ctrl_c_outside_the_training_loop_exits_130_not_0(monkeypatch, capsys):
    """typer hands back a KeyboardInterrupt as a returned 130 outside standalone mode: a shell's
    `deltafit eval ... && next` must not go on as if the interrupted command had succeeded."""
    import deltafit.report

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(deltafit.report, "print_methods", interrupted)
    code, out, err = run_cli(capsys, "methods")
    assert code == 130 and err.strip() == "interrupted", (code, err)


def test_help_does_not_import_torch():
    probe = ("import sys; from deltafit.cli import app; "
             "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_real_process_exit_code_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deltafit", "train", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr


def test_bf16_base_and_bf16_autocast_train_and_merge(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "max_length": 200},
                          train={"max_steps": 2, "mixed_precision": "bf16"})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run", "--set", "model.dtype=bfloat16")
    assert code == 0, err
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "final" / "delta.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # deltas stay fp32 on a bf16 base
    code, out, err = run_cli(capsys, "merge", tmp_path / "run", "--output", tmp_path / "merged")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16
