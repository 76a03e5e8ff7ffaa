"""Two CPU processes (gloo) through `accelerate launch` against one process with twice the gradient
accumulation: the same examples make up every optimizer step, so the results must agree up to
float reassociation (the all-reduce sums gradients in another order). Tolerance: 1e-5 absolute on
every delta tensor, against updates of order 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import write_recipe

# Under `pytest -n` (make test): the multi-process launches run one after another on the same worker
# (`--dist loadgroup`), so two of them never share the cores. tests/test_fsdp.py takes the same mark.
MULTI_PROCESS = pytest.mark.xdist_group("multi-process")
pytestmark = MULTI_PROCESS

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def launch_command(processes: int, *argv) -> list[str]:
    """`deltafit argv...` in `processes` processes, on a port that is free now: in one CI run torchrun's
    default 29500 was taken (EADDRINUSE) and the launch failed before training."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --multi_gpu picks Accelerate's torchrun launcher; with no GPU deltafit asks for CPU (gloo).
    # (`--cpu` alone would start a single process unless MPI is set up.)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "deltafit", *map(str, argv)]


def deltafit(*argv, processes: int = 1) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deltafit", *argv] if processes == 1 else launch_command(processes, *argv)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_pytest_runs_one_group_on_one_worker(tmp_path):
    """What MULTI_PROCESS relies on: under `--dist loadgroup` a group's tests share one worker, so its
    module fixtures run once. (With pytest 9.2 and pytest-xdist 3.8 the group was silently ignored:
    both workers ran these tests side by side, each training the module fixtures again.)"""
    (tmp_path / "test_group.py").write_text(
        "import os, pytest\npytestmark = pytest.mark.xdist_group('g')\n"
        + "".join(f"def test_{i}(): print('worker', os.getpid())\n" for i in range(6)))
    (tmp_path / "test_other.py").write_text("".join(f"def test_{i}(): pass\n" for i in range(6)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-rP", "-p",
                           "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    workers = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("worker ")}
    assert proc.stdout.count("worker ") == 6 and len(workers) == 1, proc.stdout[-2000:]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "delta.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def write_sums(path: Path) -> Path:
    """24 alpaca rows "Add i and i+1." -> 2i+1: the data the multi-process tests train on."""
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(24)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("distributed")
    write_sums(tmp / "alpaca.json")
    recipe = write_recipe(tmp / "r.yaml", tiny_llama,
                          {"train": str(tmp / "alpaca.json"), "format": "alpaca", "max_length": 200},
                          train={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "save_every": 3, "lr": 5e-3,
                                 "weight_decay": 0.01, "scheduler": "cosine"})
    two_log = deltafit("train", recipe, "--output", tmp / "two", processes=2)
    assert "2 processes" in two_log  # really two, not two independent single-process runs
    deltafit("train", recipe, "--output", tmp / "one", "--set", "train.grad_accum=2")
    return {"tmp": tmp, "recipe": recipe, "two_log": two_log}


def test_two_processes_equal_one_process_with_double_accumulation(runs):
    tmp = runs["tmp"]
    two, one = tensors(tmp / "two" / "final"), tensors(tmp / "one" / "final")
    diff = max_diff(two, one)
    print(f"\n2 processes vs 1 process with grad_accum x2: max abs difference of the final delta tensors {diff:.3g}")
    assert diff <= TOLERANCE
    # And they did train: the update is far above the tolerance.
    from deltafit.checkpoint import read_meta

    assert read_meta(tmp / "two" / "final")["step"] == 6
    assert max(float(t.abs().max()) for k, t in two.items() if k.endswith(".B")) > 1e-3


def test_main_process_alone_logs_and_saves(runs):
    tmp, log = runs["tmp"], runs["two_log"]
    assert log.count("saved ") == 1  # one final message, not one per process
    steps = [json.loads(line)["step"] for line in (tmp / "two" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 7))
    names = sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir())
    assert names == ["step-00000003"]  # complete, written once, no temp leftovers
    # The multi-process checkpoint holds the full delta: every tensor the single-process one has.
    full = tensors(tmp / "one" / "checkpoints" / "step-00000003")
    saved = tensors(tmp / "two" / "checkpoints" / "step-00000003")
    assert saved.keys() == full.keys() and all(saved[k].shape == full[k].shape for k in full)


def test_resume_a_two_process_checkpoint_in_one_process(runs):
    """Same examples per step (one process accumulating the two processes' micro-batches), so the
    resumed run must land where the uninterrupted two-process run did."""
    tmp = runs["tmp"]
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "two" / "checkpoints", resumed / "checkpoints")
    log = deltafit("train", runs["recipe"], "--output", resumed, "--set", "train.grad_accum=2", "--resume")
    assert "resumed from" in log
    assert max_diff(tensors(resumed / "final"), tensors(tmp / "two" / "final")) <= TOLERANCE


def test_resume_a_one_process_checkpoint_in_two_processes(runs):
    tmp = runs["tmp"]
    resumed = tmp / "resumed-two"
    shutil.copytree(tmp / "one" / "checkpoints", resumed / "checkpoints")
    deltafit("train", runs["recipe"], "--output", resumed, "--resume", processes=2)
    assert max_diff(tensors(resumed / "final"), tensors(tmp / "one" / "final")) <= TOLERANCE


@pytest.mark.parametrize("delta", [
    {"method": "lisa", "interval": 1, "gamma": 1},  # a block opens and another closes at every step
    {"method": "lamda", "r": 4, "freeze_b_by": 0.5},  # B's columns freeze one by one over steps 1-3
    {"method": "aflora", "r": 4, "deltaT": 1, "freeze_start": 0.2, "freeze_end": 0.6},
], ids=lambda d: d["method"])
def test_methods_whose_trainables_change_train_alike_on_two_processes(tmp_path, tiny_llama, delta):
    """DDP stops on a registered parameter that gets no gradient (the first step after a block closes
    or a column freezes) unless it looks for them; and a tensor that stopped training must then stay
    untouched there as on one process (no zero gradient for AdamW's momentum and decay to act on)."""
    write_sums(tmp_path / "alpaca.json")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(tmp_path / "alpaca.json"), "format": "alpaca", "max_length": 200},
                          delta=delta, train={"max_steps": 6, "batch_size": 2, "grad_accum": 1, "lr": 5e-3,
                                              "weight_decay": 0.01})
    deltafit("train", recipe, "--output", tmp_path / "two", processes=2)
    deltafit("train", recipe, "--output", tmp_path / "one", "--set", "train.grad_accum=2")
    two, one = tensors(tmp_path / "two" / "final"), tensors(tmp_path / "one" / "final")
    assert max_diff(two, one) <= TOLERANCE
    base = tensors_before_training(tmp_path, recipe)
    assert max_diff(one, base) > 1e-3  # it trained


def tensors_before_training(tmp_path: Path, recipe: Path) -> dict[str, torch.Tensor]:
    """The delta's tensors as attached, give or take 1e-12 (one step at that learning rate)."""
    deltafit("train", recipe, "--output", tmp_path / "zero", "--set", "train.max_steps=1", "--set", "train.lr=1e-12")
    return tensors(tmp_path / "zero" / "final")
