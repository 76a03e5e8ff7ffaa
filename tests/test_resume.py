"""Training you can trust: exact resume after SIGKILL, graceful SIGINT/SIGTERM, checkpoints that
are never half-picked-up, non-finite losses, full disks.

Runs that must be killed mid-flight run as real subprocesses (`deltafit train` through the CLI's
own entry point). A tiny model trains in milliseconds per step, so the child slows each forward
pass a little to leave time to kill it between steps, and can kill itself in the middle of a
checkpoint write: both through the trainer's public hooks (`deltafit.train.TrainHooks`, see CHILD).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli, write_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16

# The child: `deltafit train ...` with two optional hooks: sleep before each forward pass, and SIGKILL
# itself while writing a chosen step checkpoint (every file but the metadata is in the temp
# directory; one is cut short first, as if the kill had come in the middle of writing it).
CHILD = """
import os, signal, sys, time
from pathlib import Path
from deltafit.cli import main
from deltafit.train import TrainHooks, use_hooks
delay = float(os.environ.get("SLOW_FORWARD", "0"))
kill_at = int(os.environ.get("KILL_DURING_SAVE", "0"))
def slow_forward(run, batch):
    time.sleep(delay)
def die_during_save(run, tmp_dir):
    if run.progress.step == kill_at and (Path(tmp_dir) / "trainer").is_dir():
        state = Path(tmp_dir) / "trainer" / "state.safetensors"
        state.write_bytes(state.read_bytes()[:7])
        os.kill(os.getpid(), signal.SIGKILL)
with use_hooks(TrainHooks(before_forward=slow_forward, during_save=die_during_save)):
    main(sys.argv[1:])
"""


@pytest.fixture()
def recipe(tmp_path, tiny_llama, alpaca_file):
    # Dropout on the LoRA path makes the run depend on the RNG state, which resume must restore.
    return write_recipe(tmp_path / "r.yaml", tiny_llama,
                        {"train": str(alpaca_file), "format": "alpaca", "max_length": 200},
                        delta={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                        train={"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "save_every": 3, "keep_last": 10,
                               "lr": 5e-3, "scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01})


def start(recipe: Path, output: Path, *extra, slow: float = 0.0,
          kill_during_save: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "SLOW_FORWARD": str(slow), "PYTHONPATH": str(ROOT)}
    if kill_during_save:
        env["KILL_DURING_SAVE"] = str(kill_during_save)
    return subprocess.Popen([sys.executable, "-c", CHILD, "train", str(recipe), "--output", str(output), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def wait_for_step(output: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Block until metrics.jsonl shows `step` (or later); return the step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = logged_steps(output)
        if seen and seen[-1] >= step:
            return seen[-1]
        assert proc.poll() is None, finish(proc)[1]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def logged_steps(output: Path) -> list[int]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "loss" in record:
            steps.append(record["step"])
    return steps


def final_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "final" / "delta.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max abs difference {worst}"


@pytest.fixture()
def reference(recipe, tmp_path):
    """The uninterrupted run every interrupted one must reproduce."""
    code, out = finish(start(recipe, tmp_path / "reference"))
    assert code == 0, out
    return final_tensors(tmp_path / "reference")


def kill_and_resume(recipe: Path, run: Path, after_step: int) -> int:
    """SIGKILL a slowed run once it has logged `after_step` (wherever it is then), check it left no
    final checkpoint, resume it to the end; returns the step it was killed after."""
    proc = start(recipe, run, slow=0.05)
    killed_after = wait_for_step(run, after_step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    code, out = finish(start(recipe, run, "--resume"))
    assert code == 0, out
    assert "resumed from" in out
    return killed_after


def test_sigkill_at_an_arbitrary_step_then_resume_is_bitwise_identical(recipe, reference, tmp_path):
    run = tmp_path / "killed"
    killed_after = kill_and_resume(recipe, run, 8)  # between checkpoints 6 and 9, wherever it is
    assert_bitwise_equal(final_tensors(run), reference)
    # The log is rewritten from the resumed step: every step exactly once, none missing.
    assert logged_steps(run) == list(range(1, STEPS + 1)), f"killed after step {killed_after}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(recipe, reference, tmp_path, signum):
    run = tmp_path / "signalled"
    proc = start(recipe, run, slow=0.05)
    wait_for_step(run, 4, proc)
    proc.send_signal(signum)
    code, out = finish(proc)
    assert code == 128 + signum, out
    assert "Traceback" not in out
    assert "--resume" in out and "interrupted at step" in out
    # the command to resume names this run's recipe (shell-quoted), not a placeholder
    assert f"Resume with: {shlex.join(['deltafit', 'train', str(recipe), '--output', str(run), '--resume'])}" in out
    stopped_at = int(out.split("interrupted at step ")[1].split(":")[0])
    assert stopped_at < STEPS
    assert (run / "checkpoints" / f"step-{stopped_at:08d}" / "deltafit.json").is_file()  # not only save_every steps
    code, out = finish(start(recipe, run, "--resume"))
    assert code == 0, out
    assert_bitwise_equal(final_tensors(run), reference)
    assert logged_steps(run) == list(range(1, STEPS + 1))


def test_killed_during_save_the_half_written_checkpoint_is_never_used(recipe, reference, tmp_path):
    run = tmp_path / "killed-saving"
    code, out = finish(start(recipe, run, kill_during_save=9))
    assert code == -signal.SIGKILL, out
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step-00000006" / "deltafit.json").is_file()
    assert not (checkpoints / "step-00000009").exists()
    assert list(checkpoints.glob(".step-00000009.tmp*")), "the kill should leave a temp dir behind"
    code, out = finish(start(recipe, run, "--resume"))
    assert code == 0, out
    assert "step-00000006" in out  # the last complete one
    assert_bitwise_equal(final_tensors(run), reference)
    assert not list(checkpoints.glob(".step-*.tmp*"))  # cleaned up by the resumed run


@pytest.mark.parametrize("damage", ["truncate tensors", "truncate trainer state", "delete metadata"])
def test_a_damaged_latest_checkpoint_is_passed_over(recipe, tmp_path, capsys, damage, alpaca_file):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", recipe, "--output", run, "--set", "train.max_steps=7")
    assert code == 0, err
    latest = run / "checkpoints" / "step-00000006"
    target = {"truncate tensors": latest / "delta.safetensors",
              "truncate trainer state": latest / "trainer" / "state.safetensors",
              "delete metadata": latest / "deltafit.json"}[damage]
    if damage == "delete metadata":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        code, out, err = run_cli(capsys, "eval", latest, "--data", alpaca_file)
        assert code == 2 and "damaged" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "train", recipe, "--output", run, "--set", "train.max_steps=7", "--resume")
    assert code == 0, err
    assert "resumed from" in out + err and "step-00000003" in out + err
    if damage != "delete metadata":
        assert "skipping damaged checkpoint" in err
    # The resumed run wrote step 6 again, whole this time.
    code, out, err = run_cli(capsys, "eval", latest, "--data", alpaca_file)
    assert code == 0, err


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(recipe, tmp_path, capsys):
    run = tmp_path / "diverged"
    # An absurd learning rate without clipping blows the weights up within a few steps.
    code, out, err = run_cli(capsys, "train", recipe, "--output", run, "--set", "train.lr=1e30",
                             "--set", "train.max_grad_norm=null", "--set", "train.save_every=1",
                             "--set", "train.warmup_steps=0")
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "training stopped at step" in message and "non-finite" in message and "on_nonfinite=skip" in message
    bad_step = int(message.split("training stopped at step ")[1].split(":")[0])
    kept = run / "checkpoints" / f"step-{bad_step - 1:08d}"
    assert str(kept) in message
    tensors = load_file(str(kept / "delta.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (run / "checkpoints" / f"step-{bad_step:08d}").exists()


def test_nonfinite_steps_can_be_skipped_and_are_logged(recipe, tmp_path, capsys):
    run = tmp_path / "skipping"
    code, out, err = run_cli(capsys, "train", recipe, "--output", run, "--set", "train.lr=1e30",
                             "--set", "train.max_grad_norm=null", "--set", "train.on_nonfinite=skip",
                             "--set", "train.warmup_steps=0", "--set", "train.max_steps=6")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped and "skipped" in err
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert all(torch.isfinite(t).all() for t in final_tensors(run).values())  # skipped updates never landed


def test_too_little_disk_space_is_refused_before_training(recipe, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "full")
    assert code == 2
    assert "MiB free" in err and "keep_last" in err and "Traceback" not in err
    assert not (tmp_path / "full" / "metrics.jsonl").exists()


def test_disk_full_mid_run_leaves_the_previous_checkpoint_intact(recipe, tmp_path, capsys, monkeypatch, alpaca_file):
    import errno

    from deltafit import checkpoint

    real_save = checkpoint.save_file
    calls = {"n": 0}

    def filling_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second step checkpoint's delta tensors (1st: step 3 delta, 2nd: its trainer state)
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", filling_disk)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", recipe, "--output", run)
    assert code == 2
    assert "No space left on device" in err and "step-00000006" in err and "Traceback" not in err
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"]  # no partial copy left
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "eval", checkpoints / "step-00000003", "--data", alpaca_file)
    assert code == 0, err
