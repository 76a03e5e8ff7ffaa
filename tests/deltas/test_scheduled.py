"""Methods whose delta changes shape or trainability during training (AdaLoRA, AFLoRA).

The schedules run through the Delta hooks. Most tests drive those hooks the way deltafit.train's
loop does (forward + extra_loss, backward, clip, before_optimizer_step, the trainer's own AdamW
from build_optimizer, zero_grad(set_to_none), on_step_end); the last ones run `deltafit train`.
Expected schedules are written out here from the papers' formulas, not taken from the code.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafit import checkpoint, deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta
from tests.helpers import run_cli, write_recipe

from delta_testkit import forward, load_arch, make_batch, trainer_parts


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def attach(spec, **options):
    torch.manual_seed(0)
    model, delta = spec.fresh(), deltas.build(validate_delta(options))
    delta.attach(model, head=spec.head)
    return model, delta


def train_steps(model, delta, optimizer, scheduler, steps, total: int, after_step=None) -> None:
    """deltafit.train's loop body, one optimizer step per batch (no accumulation)."""
    batch = make_batch("llama")
    model.train()
    for step in steps:
        loss = model(**delta.prepare_inputs(dict(batch))).loss
        extra = delta.extra_loss()
        (loss if extra is None else loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(list(delta.trainable_parameters().values()), 1.0)
        delta.before_optimizer_step(step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        delta.on_step_end(step, total)
        if after_step is not None:
            after_step(step)
    model.eval()


# -- AdaLoRA -------------------------------------------------------------------------------------

ADA = {"method": "adalora", "init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 3, "deltaT": 2}
ADA_TOTAL = 14  # budget phase: steps 3..10, masking at even steps; fixed pattern from step 11


def paper_budget(step: int, n: int) -> int:
    """AdaLoRA's b(t) for this run: init_r*n up to tinit, cubic decay to target_r*n at T - tfinal."""
    init, target, tinit, end = 4 * n, 1 * n, ADA["tinit"], ADA_TOTAL - ADA["tfinal"]
    if step <= tinit:
        return init
    if step >= end:
        return target
    return int((init - target) * (1 - (step - tinit) / (end - tinit)) ** 3 + target)


@pytest.fixture(scope="module")
def ada_run(llama):
    """A 14-step AdaLoRA run with the kept ranks and E recorded after every step."""
    model, delta = attach(llama, **ADA)
    optimizer, scheduler = trainer_parts(delta, ADA_TOTAL)
    ranks, masked_e = {}, {}

    def record(step):
        ranks[step] = sum(delta.ranks().values())
        masked_e[step] = torch.cat([u.lora_E.detach().view(-1)[~delta.kept[k]] for k, u in delta._updates().items()])

    train_steps(model, delta, optimizer, scheduler, range(1, ADA_TOTAL + 1), ADA_TOTAL, record)
    return model, delta, ranks, masked_e


def test_adalora_kept_rank_follows_the_cubic_budget(ada_run):
    _, delta, ranks, masked_e = ada_run
    n = len(delta.insertions.hosts)
    final_start = ADA_TOTAL - ADA["tfinal"]
    expected, current = {}, 4 * n
    for step in range(1, ADA_TOTAL + 1):
        if ADA["tinit"] < step < final_start and step % ADA["deltaT"] == 0 or step == final_start:
            current = paper_budget(step, n)  # an allocation round
        expected[step] = current
    assert ranks == expected
    assert len(set(expected.values())) >= 4, "the run must actually walk down the schedule"
    assert ranks[ADA_TOTAL] == ADA["target_r"] * n
    for step in range(3, ADA_TOTAL + 1):
        if step % 2 == 0 or step >= final_start:  # right after a masking: pruned E entries are exactly 0
            assert masked_e[step].numel() == 4 * n - ranks[step]
            assert torch.count_nonzero(masked_e[step]) == 0


def test_adalora_budget_matches_peft_formula(llama):
    """delta.budget() against PEFT's RankAllocator.budget_schedule on the same numbers."""
    from peft.tuners.adalora.layer import RankAllocator

    _, delta = attach(llama, **ADA)
    n = len(delta.insertions.hosts)
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config = type("C", (), {"tinit": 2, "tfinal": 3, "total_step": ADA_TOTAL, "deltaT": 2})()
    allocator.init_bgt, allocator.target_bgt = 4 * n, 1 * n
    assert [delta.budget(s, ADA_TOTAL) for s in range(1, ADA_TOTAL + 1)] == \
           [allocator.budget_schedule(s)[0] for s in range(1, ADA_TOTAL + 1)]


def test_adalora_final_tensors_are_trimmed_and_reload_to_the_same_logits(ada_run, llama, tmp_path):
    model, delta, _, _ = ada_run
    batch = make_batch("llama")
    trained = forward(model, delta, batch)
    final = delta.final_state_dict()
    ranks = delta.ranks()
    for key, rank in ranks.items():
        assert final[f"{key}.lora_A"].shape == (rank, delta._updates()[key].in_features)
        assert final[f"{key}.lora_E"].shape == (rank, 1)
        assert final[f"{key}.lora_B"].shape[1] == rank
    assert sorted(set(ranks.values())) != [4], "nothing was trimmed"
    save_file({k: v.contiguous() for k, v in final.items()}, tmp_path / "delta.safetensors")

    model2, delta2 = attach(llama, **ADA)
    delta2.load_state_dict(load_file(tmp_path / "delta.safetensors"))
    assert delta2.ranks() == ranks
    assert (forward(model2, delta2, batch) - trained).abs().max().item() <= 1e-6
    assert delta2.final_state_dict().keys() == final.keys()
    assert all(torch.equal(delta2.final_state_dict()[k], final[k]) for k in final)  # trimmed form round-trips
    delta2.merge()
    assert (forward(model2, None, batch) - trained).abs().max().item() <= 1e-5


def test_adalora_rejects_inconsistent_trimmed_tensors(ada_run, llama):
    _, delta, _, _ = ada_run
    final = dict(delta.final_state_dict())
    key = next(k for k, r in delta.ranks().items() if r > 0)
    final[f"{key}.lora_A"] = final[f"{key}.lora_A"][:-1]  # one row short of its E
    _, delta2 = attach(llama, **ADA)
    with pytest.raises(UserError, match="lora_A"):
        delta2.load_state_dict(final)


def test_adalora_orthogonality_regularizer(llama):
    _, delta = attach(llama, **ADA)
    terms = []
    for update in delta._updates().values():
        a, b = update.lora_A, update.lora_B
        terms.append(torch.linalg.norm(a @ a.T - torch.eye(a.shape[0]), "fro"))
        terms.append(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1]), "fro"))
    expected = 0.5 * torch.stack(terms).mean()
    got = delta.extra_loss()
    assert torch.allclose(got, expected) and got.item() > 0.5  # N(0, 0.02) rows are far from orthonormal
    got.backward()
    assert all(u.lora_A.grad is not None and u.lora_A.grad.abs().sum() > 0 for u in delta._updates().values())
    _, off = attach(llama, **{**ADA, "orth_reg_weight": 0})
    assert off.extra_loss() is None


def test_adalora_run_without_budget_phase_is_a_user_error(llama):
    model, delta = attach(llama, **{**ADA, "tinit": 5, "tfinal": 5})
    optimizer, scheduler = trainer_parts(delta, 10)
    with pytest.raises(UserError, match="delta.tinit"):
        train_steps(model, delta, optimizer, scheduler, [1], 10)


def test_adalora_target_above_init_is_rejected():
    with pytest.raises(UserError, match="target_r"):
        validate_delta({"method": "adalora", "init_r": 4, "target_r": 6})


# -- AFLoRA --------------------------------------------------------------------------------------

AF = {"method": "aflora", "r": 2, "deltaT": 2, "freeze_start": 0.2, "freeze_end": 0.8}
AF_TOTAL = 20  # freezing rounds at even steps 6..14, everything frozen from step 16


def paper_frozen(step: int, n: int, previous: int) -> int:
    """Frozen projections after `step`: N - N (1 - progress)^3 at each round (every deltaT steps)."""
    start, end = round(0.2 * AF_TOTAL), round(0.8 * AF_TOTAL)
    if step <= start:
        return 0
    if step >= end:
        return n
    if step % AF["deltaT"]:
        return previous
    return n - int(n * (1 - (step - start) / (end - start)) ** 3)


def test_aflora_freezing_follows_the_schedule_and_frozen_tensors_stop(llama):
    model, delta = attach(llama, **AF)
    optimizer, scheduler = trainer_parts(delta, AF_TOTAL, weight_decay=0.1)  # decay would move a leaked tensor
    projections = delta.projections()
    n = len(projections)
    counts, expected, snapshots, leaks, rounds = {}, {}, {}, [], []

    def check(step):
        counts[step] = len(delta.frozen)
        expected[step] = paper_frozen(step, n, expected.get(step - 1, 0))
        new = [name for name in delta.frozen if name not in snapshots]
        if new:
            remaining = [name for name in projections if name not in delta.frozen]
            score = lambda name: float(delta.ema.score(name, projections[name]).mean())
            rounds.append((max(map(score, new)), min(map(score, remaining), default=float("inf"))))
        for name in new:  # value and AdamW momentum at the moment of freezing
            p = projections[name]
            snapshots[name] = (p.detach().clone(), optimizer.state[p]["exp_avg"].clone())
        for name, (value, exp_avg) in snapshots.items():
            p = projections[name]
            if p.requires_grad or not torch.equal(p, value) or not torch.equal(optimizer.state[p]["exp_avg"], exp_avg):
                leaks.append((step, name))
        trainable = {id(p) for p in delta.trainable_parameters().values()}
        assert not any(id(projections[name]) in trainable for name in delta.frozen)

    vectors_before = {k: v.detach().clone() for k, v in delta.state_dict().items() if "lambda" in k}
    train_steps(model, delta, optimizer, scheduler, range(1, AF_TOTAL + 1), AF_TOTAL, check)
    assert counts == expected
    assert 0 < counts[6] < counts[8] < counts[10] < n == counts[16], "the run must freeze gradually, then everything"
    assert not leaks, f"frozen tensors still moved: {leaks[:3]}"
    assert all(high <= low for high, low in rounds), "a round froze a tensor scoring above one it kept"
    state = delta.state_dict()
    assert all(not torch.equal(state[k], v) for k, v in vectors_before.items()), "the vectors train to the end"
    assert set(projections) <= set(state)  # frozen tensors stay in the checkpoint


def test_aflora_scores_are_windowed_gradient_magnitudes(llama):
    model, delta = attach(llama, **{**AF, "deltaT": 3})
    optimizer, scheduler = trainer_parts(delta, 100)
    name, p = next(iter(delta.projections().items()))
    grads = []
    original = delta.before_optimizer_step

    def spy(step):
        grads.append(p.grad.detach().abs().clone())
        original(step)

    delta.before_optimizer_step = spy
    with torch.no_grad():  # b = 0 would give A and B no gradient at all in the first step
        for _, _, update in delta.insertions.hosts.values():
            update.lambda_b.fill_(0.5)
    train_steps(model, delta, optimizer, scheduler, range(1, 7), 100)
    first, second = sum(grads[:3]) / 3, sum(grads[3:]) / 3
    ibar1 = 0.15 * first
    ubar1 = 0.05 * (first - ibar1).abs()
    ibar2 = 0.85 * ibar1 + 0.15 * second
    ubar2 = 0.95 * ubar1 + 0.05 * (second - ibar2).abs()
    assert torch.allclose(delta.ema.ibar[name], ibar2) and torch.allclose(delta.ema.ubar[name], ubar2)


def test_aflora_bad_freeze_window_is_rejected():
    with pytest.raises(UserError, match="freeze_start"):
        validate_delta({"method": "aflora", "freeze_start": 0.8, "freeze_end": 0.5})


# -- both: resume --------------------------------------------------------------------------------


_STRAIGHT: dict = {}


def _uninterrupted(spec, key: str, options: dict, total: int) -> dict:
    """Final tensors of the run without a break (computed once per method)."""
    if key not in _STRAIGHT:
        model, delta = attach(spec, **options)
        optimizer, scheduler = trainer_parts(delta, total, weight_decay=0.1)
        train_steps(model, delta, optimizer, scheduler, range(1, total + 1), total)
        _STRAIGHT[key] = delta.state_dict()
    return _STRAIGHT[key]


@pytest.mark.parametrize("options,total,stop", [
    pytest.param(ADA, ADA_TOTAL, 7, id="adalora-budget-phase"),
    pytest.param(ADA, ADA_TOTAL, 12, id="adalora-final-phase"),
    pytest.param(AF, AF_TOTAL, 9, id="aflora-while-freezing"),
])
def test_resumed_run_continues_identically(llama, tmp_path, options, total, stop):
    straight = _uninterrupted(llama, options["method"], options, total)

    model, delta = attach(llama, **options)
    optimizer, scheduler = trainer_parts(delta, total, weight_decay=0.1)
    train_steps(model, delta, optimizer, scheduler, range(1, stop + 1), total)
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "method": delta.name,
            "delta_config": delta.config.model_dump(mode="json"), "model": {"name": "tiny-llama"}, "task": "causal-lm"}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "progress": {"step": stop}, "method": delta.schedule_state()}
    checkpoint.save(tmp_path / "step", meta, delta.state_dict(), {}, state)
    del model, delta, optimizer, scheduler

    # A new process would do this: fresh model and delta, then the trainer's _restore order.
    model, delta = attach(llama, **options)
    torch.manual_seed(1234)  # whatever the fresh init, loading must override it
    optimizer, scheduler = trainer_parts(delta, total, weight_decay=0.1)
    _, tensors = checkpoint.load(tmp_path / "step")
    delta.load_state_dict(tensors)
    restored = checkpoint.load_trainer_state(tmp_path / "step")
    optimizer.load_state_dict(restored["optimizer"])
    scheduler.load_state_dict(restored["scheduler"])
    delta.load_schedule_state(restored["method"])
    train_steps(model, delta, optimizer, scheduler, range(stop + 1, total + 1), total)
    resumed = delta.state_dict()
    assert resumed.keys() == straight.keys()
    different = [k for k in straight if not torch.equal(resumed[k], straight[k])]
    assert not different, f"resumed run diverged: {different[:3]}"


# -- end to end through the CLI ------------------------------------------------------------------


@pytest.mark.parametrize("delta_options", [
    pytest.param({"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1}, id="adalora"),
    pytest.param({"method": "aflora", "r": 2, "deltaT": 1, "freeze_start": 0.3, "freeze_end": 0.7}, id="aflora"),
])
def test_cli_train_runs_the_schedule_then_eval_and_merge_work(tmp_path, tiny_llama, alpaca_file, capsys, delta_options):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          delta=delta_options, train={"max_steps": 6, "save_every": 5})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    tensors = load_file(str(final / "delta.safetensors"))
    step5 = tmp_path / "run" / "checkpoints" / "step-00000005"
    trainer_state = json.loads((step5 / "trainer" / "state.json").read_text())["method"]
    if delta_options["method"] == "adalora":
        ranks = [t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E")]
        assert len(ranks) == 4 and sum(ranks) == 2 * len(ranks)  # target_r x targets (q, v in 2 blocks)
        assert all(tensors[k.replace("lora_E", "lora_A")].shape[0] == tensors[k].shape[0]
                   for k in tensors if "lora_E" in k)
        assert set(trainer_state["kept"]) and "ema" in trainer_state
    else:  # everything frozen from step round(0.7*6) = 4: the final A/B equal those of step 5
        step_tensors = load_file(str(step5 / "delta.safetensors"))
        projections = [k for k in tensors if k.endswith((".lora_A", ".lora_B"))]
        assert sorted(trainer_state["frozen"]) == sorted(projections) and len(projections) == 8
        assert all(torch.equal(tensors[k], step_tensors[k]) for k in projections)
        assert any(not torch.equal(tensors[k], step_tensors[k]) for k in tensors if "lambda_b" in k)
    code, out, err = run_cli(capsys, "eval", final)
    assert code == 0, err
    assert json.loads(final.with_name("final-eval.json").read_text())["tokens"] > 0
    code, out, err = run_cli(capsys, "merge", final, "--output", tmp_path / "merged")
    assert code == 0, err
    assert "max abs diff" in out


@pytest.mark.parametrize("command", ["validate", "train"])
def test_cli_refuses_a_run_too_short_for_the_budget_before_training(tmp_path, tiny_llama, alpaca_file, capsys, command):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          delta={"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 200, "tfinal": 500},
                          train={"max_steps": 6})
    argv = [command, recipe] + (["--output", tmp_path / "run"] if command == "train" else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "'delta.tinit' (200)" in err and "6-step run" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step
