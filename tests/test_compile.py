"""train.compile: torch.compile per transformer block trains the same delta as eager mode, resumes
exactly, and a machine that cannot compile is told so before the first step."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli, write_recipe

LOSS_RTOL = 1e-4  # fp32: compiled kernels only reorder the reductions
TENSOR_ATOL = 1e-5


def _train(tmp_path, capsys, tiny_llama, alpaca_file, name, compile_):
    recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          train={"max_steps": 4, "compile": compile_, "mixed_precision": "no"},
                          log={"progress": False, "jsonl": True})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / name)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return losses, load_file(str(tmp_path / name / "final" / "delta.safetensors"))


def test_compiled_blocks_train_the_same_delta_as_eager(tmp_path, capsys, tiny_llama, alpaca_file):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_losses, eager = _train(tmp_path, capsys, tiny_llama, alpaca_file, "eager", False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled_losses, compiled = _train(tmp_path, capsys, tiny_llama, alpaca_file, "compiled", True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    assert len(compiled_losses) == len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    assert compiled.keys() == eager.keys()
    assert all(torch.allclose(compiled[k], eager[k], atol=TENSOR_ATOL) for k in eager)
    code, _, err = run_cli(capsys, "eval", tmp_path / "compiled" / "final", "--data", alpaca_file)
    assert code == 0, err  # an ordinary checkpoint
    torch._dynamo.reset()


def test_compile_without_a_cpp_compiler_is_a_clear_user_error(tmp_path, capsys, tiny_llama, alpaca_file,
                                                              monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          train={"max_steps": 1, "compile": True})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert "train.compile" in err and "C++ compiler" in err and "train.compile: false" in err


@pytest.mark.slow  # ~35 s of compiling on 2 cores; the slow suite's second worker has room beside the quickstart
def test_a_compiled_run_resumes_to_the_same_delta(tmp_path, capsys, tiny_llama, alpaca_file):
    """train.compile with step checkpoints: a run resumed from step 2 ends on the same tensors as the
    run that went through (compiled blocks keep the state dict's names, so the checkpoints are plain)."""
    torch._dynamo.reset()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          delta={"method": "lora", "r": 4, "dropout": 0.1},  # the RNG state must come back too
                          train={"max_steps": 4, "save_every": 2, "compile": True, "mixed_precision": "no"},
                          log={"progress": False})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(capsys, "train", recipe, "--output", whole)[0] == 0
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    code, out, err = run_cli(capsys, "train", recipe, "--output", resumed, "--resume")
    assert code == 0 and "resumed from" in out + err and "step-00000002" in out + err, err
    expected, got = (load_file(str(run / "final" / "delta.safetensors")) for run in (whole, resumed))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    torch._dynamo.reset()
