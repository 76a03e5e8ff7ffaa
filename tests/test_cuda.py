"""What only a GPU shows: bf16 training, QLoRA's NF4 base and generation on CUDA.

Marked `cuda`: `make test` leaves them out (CI has no GPU) and `scripts/gpu_check.sh` runs them on a
machine with one. Run there, each test fails rather than skips when no GPU is visible, so a check
that ran on the wrong machine cannot pass by doing nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import run_cli, write_recipe

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "a cuda-marked test ran without a visible CUDA GPU"


def _train(tmp_path, capsys, model, alpaca_file, delta: dict, **train):
    recipe = write_recipe(tmp_path / "recipe.yaml", model, {"train": str(alpaca_file), "format": "alpaca",
                                                             "eval_fraction": 0.25},
                          delta=delta, train={"max_steps": 8, "lr": 5e-3, "eval_every": 8, **train},
                          log={"progress": False, "jsonl": True})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return tmp_path / "run", [json.loads(line) for line in lines]


def test_bf16_lora_trains_on_the_gpu_and_reloads(tmp_path, capsys, tiny_llama, alpaca_file):
    run, records = _train(tmp_path, capsys, tiny_llama, alpaca_file, {"method": "lora", "r": 4, "alpha": 8,
                                                                       "dropout": 0.1}, mixed_precision="bf16")
    losses = [r["loss"] for r in records if "loss" in r and "step" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    code, _, err = run_cli(capsys, "eval", run / "final")
    assert code == 0, err
    assert math.isfinite(json.loads((run / "final-eval.json").read_text())["loss"])


def test_qlora_runs_on_the_gpu_near_its_dequantized_base(tmp_path, capsys, tiny_llama, alpaca_file):
    from deltafit import deltas
    from deltafit.model import build_model
    from deltafit.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name": str(tiny_llama), "task": "causal-lm"},
                               "data": {"train": str(alpaca_file)}, "delta": {"method": "qlora", "r": 4}}, source="t")
    model, tokenizer, _ = build_model(recipe.model)
    ids = tokenizer(["Add 2 and 3."], return_tensors="pt")["input_ids"].cuda()
    model = model.cuda().eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float()
    deltas.build(recipe.delta).attach(model, head=[])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits.float()
    # NF4 rounds each weight by at most half a quantization step; the logits move, but stay close.
    assert quantized.device.type == "cuda" and 0 < (quantized - plain).abs().max() < 0.5
    _train(tmp_path, capsys, tiny_llama, alpaca_file, {"method": "qlora", "r": 4, "dropout": 0.0})


def test_generation_with_the_cache_matches_recomputing_on_the_gpu(tmp_path, capsys, tiny_llama, alpaca_file):
    from deltafit.generate import Settings, load_generator, open_source, render_prompt
    from tests.test_generate import greedy_without_cache

    run, _ = _train(tmp_path, capsys, tiny_llama, alpaca_file, {"method": "lora", "r": 4, "alpha": 8})
    gen = load_generator(open_source(str(run / "final")), Settings(max_new_tokens=8))
    assert gen.model.device.type == "cuda"
    prompts = [gen.prompt_ids(render_prompt(gen, text)) for text in ("Add 2 and 3.", "What is the capital?")]
    assert gen.generate(prompts) == [greedy_without_cache(gen, ids, 8) for ids in prompts]
