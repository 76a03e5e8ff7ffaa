"""LaMDA and LaMDA++: SVD init, the B-freezing schedule (truly frozen, resumable), r-dimensional
saved activations, exact merge, and the spectral rank allocation."""

from __future__ import annotations

import random

import pytest
import torch

from deltafit import deltas
from deltafit.deltas._lowrank import columns_frozen, principal_subspace
from deltafit.deltas.lamda_pp import allocate_ranks, energy_score
from deltafit.errors import UserError
from deltafit.recipe import TrainSpec, validate_delta
from deltafit.train import build_optimizer

from delta_testkit import forward, load_arch, make_batch, numel, perturb

R = 4


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def attach(arch, method="lamda", **options):
    model, delta = arch.fresh(), deltas.build(validate_delta({"method": method, "r": R, **options}))
    delta.attach(model, head=arch.head)
    return model, delta


def updates(delta) -> dict:
    return {key: u for key, (_, _, u) in delta.insertions.hosts.items()}


def run_steps(model, delta, optimizer, steps, total, start=0) -> None:
    """The trainer's order: backward, step, zero_grad(set_to_none=True), then the delta's hook."""
    model.train()
    for step in range(start + 1, start + steps + 1):
        model(**make_batch("llama")).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        delta.on_step_end(step, total)


# -- init ----------------------------------------------------------------------------------------


def test_projections_are_the_top_singular_vectors_and_core_starts_at_zero(llama):
    model, delta = attach(llama)
    host = model.model.layers[0].self_attn.q_proj
    update = host.lamda
    u, s, vh = torch.linalg.svd(llama.pristine.model.layers[0].self_attn.q_proj.weight.double())
    b = update.b_matrix().detach().double()
    # Same subspaces, up to the sign of each singular pair; B diag(s_r) A is the rank-R truncation.
    assert torch.allclose((update.A.double() @ vh[:R].T).abs(), torch.eye(R, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((b.T @ u[:, :R]).abs(), torch.eye(R, dtype=torch.float64), atol=1e-5)
    truncated = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    assert torch.allclose(b @ torch.diag(s[:R]) @ update.A.double(), truncated, atol=1e-5)
    assert torch.count_nonzero(update.S) == 0
    assert update.scale == pytest.approx(32.0 / R)  # default alpha / r


def test_frozen_projection_is_rebuilt_bit_for_bit_with_canonical_signs(llama):
    weight = llama.pristine.model.layers[1].self_attn.v_proj.weight
    u1, vh1 = principal_subspace(weight, R)
    u2, vh2 = principal_subspace(weight.clone(), R)
    assert torch.equal(u1, u2) and torch.equal(vh1, vh2)
    assert (vh1.gather(1, vh1.abs().argmax(1, keepdim=True)) > 0).all()
    # Flipping W flips exactly one factor of each pair: A keeps its canonical sign, B absorbs the flip.
    u3, vh3 = principal_subspace(-weight, R)
    assert torch.allclose(vh3, vh1, atol=1e-6) and torch.allclose(u3, -u1, atol=1e-6)


def test_rank_larger_than_a_layer_allows_is_a_one_line_user_error(llama):
    with pytest.raises(UserError, match="delta.r.*valid: 1..16") as err:
        attach(llama, r=17)  # v_proj is 16 x 32
    assert "\n" not in str(err.value)


# -- the freezing schedule -----------------------------------------------------------------------


def test_schedule_freezes_linearly_and_completely_by_t_i():
    assert [columns_frozen(t, 100, 4, 0.1) for t in range(0, 12)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert columns_frozen(0, 100, 4, 0.0) == 4  # freeze_b_by=0: B frozen from the start
    assert columns_frozen(1, 3, 16, 0.1) == 16  # short runs: t_i rounds up to 1 step


def test_trainable_count_follows_the_schedule(llama):
    model, delta = attach(llama, freeze_b_by=0.5)
    layers = list(updates(delta).values())
    outs = [u.b_matrix().shape[0] for u in layers]
    assert numel(delta.trainable_parameters().values()) == sum(R * R + R * o for o in outs)
    assert numel(delta.trainable_parameters().values()) == delta.expected_trainable_params(llama.fresh())
    delta.on_step_end(2, 8)  # t_i = 4: half of B's columns frozen
    assert numel(delta.trainable_parameters().values()) == sum(R * R + R // 2 * o for o in outs)
    delta.on_step_end(4, 8)
    assert numel(delta.trainable_parameters().values()) == len(layers) * R * R  # only the r x r cores
    assert set(delta.state_dict()) > set(delta.trainable_parameters())  # frozen B columns still saved
    frozen_from_start = attach(llama, freeze_b_by=0.0)[1]
    assert numel(frozen_from_start.trainable_parameters().values()) == len(layers) * R * R
    assert frozen_from_start.expected_trainable_params(llama.fresh()) == len(layers) * R * R


def test_columns_freeze_largest_singular_value_first(llama):
    model, delta = attach(llama, freeze_b_by=0.5)
    delta.on_step_end(1, 8)  # t_i = 4: one column of four frozen
    update = model.model.layers[0].self_attn.q_proj.lamda
    u, _, _ = torch.linalg.svd(llama.pristine.model.layers[0].self_attn.q_proj.weight.double())
    flags = [c.requires_grad for c in update.B]
    assert flags == [False, True, True, True]
    assert torch.allclose(update.B[0].detach().double().abs().squeeze(1), u[:, 0].abs(), atol=1e-5)


def test_frozen_parts_stay_bit_identical_with_weight_decay(llama):
    """AdamW through the trainer's own build_optimizer, weight decay on: a frozen column gets no grad,
    so neither momentum nor decay moves it; the core S keeps training."""
    model, delta = attach(llama, freeze_b_by=0.5)
    optimizer = build_optimizer(delta, TrainSpec(lr=1e-2, weight_decay=0.1))
    layer = model.model.layers[1].self_attn.v_proj.lamda
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert any(p is layer.B[0] for p in decayed), "B's columns must be in the weight-decay group"
    a_before = layer.A.clone()
    at_freeze = {}
    for step in range(1, 5):  # t_i = 4: column j freezes at the end of step j + 1
        run_steps(model, delta, optimizer, 1, total=8, start=step - 1)
        at_freeze[step - 1] = layer.B[step - 1].detach().clone()
    assert not torch.equal(at_freeze[3], at_freeze[0])  # sanity: the columns differ
    s_before = layer.S.detach().clone()
    model(**make_batch("llama")).loss.backward()
    assert all(c.grad is None for c in layer.B)  # what makes AdamW skip them
    optimizer.zero_grad(set_to_none=True)
    run_steps(model, delta, optimizer, 4, total=8, start=4)
    for j, value in at_freeze.items():
        assert torch.equal(layer.B[j], value), f"frozen column {j} moved"
    assert torch.equal(layer.A, a_before)
    assert not torch.equal(layer.S, s_before), "the core must keep training"


def test_resumed_run_continues_exactly(llama):
    """Interrupted at step 3 and resumed the way train._restore does (tensors, optimizer, then the
    schedule state), the run ends bit-identical to an uninterrupted one."""
    spec = TrainSpec(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    model, delta = attach(llama, freeze_b_by=0.5)
    optimizer = build_optimizer(delta, spec)
    run_steps(model, delta, optimizer, 6, total=8)

    torch.manual_seed(0)
    model1, delta1 = attach(llama, freeze_b_by=0.5)
    optimizer1 = build_optimizer(delta1, spec)
    run_steps(model1, delta1, optimizer1, 3, total=8)
    tensors = {k: v.clone() for k, v in delta1.state_dict().items()}
    saved_optimizer, schedule = optimizer1.state_dict(), delta1.schedule_state()
    assert schedule == {"frozen_columns": {k: 3 for k in updates(delta1)}}

    model2, delta2 = attach(llama, freeze_b_by=0.5)
    optimizer2 = build_optimizer(delta2, spec)
    delta2.load_state_dict(tensors)
    optimizer2.load_state_dict(saved_optimizer)
    delta2.load_schedule_state(schedule)
    assert [c.requires_grad for c in updates(delta2)[next(iter(updates(delta2)))].B] == [False] * 3 + [True]
    run_steps(model2, delta2, optimizer2, 3, total=8, start=3)
    final, resumed = delta.state_dict(), delta2.state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


# -- memory: what backward keeps -----------------------------------------------------------------


def saved_widths(host, in_features: int) -> list[float]:
    """Per-token width of every tensor autograd saves in one forward of `host` (base + delta).

    Run at two sequence lengths: a saved tensor whose size grows with the tokens is an activation,
    and its growth per token is its width. Parameters, buffers and tensors derived from them only
    (A, S, the stacked B) do not grow and drop out.
    """
    sizes = []
    for tokens in (5, 9):
        found = []
        x = torch.randn(2, tokens, in_features, requires_grad=True)  # earlier layers train: x needs grad
        # found is bound as a default: each iteration's hook appends to that iteration's list
        with torch.autograd.graph.saved_tensors_hooks(lambda t, found=found: found.append(t.numel()) or t, lambda t: t):
            host(x)
        sizes.append(found)
    assert len(sizes[0]) == len(sizes[1])
    return [(b - a) / (2 * (9 - 5)) for a, b in zip(*sizes)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_backward_keeps_only_r_dimensional_activations(llama, dropout):
    """LaMDA keeps A x (for S's gradient), S A x (for B's) and, with dropout, an r-wide mask: nothing
    wider than r. The check would fail for LoRA-style paths: a trainable A needs x itself (in-wide),
    and a path that saved its output or a dense B S A product would add out-wide tensors. The frozen
    base linear keeps no activation at all (only its weight), so no allowance is needed for it."""
    model, delta = attach(llama, dropout=dropout)
    model.train()
    host = model.model.layers[0].self_attn.q_proj
    widths = saved_widths(host, host.in_features)
    assert widths and max(widths) <= R
    # The same probe on LoRA at the same rank sees its in-wide saved input: the check can fail.
    lora_model = llama.fresh()
    lora = deltas.build(validate_delta({"method": "lora", "r": R, "dropout": dropout}))
    lora.attach(lora_model)
    lora_model.train()
    lora_host = lora_model.model.layers[0].self_attn.q_proj
    assert max(saved_widths(lora_host, lora_host.in_features)) >= lora_host.in_features > R


# -- merge ---------------------------------------------------------------------------------------


def test_merge_adds_exactly_scaled_b_s_a(llama):
    model, delta = attach(llama)
    perturb(delta)
    update = model.model.layers[1].self_attn.v_proj.lamda
    expected = llama.pristine.model.layers[1].self_attn.v_proj.weight + update.scale * (
        update.b_matrix() @ update.S @ update.A).detach()
    unmerged = forward(model, delta, make_batch("llama"))
    delta.merge()
    assert torch.allclose(model.model.layers[1].self_attn.v_proj.weight, expected, atol=1e-7, rtol=0)
    assert (forward(model, None, make_batch("llama")) - unmerged).abs().max() <= 1e-5


# -- LaMDA++ -------------------------------------------------------------------------------------


def test_allocation_keeps_budget_minimum_and_order_on_random_scores():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        r = rng.randint(1, 9)
        scores = [rng.choice([rng.random(), 0.5]) for _ in range(n)]  # ties included
        ranks = allocate_ranks(scores, r * n, [10_000] * n)
        assert sum(ranks) == r * n and min(ranks) >= 1
        for i in range(n):
            for j in range(n):
                if scores[i] > scores[j]:
                    assert ranks[i] >= ranks[j], (scores, ranks)


def test_allocation_is_proportional_and_respects_caps():
    assert allocate_ranks([1.0, 1.0, 2.0], 3 * 5, [99] * 3) == [4, 4, 7]  # 1 each + 12 shared 1:1:2 -> 3, 3, 6
    capped = allocate_ranks([0.1, 0.2, 0.9], 3 * 6, [20, 20, 4])
    assert capped[2] == 4 and sum(capped) == 18 and capped[1] >= capped[0] >= 1


def test_lamda_pp_ranks_follow_the_energy_scores(llama):
    # Make one adapted weight rank-1: all its energy sits in the top direction, so it scores highest.
    arch_model = llama.fresh()
    with torch.no_grad():
        w = arch_model.model.layers[1].self_attn.q_proj.weight
        w.copy_(torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1])))
    delta = deltas.build(validate_delta({"method": "lamda-pp", "r": R}))
    expected = delta.expected_trainable_params(arch_model)
    delta.attach(arch_model)
    ranks = delta.config.ranks
    hosts = {n: h for n, (h, _, _) in delta.insertions.hosts.items()}
    scores = {n: energy_score(h.weight, R) for n, h in hosts.items()}
    assert set(ranks) == {n.rsplit(".", 1)[0] for n in hosts}
    by_module = {n.rsplit(".", 1)[0]: s for n, s in scores.items()}
    assert sum(ranks.values()) == R * len(ranks) and min(ranks.values()) >= 1
    for a in ranks:
        for b in ranks:
            if by_module[a] > by_module[b]:
                assert ranks[a] >= ranks[b]
    top = "model.layers.1.self_attn.q_proj"
    assert by_module[top] == pytest.approx(1.0) and ranks[top] == max(ranks.values()) > R
    assert len(set(ranks.values())) > 1, "a non-uniform spectrum must give non-uniform ranks"
    # Each layer is built with its own rank and scaled by alpha / r_l.
    for name, update in ((n.rsplit(".", 1)[0], u) for n, u in updates(delta).items()):
        assert update.S.shape == (ranks[name], ranks[name]) and update.scale == pytest.approx(32.0 / ranks[name])
    assert numel(delta.delta_parameters().values()) == expected


def test_lamda_pp_checkpoint_config_rebuilds_the_same_shapes(llama):
    """eval/merge rebuild the delta from the checkpoint's saved config: the ranks travel in it."""
    model, delta = attach(llama, method="lamda-pp")
    perturb(delta)
    saved_config = delta.config.model_dump(mode="json")
    assert saved_config["ranks"]
    rebuilt = deltas.build(validate_delta(saved_config))
    model2 = llama.fresh()
    rebuilt.attach(model2)
    rebuilt.load_state_dict(delta.state_dict())
    batch = make_batch("llama")
    assert torch.equal(forward(model2, rebuilt, batch), forward(model, delta, batch))


def test_lamda_pp_ranks_naming_other_modules_is_a_user_error(llama):
    delta = deltas.build(validate_delta({"method": "lamda-pp", "r": R, "ranks": {"model.layers.0.mlp.up_proj": 2}}))
    with pytest.raises(UserError, match="delta.ranks"):
        delta.attach(llama.fresh())
