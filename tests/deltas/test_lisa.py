"""LISA: every K steps a new set of `gamma` blocks trains (sampled uniformly, reproducibly from the
seed), embeddings/norm/head train all along, a re-closed block keeps its optimizer state without
updates, the checkpoint holds the whole model, and resume from schedule_state is exact.

Schedules are driven the way deltafit.train's loop drives them (prepare_inputs + forward, backward,
clip, the trainer's own AdamW from build_optimizer, zero_grad(set_to_none), on_step_end).
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from deltafit import checkpoint, deltas
from deltafit.deltas.lisa import sample_blocks
from deltafit.errors import UserError
from deltafit.recipe import validate_delta
from tests.helpers import run_cli, write_recipe

from delta_testkit import block_of, deeper_llama, forward, make_batch, trainer_parts

BLOCKS, K, GAMMA = 6, 3, 2
OPTIONS = {"interval": K, "gamma": GAMMA, "seed": 11}
TOTAL = 18  # six sampling intervals


@pytest.fixture(scope="module")
def llama6(tiny_llama):
    """A 6-block version of the tiny Llama: enough blocks for the sampled sets to differ."""
    return deeper_llama(tiny_llama, BLOCKS)


def attach(model, head=(), **options):
    delta = deltas.build(validate_delta({"method": "lisa", **options}))
    delta.attach(model, head=head)
    return delta




def train_steps(model, delta, optimizer, scheduler, steps, total, record=None, after=None):
    """deltafit.train's loop body; `record(step)` sees the gradients, `after(step)` the stepped state."""
    batch = make_batch("llama")
    model.train()
    for step in steps:
        model(**delta.prepare_inputs(dict(batch))).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(delta.trainable_parameters().values()), 1.0)
        if record is not None:
            record(step)
        delta.before_optimizer_step(step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        delta.on_step_end(step, total)
        if after is not None:
            after(step)
    model.eval()


def trained_blocks(model, delta, steps=TOTAL, **options) -> dict[int, frozenset]:
    """The blocks that got a gradient in each step of a run (the truth, not the delta's bookkeeping)."""
    delta = delta or attach(model, **options)
    optimizer, scheduler = trainer_parts(delta, steps, weight_decay=0.1)
    params = dict(model.named_parameters())
    seen = {}

    def record(step):
        seen[step] = frozenset(block_of(n) for n, p in params.items() if p.grad is not None) - {None}
        outside = [n for n, p in params.items() if block_of(n) is None]
        assert all(params[n].grad is not None for n in outside), "embeddings / norm / head must train every step"

    train_steps(model, delta, optimizer, scheduler, range(1, steps + 1), steps, record)
    return seen


def test_gamma_blocks_train_and_the_set_changes_every_k_steps(llama6):
    seen = trained_blocks(copy.deepcopy(llama6), None, **OPTIONS)
    intervals = [seen[s] for s in range(1, TOTAL + 1, K)]
    for j, blocks in enumerate(intervals):
        assert len(blocks) == GAMMA
        assert all(seen[s] == blocks for s in range(j * K + 1, (j + 1) * K + 1)), "the set changed inside an interval"
    assert len(set(intervals)) >= 3, "the sampled sets must actually vary"
    assert any(a != b for a, b in zip(intervals, intervals[1:]))


def test_sampling_is_reproducible_from_the_seed_and_the_seed_comes_from_the_run(llama6):
    first = trained_blocks(copy.deepcopy(llama6), None, **OPTIONS)
    again = trained_blocks(copy.deepcopy(llama6), None, **OPTIONS)
    other = trained_blocks(copy.deepcopy(llama6), None, **{**OPTIONS, "seed": 12})
    assert first == again and first != other
    torch.manual_seed(11)  # what the trainer's set_seed(train.seed) does before attach
    model = copy.deepcopy(llama6)
    from_run = attach(model, interval=K, gamma=GAMMA)
    assert from_run.seed == 11 and trained_blocks(model, from_run) == first


def test_sampling_is_uniform():
    counts = Counter(i for j in range(3000) for i in sample_blocks(5, j, BLOCKS, GAMMA))
    expected = 3000 * GAMMA / BLOCKS
    assert set(counts) == set(range(BLOCKS))
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts
    assert all(len(set(sample_blocks(5, j, BLOCKS, GAMMA))) == GAMMA for j in range(200))  # without replacement


def test_a_reclosed_block_keeps_its_optimizer_state_without_updates(llama6):
    model = copy.deepcopy(llama6)
    delta = attach(model, **OPTIONS)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    params = {n: p for n, p in model.named_parameters() if block_of(n) is not None}
    snapshots, problems = {}, []

    def after(step):
        opened = set(delta.open_at(step - 1))  # the blocks that trained in this step
        for n, p in params.items():
            if block_of(n) in opened:
                snapshots[n] = (p.detach().clone(), optimizer.state[p]["exp_avg"].clone())
            elif n in snapshots:  # closed now, trained before: state kept, neither it nor the value moves
                value, exp_avg = snapshots[n]
                if not torch.equal(p, value) or not torch.equal(optimizer.state[p]["exp_avg"], exp_avg):
                    problems.append((step, n))
            elif p in optimizer.state or not torch.equal(p, llama6.get_parameter(n)):
                problems.append((step, n, "never sampled yet, but has state or moved"))

    train_steps(model, delta, optimizer, scheduler, range(1, TOTAL + 1), TOTAL, after=after)
    assert not problems, problems[:3]
    reclosed = {block_of(n) for n in snapshots} - set(delta.open_at(TOTAL))
    assert reclosed, "the run must re-close some block"
    assert all(optimizer.state[p] for n, p in params.items() if block_of(n) in reclosed)  # kept, not dropped


def test_checkpoint_holds_the_whole_model_with_one_key_set(llama6):
    model = copy.deepcopy(llama6)
    delta = attach(model, **OPTIONS)
    keys = set(delta.state_dict())
    assert keys == {n for n, _ in model.named_parameters()}
    trained_blocks(model, delta, steps=4)
    assert set(delta.state_dict()) == keys
    assert len(delta.delta_parameters()) < len(keys)  # only gamma blocks + the rest train now


def test_resume_from_schedule_state_is_exact(llama6, tmp_path):
    stop = 7  # inside the third interval
    straight_model = copy.deepcopy(llama6)
    straight = attach(straight_model, interval=K, gamma=GAMMA)  # seed from the run (torch's initial seed)
    optimizer, scheduler = trainer_parts(straight, TOTAL, weight_decay=0.1)
    train_steps(straight_model, straight, optimizer, scheduler, range(1, TOTAL + 1), TOTAL)

    model = copy.deepcopy(llama6)
    delta = attach(model, interval=K, gamma=GAMMA)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    train_steps(model, delta, optimizer, scheduler, range(1, stop + 1), TOTAL)
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "method": delta.name,
            "delta_config": delta.config.model_dump(mode="json"), "model": {"name": "tiny-llama"}, "task": "causal-lm"}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "progress": {"step": stop}, "method": delta.schedule_state()}
    checkpoint.save(tmp_path / "step", meta, delta.state_dict(), {}, state)
    saved_open = delta.open

    torch.manual_seed(999)  # a new process, another seed: the saved one must win
    model = copy.deepcopy(llama6)
    delta = attach(model, interval=K, gamma=GAMMA)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    _, tensors = checkpoint.load(tmp_path / "step")
    delta.load_state_dict(tensors)
    restored = checkpoint.load_trainer_state(tmp_path / "step")
    optimizer.load_state_dict(restored["optimizer"])
    scheduler.load_state_dict(restored["scheduler"])
    delta.load_schedule_state(restored["method"])
    assert delta.seed == straight.seed != 999 and delta.open == saved_open
    train_steps(model, delta, optimizer, scheduler, range(stop + 1, TOTAL + 1), TOTAL)
    resumed, expected = delta.state_dict(), straight.state_dict()
    assert not [k for k in expected if not torch.equal(resumed[k], expected[k])], "resumed run diverged"


def test_gamma_above_the_block_count_is_refused(llama6):
    model = copy.deepcopy(llama6)
    with pytest.raises(UserError, match=r"'delta.gamma': 7 .*valid: 1\.\.6"):
        attach(model, gamma=7)


def test_merge_is_the_trained_model(llama6):
    model = copy.deepcopy(llama6)
    delta = attach(model, **OPTIONS)
    trained_blocks(model, delta, steps=2)
    batch = make_batch("llama")
    trained = forward(model, delta, batch)
    assert not torch.equal(trained, forward(llama6, None, batch))
    delta.merge()
    assert torch.equal(forward(model, None, batch), trained)


def test_cli_run_saves_the_schedule_then_eval_and_merge(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          delta={"method": "lisa", "gamma": 1, "interval": 2}, train={"max_steps": 4, "save_every": 2})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    state = json.loads((step2 / "trainer" / "state.json").read_text())["method"]
    assert state["step"] == 2 and len(state["open"]) == 1 and isinstance(state["seed"], int)
    base = load_file(str(tiny_llama / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "delta.safetensors"))
    assert set(final) == set(base)  # the whole model
    assert all(not torch.equal(final[k], base[k]) for k in final if block_of(k) is None)  # embeddings, head
    code, out, err = run_cli(capsys, "eval", tmp_path / "run" / "final")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert code == 0, err
