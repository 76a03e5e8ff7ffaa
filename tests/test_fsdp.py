"""`train.fsdp: true`: two CPU processes (gloo) with the model sharded by FSDP2 (`fully_shard`, which
deltafit applies itself: Accelerate on CPU only does DDP), against two DDP processes and one process
with twice the gradient accumulation. The same examples make up every optimizer step, so the final
deltas must agree up to float reassociation: FSDP reduce-scatters and averages gradients where DDP
all-reduces them and one process accumulates them, and the gradient norm is summed over shards.
Tolerance: 1e-5 absolute on every delta tensor (as tests/test_distributed.py), against updates of
order 1e-2; measured on torch 2.13 CPU: 0 (FSDP vs DDP) and about 5e-8 (vs one process).

Also: the final checkpoint holds the whole delta (not the empty or shard-sized tensors PEFT users get
under ZeRO-3), step checkpoints hold the optimizer state as per-process safetensors + JSON shards
(nothing pickled), and a run resumes from such a checkpoint exactly, with two processes and with one.
Methods the sharding would silently break are refused (one case here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deltafit.errors import UserError
from tests.helpers import write_recipe
from tests.test_distributed import MULTI_PROCESS, deltafit, launch_command, max_diff, tensors, write_sums

pytestmark = MULTI_PROCESS  # one worker runs every multi-process launch (see tests/test_distributed.py)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("fsdp")
    write_sums(tmp / "alpaca.json")
    # 24 rows, 2 per micro-batch, 2 processes x 2 accumulated: 3 steps an epoch, so 6 steps cross an
    # epoch and the step-2 checkpoint sits in the middle of one.
    recipe = write_recipe(tmp / "r.yaml", tiny_llama,
                          {"train": str(tmp / "alpaca.json"), "format": "alpaca", "max_length": 200},
                          train={"max_steps": 6, "batch_size": 2, "grad_accum": 2, "save_every": 2, "keep_last": 5,
                                 "lr": 5e-3, "weight_decay": 0.01, "scheduler": "cosine", "fsdp": True})
    fsdp_log = deltafit("train", recipe, "--output", tmp / "fsdp", processes=2)
    assert "2 processes" in fsdp_log
    deltafit("train", recipe, "--output", tmp / "ddp", "--set", "train.fsdp=false", processes=2)
    # One process: train.fsdp is ignored there.
    deltafit("train", recipe, "--output", tmp / "one", "--set", "train.grad_accum=4")
    return {"tmp": tmp, "recipe": recipe}


def test_fsdp_equals_ddp_and_one_process(runs):
    tmp = runs["tmp"]
    fsdp, ddp, one = (tensors(tmp / name / "final") for name in ("fsdp", "ddp", "one"))
    vs_ddp, vs_one = max_diff(fsdp, ddp), max_diff(fsdp, one)
    print(f"\nFSDP final delta: max abs difference {vs_ddp:.3g} vs DDP, {vs_one:.3g} vs one process")
    assert vs_ddp <= TOLERANCE and vs_one <= TOLERANCE
    assert max(float(t.abs().max()) for k, t in fsdp.items() if k.endswith(".B")) > 1e-3  # it did train


def test_final_checkpoint_holds_the_whole_delta(runs):
    """Not empty, not one process's shard: every tensor with its full shape (PEFT's ZeRO-3 failure)."""
    tmp = runs["tmp"]
    for checkpoint in ("final", "checkpoints/step-00000002"):
        saved, full = tensors(tmp / "fsdp" / checkpoint), tensors(tmp / "one" / checkpoint)
        assert saved and saved.keys() == full.keys()
        assert all(saved[k].shape == full[k].shape and saved[k].numel() > 0 for k in full)
        assert max_diff(saved, full) <= TOLERANCE


def test_step_checkpoints_are_shards_without_pickle(runs):
    tmp = runs["tmp"]
    checkpoints = tmp / "fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]  # no leftovers
    step = checkpoints / "step-00000002"
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert {Path(f).suffix for f in files} == {".json", ".safetensors", ".yaml"}, files
    shards = [f for f in files if f.startswith("trainer/shards/")]
    assert shards == [f"trainer/shards/rank-0000{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
    # Each process wrote only its own rows of each optimizer tensor; together they cover them all.
    layouts = [json.loads((step / f).read_text())["tensors"] for f in shards if f.endswith(".json")]
    pieces = [load_file(str(step / f)) for f in shards if f.endswith(".safetensors")]
    assert layouts[0].keys() == layouts[1].keys() and any(k.endswith("exp_avg") for k in layouts[0])
    for key, where in layouts[0].items():
        assert where["start"] == 0 and layouts[1][key]["start"] == pieces[0][key].shape[0]
        assert pieces[0][key].shape[0] + pieces[1][key].shape[0] == where["shape"][0]
    # Listed in the manifest, so a damaged shard makes the checkpoint one --resume passes over.
    assert set(shards) <= set(json.loads((step / "deltafit.json").read_text())["files"])


@pytest.mark.parametrize("processes", [2, 1])
def test_resume_an_fsdp_checkpoint(runs, processes):
    """From the middle step checkpoint, with the same and with another number of processes (one
    process accumulates what the two did): the end is where the uninterrupted run ended."""
    tmp = runs["tmp"]
    resumed = tmp / f"resumed-{processes}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp / "fsdp" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    extra = ["--set", "train.grad_accum=4"] if processes == 1 else []
    log = deltafit("train", runs["recipe"], "--output", resumed, "--resume", *extra, processes=processes)
    assert "resumed from" in log and "at step 2" in log
    diff = max_diff(tensors(resumed / "final"), tensors(tmp / "fsdp" / "final"))
    print(f"\nFSDP checkpoint resumed on {processes} process(es): max abs difference {diff:.3g}")
    assert diff <= TOLERANCE


def test_methods_that_hold_base_parameters_are_refused(runs, tiny_llama):
    """fully_shard replaces the base's parameters; a method training them through its own references
    (full fine-tuning here) would train stale copies: refused before the first step, on every process."""
    import os
    import subprocess

    from tests.test_distributed import ROOT

    tmp = runs["tmp"]
    recipe = write_recipe(tmp / "full.yaml", tiny_llama, {"train": str(tmp / "alpaca.json"), "format": "alpaca"},
                          delta={"method": "full"}, train={"max_steps": 2, "batch_size": 2, "fsdp": True})
    cmd = launch_command(2, "train", recipe, "--output", tmp / "full")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "recipe key 'train.fsdp': method 'full' holds its own references" in proc.stdout + proc.stderr


def test_missing_shard_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from deltafit.sharding import join_shards

    save_file({"optimizer.state.0.exp_avg": torch.ones(2, 3)}, str(tmp_path / "rank-00000.safetensors"))
    layout = {"optimizer.state.0.exp_avg": {"shape": [4, 3], "start": 0}}
    (tmp_path / "rank-00000.json").write_text(json.dumps({"rank": 0, "tensors": layout}))
    with pytest.raises(UserError, match="a shard file is missing"):
        join_shards(tmp_path)
