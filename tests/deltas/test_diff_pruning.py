"""Diff pruning: hard-concrete gates, the expected-L0 term, magnitude pruning to a density, the sparse
checkpoint and the exact merge. Expected values are written out from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import TrainSpec, validate_delta
from deltafit.train import build_optimizer, build_scheduler
from tests.helpers import run_cli, write_recipe

from delta_testkit import forward, load_arch, make_batch

GATED = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)  # tiny Llama: q, k, v, o, gate, up, down in 2 blocks


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def attach(spec, **options):
    torch.manual_seed(0)
    model, delta = spec.fresh(), deltas.build(validate_delta({"method": "diff-pruning", **options}))
    delta.attach(model, head=spec.head)
    return model, delta


def run_steps(model, delta, steps, total: int, optimizer=None, scheduler=None):
    """deltafit.train's loop body (forward + extra_loss, backward, clip, step, on_step_end)."""
    if optimizer is None:
        t = TrainSpec(lr=1e-2, max_steps=total, scheduler="constant")
        optimizer = build_optimizer(delta, t)
        scheduler = build_scheduler(optimizer, t, total)
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
    model.eval()
    return optimizer, scheduler


def effective(delta) -> dict[str, torch.Tensor]:
    """z * delta at eval, per target."""
    with torch.no_grad():
        return {key: u.delta_weight().clone() for key, u in delta._updates().items()}


# -- gates and the L0 term -------------------------------------------------------------------------


def test_all_linears_get_a_delta_and_a_gate_logit_per_weight(llama):
    model, delta = attach(llama)
    assert len(delta._updates()) == 14
    assert sum(p.numel() for p in delta.delta_parameters().values()) == 2 * GATED


def test_gate_is_hard_concrete(llama):
    model, delta = attach(llama)
    update = next(iter(delta._updates().values()))
    update.eval()
    assert torch.equal(update.gate(), torch.ones_like(update.alpha))  # alpha 5: clamp(0.993*3 - 1.5) = 1
    with torch.no_grad():
        update.alpha.fill_(-5.0)
    assert torch.equal(update.gate(), torch.zeros_like(update.alpha))
    with torch.no_grad():
        update.alpha.fill_(math.log(2.0))
    assert torch.allclose(update.gate(), torch.full_like(update.alpha, 0.5))  # sigmoid = 2/3: 2/3 * 3 - 1.5
    # Training: z = clamp(sigmoid(logit(u) + alpha) * 3 - 1.5, 0, 1). At alpha = 5, z < 1 exactly when
    # logit(u) < log(5) - 5, i.e. with probability sigmoid(log 5 - 5) = 3.26%.
    with torch.no_grad():
        update.alpha.fill_(5.0)
    update.train()
    torch.manual_seed(0)
    z = torch.cat([update.gate().flatten() for _ in range(20)])
    assert z.min() >= 0 and z.max() <= 1
    below = (z < 1).float().mean().item()
    assert abs(below - 1 / (1 + math.exp(5 - math.log(5)))) < 0.004, below


def test_l0_term_is_in_the_loss_and_decreases_with_alpha(llama):
    model, delta = attach(llama, l0_lambda=1e-3)
    penalty = delta.extra_loss()
    assert penalty.item() == pytest.approx(1e-3 * GATED / (1 + math.exp(-5.0)), rel=1e-5)  # sigmoid(alpha - log 1)
    penalty.backward()
    for update in delta._updates().values():  # d/d alpha of lambda sigmoid(alpha): positive, lambda s (1 - s)
        s = 1 / (1 + math.exp(-5.0))
        assert torch.allclose(update.alpha.grad, torch.full_like(update.alpha, 1e-3 * s * (1 - s)))
    with torch.no_grad():
        for update in delta._updates().values():
            update.alpha.sub_(1.0)
    assert delta.extra_loss().item() < penalty.item()
    model, delta = attach(llama, l0_lambda=0.0)
    assert delta.extra_loss() is None


# -- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.005, 0.05])
def test_final_density_is_the_one_asked_and_keeps_the_largest(llama, density):
    model, delta = attach(llama, density=density)
    run_steps(model, delta, range(1, 5), total=5)
    assert not delta.pruned
    before = effective(delta)
    delta.on_step_end(5, 5)  # the end of the last step: prune
    assert delta.pruned and delta.extra_loss() is None
    after = effective(delta)
    kept = sum(int((d != 0).sum()) for d in after.values())
    assert kept == round(density * GATED)
    # The kept entries keep their values and are the largest |z * delta|, over all tensors at once.
    assert all(torch.equal(after[k], before[k] * (after[k] != 0)) for k in after)
    smallest_kept = min(before[k][after[k] != 0].abs().min() for k in after if (after[k] != 0).any())
    largest_dropped = max(before[k][after[k] == 0].abs().max() for k in after)
    assert smallest_kept >= largest_dropped
    assert len({k for k in after if (after[k] != 0).any()}) > 1  # one global ranking, not one tensor


def test_fixed_mask_phase_trains_kept_values_only(llama):
    model, delta = attach(llama, density=0.05, fixed_mask_steps=2)
    parts = run_steps(model, delta, range(1, 5), total=6)  # pruned after step 4 = 6 - 2
    assert delta.pruned
    masks = {k: d != 0 for k, d in effective(delta).items()}
    values = effective(delta)
    assert all(not u.alpha.requires_grad for u in delta._updates().values())
    assert all(not n.endswith(".alpha") for n in delta.trainable_parameters())
    run_steps(model, delta, range(5, 7), 6, *parts)
    later = effective(delta)
    assert all(torch.equal(later[k] != 0, masks[k]) for k in masks), "the mask moved in the fixed phase"
    assert any(not torch.equal(later[k], values[k]) for k in masks), "the kept values did not train"
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * GATED)


def test_run_too_short_for_the_fixed_mask_phase_is_refused(llama):
    _, delta = attach(llama, fixed_mask_steps=5)
    delta.check_run(6)
    with pytest.raises(UserError, match="delta.fixed_mask_steps"):
        delta.check_run(5)


def test_resume_in_the_fixed_phase_is_exact(llama, tmp_path):
    from deltafit import checkpoint

    model, delta = attach(llama, density=0.05, fixed_mask_steps=3)
    parts = run_steps(model, delta, range(1, 5), total=7)
    state = {"optimizer": parts[0].state_dict(), "scheduler": parts[1].state_dict(), "progress": {"step": 4},
             "method": delta.schedule_state()}
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "method": delta.name,
            "delta_config": delta.config.model_dump(mode="json"), "model": {"name": "tiny-llama"}, "task": "causal-lm"}
    checkpoint.save(tmp_path / "step", meta, delta.state_dict(), {}, state)
    run_steps(model, delta, range(5, 8), 7, *parts)
    straight = delta.final_state_dict()

    model, delta = attach(llama, density=0.05, fixed_mask_steps=3)
    t = TrainSpec(lr=1e-2, max_steps=7, scheduler="constant")
    optimizer = build_optimizer(delta, t)
    scheduler = build_scheduler(optimizer, t, 7)
    _, tensors = checkpoint.load(tmp_path / "step")
    delta.load_state_dict(tensors)
    restored = checkpoint.load_trainer_state(tmp_path / "step")
    optimizer.load_state_dict(restored["optimizer"])
    scheduler.load_state_dict(restored["scheduler"])
    delta.load_schedule_state(restored["method"])
    assert delta.pruned
    run_steps(model, delta, range(5, 8), 7, optimizer, scheduler)
    resumed = delta.final_state_dict()
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# -- checkpoint and merge --------------------------------------------------------------------------


def test_sparse_checkpoint_size_follows_density_and_reloads_exactly(llama, tmp_path):
    model, delta = attach(llama, density=0.01)
    run_steps(model, delta, range(1, 4), total=3)
    batch = make_batch("llama")
    pruned = forward(model, delta, batch)
    final = delta.final_state_dict()
    kept = round(0.01 * GATED)
    assert all(k.endswith((".diff.indices", ".diff.values")) for k in final)
    assert sum(v.numel() for k, v in final.items() if k.endswith(".indices")) == kept
    assert all(v.dtype == torch.int32 for k, v in final.items() if k.endswith(".indices"))
    assert sum(v.numel() * v.element_size() for v in final.values()) == 8 * kept  # int32 + fp32 per kept weight
    save_file(final, tmp_path / "sparse.safetensors")
    save_file(delta.state_dict(), tmp_path / "dense.safetensors")
    sparse_bytes = (tmp_path / "sparse.safetensors").stat().st_size
    dense_bytes = (tmp_path / "dense.safetensors").stat().st_size
    assert dense_bytes > 8 * GATED and sparse_bytes < dense_bytes / 20, (sparse_bytes, dense_bytes)

    model2, delta2 = attach(llama, density=0.01)
    assert not torch.equal(forward(model2, delta2, batch), pruned)
    delta2.load_state_dict(load_file(tmp_path / "sparse.safetensors"))
    assert delta2.pruned and delta2.extra_loss() is None
    assert torch.equal(forward(model2, delta2, batch), pruned)
    assert all(torch.equal(a, b) for a, b in zip(effective(delta2).values(), effective(delta).values()))
    assert delta2.final_state_dict().keys() == final.keys()
    bad = dict(final)
    first = next(k for k in bad if k.endswith(".indices"))
    bad[first] = torch.tensor([10**9], dtype=torch.int32)
    bad[first.replace(".indices", ".values")] = torch.tensor([1.0])
    with pytest.raises(UserError, match="not a sparse delta"):
        delta2.load_state_dict(bad)


def test_merge_is_w0_plus_the_sparse_delta(llama):
    model, delta = attach(llama, density=0.02)
    run_steps(model, delta, range(1, 3), total=2)
    batch = make_batch("llama")
    unmerged = forward(model, delta, batch)
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    diffs = {key.removesuffix(".diff"): d for key, d in effective(delta).items()}
    delta.merge()
    for name, module in model.named_modules():
        if name in diffs:
            assert torch.equal(module.weight, base[name] + diffs[name])
        elif name in base:
            assert torch.equal(module.weight, base[name])  # the output head is not gated
    assert (forward(model, None, batch) - unmerged).abs().max() <= 1e-5
    assert sum(int((model.get_submodule(n).weight != base[n]).sum()) for n in diffs) == round(0.02 * GATED)


# -- end to end ------------------------------------------------------------------------------------


def test_cli_train_saves_a_sparse_delta_then_eval_and_merge_work(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          delta={"method": "diff-pruning", "density": 0.01, "fixed_mask_steps": 1},
                          train={"max_steps": 4, "save_every": 2})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    final = load_file(str(tmp_path / "run" / "final" / "delta.safetensors"))
    assert sum(v.numel() for k, v in final.items() if k.endswith(".indices")) == round(0.01 * GATED)
    step = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "delta.safetensors"))
    assert all(k.endswith((".delta", ".alpha")) for k in step)  # step checkpoints stay dense for resume
    code, out, err = run_cli(capsys, "eval", tmp_path / "run" / "final")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert code == 0, err
    assert "max abs diff" in out
