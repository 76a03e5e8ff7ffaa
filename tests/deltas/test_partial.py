"""Partial fine-tuning: exactly the chosen blocks (+ head) train, top_k and layers agree, `modules`
narrows blocks, and gradual unfreezing opens one more block every N steps from the top down, with
no optimizer state for a block before it opens and exact resume across an unfreezing step.

Schedules are driven the way deltafit.train's loop drives them (prepare_inputs + forward, backward,
clip, the trainer's own AdamW from build_optimizer, zero_grad(set_to_none), on_step_end).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltafit import checkpoint, deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta
from tests.helpers import run_cli, write_recipe

from delta_testkit import block_of, deeper_llama, forward, load_arch, make_batch, trainer_parts

BLOCKS = 4


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


@pytest.fixture(scope="module")
def llama4(tiny_llama):
    """A 4-block version of the tiny Llama: enough blocks to watch a top-down schedule."""
    return deeper_llama(tiny_llama, BLOCKS)


def attach(model, head=(), **options):
    delta = deltas.build(validate_delta({"method": "partial", **options}))
    delta.attach(model, head=head)
    return delta




def train_steps(model, delta, optimizer, scheduler, steps, total, record=None):
    """deltafit.train's loop body; `record(step)` sees the gradients, before the optimizer step."""
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
    model.eval()


# -- which tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_only_the_chosen_blocks_and_the_head_train(request, arch):
    spec = request.getfixturevalue(arch)
    model = spec.fresh()
    delta = attach(model, spec.head, top_k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-2)
    model.train()
    model(**delta.prepare_inputs(make_batch(arch))).loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    head = {n for n in before if any(n == h or n.startswith(h + ".") for h in spec.head)}
    last_block = {n for n in before if block_of(n) == 1}
    assert last_block and moved == last_block | head
    assert set(delta.state_dict()) == last_block | {"head." + n for n in head}  # the head under its prefix


def test_top_k_and_layers_choose_the_same_blocks(llama4):
    by_k = attach(_copy(llama4), top_k=2)
    for layers in ([-2, -1], [2, 3], [3, -2, 2]):
        by_layers = attach(_copy(llama4), layers=layers)
        assert by_layers.delta_parameters().keys() == by_k.delta_parameters().keys()
        assert all(torch.equal(by_layers.state_dict()[k], v) for k, v in by_k.state_dict().items())
    assert {block_of(n) for n in by_k.state_dict()} == {2, 3}
    assert attach(_copy(llama4)).state_dict().keys() == by_k.state_dict().keys()  # default: top_k 2


@pytest.mark.parametrize("modules, expected", [
    (["attention"], lambda n: ".self_attn." in n),
    (["mlp"], lambda n: ".mlp." in n),
    (["norm"], lambda n: "layernorm" in n),
    (["attention", "norm"], lambda n: ".mlp." not in n),
    (["q_proj", "mlp.down_proj"], lambda n: n.endswith(("q_proj.weight", "down_proj.weight"))),
])
def test_modules_narrow_every_chosen_block(llama4, modules, expected):
    delta = attach(_copy(llama4), top_k=2, modules=modules)
    every = {n for n, _ in llama4.named_parameters() if block_of(n) in (2, 3)}
    assert set(delta.state_dict()) == {n for n in every if expected(n)} != set()


def test_bert_attention_norm_counts_as_norm_not_attention(bert):
    attention = attach(bert.fresh(), top_k=1, modules=["attention"]).state_dict()
    norms = attach(bert.fresh(), top_k=1, modules=["norm"]).state_dict()
    assert "bert.encoder.layer.1.attention.output.dense.weight" in attention
    assert "bert.encoder.layer.1.attention.output.LayerNorm.weight" in norms
    assert not set(attention) & set(norms)


@pytest.mark.parametrize("options, key", [
    ({"top_k": 1, "layers": [0]}, "delta.layers"),
    ({"top_k": 0}, "delta.top_k"),
    ({"layers": []}, "delta.layers"),
])
def test_bad_choices_are_rejected_in_the_recipe(options, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_delta({"method": "partial", **options})


@pytest.mark.parametrize("options, key", [
    ({"top_k": 3}, "'delta.top_k': 3"),
    ({"layers": [2]}, "'delta.layers'"),
    ({"modules": ["q_prj"]}, "'delta.modules': 'q_prj'"),
])
def test_choices_the_model_cannot_take_are_user_errors_before_attaching(llama, options, key):
    model = llama.fresh()
    delta = deltas.build(validate_delta({"method": "partial", **options}))
    with pytest.raises(UserError, match=key):
        delta.attach(model)
    assert delta.model is None and all(p.requires_grad for p in model.parameters())  # nothing was touched


# -- gradual unfreezing --------------------------------------------------------------------------

GRADUAL = {"layers": [0, 1, 2, 3], "unfreeze_every": 2}
TOTAL = 8


def test_gradual_unfreezing_opens_one_more_block_every_n_steps_top_down(llama4):
    model = _copy(llama4)
    delta = attach(model, **GRADUAL)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    keys = set(delta.state_dict())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    got_grad, with_state, unchanged = {}, {}, {}

    def record(step):
        got_grad[step] = {block_of(n) for n, p in params.items() if p.grad is not None}

    def after(step):
        with_state[step] = {block_of(n) for n, p in params.items() if p in optimizer.state}
        unchanged[step] = {block_of(n) for n, p in params.items() if torch.equal(p, start[n])}

    _run(model, delta, optimizer, scheduler, range(1, TOTAL + 1), TOTAL, record, after)
    # Steps 1-2: the top block; 3-4: + block 2; 5-6: + block 1; 7-8: every chosen block.
    expected = {1: {3}, 2: {3}, 3: {2, 3}, 4: {2, 3}, 5: {1, 2, 3}, 6: {1, 2, 3}, 7: {0, 1, 2, 3}, 8: {0, 1, 2, 3}}
    assert got_grad == expected
    assert with_state == expected, "a block not yet opened has optimizer state"
    for step, opened in expected.items():
        assert unchanged[step] == {None, 0, 1, 2, 3} - opened  # closed blocks (and the rest) never moved
    assert set(delta.state_dict()) == keys  # one key set for the whole run


def test_gradual_unfreezing_with_top_k_limits_the_final_set(llama4):
    model = _copy(llama4)
    delta = attach(model, top_k=2, unfreeze_every=1)
    optimizer, scheduler = trainer_parts(delta, 4, weight_decay=0.1)
    opened = {}
    _run(model, delta, optimizer, scheduler, range(1, 5), 4, after=lambda s: opened.setdefault(s, delta.open_at(s)))
    assert delta.open_at(0) == [3] and opened == {1: [3, 2], 2: [3, 2], 3: [3, 2], 4: [3, 2]}
    assert {block_of(n) for n in delta.state_dict()} == {2, 3}


def test_a_run_too_short_to_open_every_block_is_refused(llama4):
    delta = attach(_copy(llama4), **GRADUAL)
    with pytest.raises(UserError, match=r"'delta.unfreeze_every': 2 .* after step 6, but the run has 6 steps"):
        delta.check_run(6)
    delta.check_run(7)
    attach(_copy(llama4), top_k=1, unfreeze_every=100).check_run(1)  # one block: nothing to wait for


@pytest.mark.parametrize("stop", [2, 3], ids=["at-an-unfreezing-step", "between"])
def test_resume_across_an_unfreezing_step_is_exact(llama4, tmp_path, stop):
    straight_model = _copy(llama4)
    straight = attach(straight_model, **GRADUAL)
    optimizer, scheduler = trainer_parts(straight, TOTAL, weight_decay=0.1)
    _run(straight_model, straight, optimizer, scheduler, range(1, TOTAL + 1), TOTAL)

    model = _copy(llama4)
    delta = attach(model, **GRADUAL)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    _run(model, delta, optimizer, scheduler, range(1, stop + 1), TOTAL)
    _save(tmp_path / "step", delta, optimizer, scheduler, stop)
    del model, delta, optimizer, scheduler

    # A new process: fresh model and delta, then the trainer's _restore order.
    model = _copy(llama4)
    delta = attach(model, **GRADUAL)
    optimizer, scheduler = trainer_parts(delta, TOTAL, weight_decay=0.1)
    _restore(tmp_path / "step", delta, optimizer, scheduler)
    assert delta.open_at(delta.step) == straight.open_at(stop) and delta.step == stop
    _run(model, delta, optimizer, scheduler, range(stop + 1, TOTAL + 1), TOTAL)
    resumed, expected = delta.state_dict(), straight.state_dict()
    assert resumed.keys() == expected.keys()
    assert not [k for k in expected if not torch.equal(resumed[k], expected[k])], "resumed run diverged"


def test_merge_keeps_the_trained_blocks_and_detach_restores_them(llama):
    batch = make_batch("llama")
    model = llama.fresh()
    delta = attach(model, top_k=1)
    with torch.no_grad():
        for p in delta.delta_parameters().values():
            p.add_(0.05)
    trained = forward(model, delta, batch)
    delta.merge()
    assert torch.equal(forward(model, None, batch), trained)
    assert not torch.equal(trained, forward(llama.pristine, None, batch))
    other = llama.fresh()
    delta2 = attach(other, top_k=1)
    with torch.no_grad():
        for p in delta2.delta_parameters().values():
            p.add_(0.05)
    delta2.detach()
    assert torch.equal(forward(other, None, batch), forward(llama.pristine, None, batch))


# -- end to end ----------------------------------------------------------------------------------


def test_cli_gradual_run_saves_schedule_then_eval_and_merge(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          delta={"method": "partial", "top_k": 2, "unfreeze_every": 3},
                          train={"max_steps": 5, "save_every": 2})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert json.loads((step2 / "trainer" / "state.json").read_text())["method"] == {"step": 2, "open": [1]}
    base = load_file(str(tiny_llama / "model.safetensors"))
    at2, final = load_file(str(step2 / "delta.safetensors")), load_file(str(tmp_path / "run" / "final" /
                                                                              "delta.safetensors"))
    assert set(at2) == set(final) == {k for k in base if block_of(k) in (0, 1)}
    assert all(torch.equal(at2[k], base[k]) for k in at2 if block_of(k) == 0)  # not yet open at step 2
    assert any(not torch.equal(final[k], base[k]) for k in final if block_of(k) == 0)  # opened at step 4
    code, out, err = run_cli(capsys, "eval", tmp_path / "run" / "final")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert code == 0, err


# -- helpers -------------------------------------------------------------------------------------


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _run(model, delta, optimizer, scheduler, steps, total, record=None, after=None):
    if after is None:
        return train_steps(model, delta, optimizer, scheduler, steps, total, record)
    for step in steps:
        train_steps(model, delta, optimizer, scheduler, [step], total, record)
        after(step)


def _save(directory, delta, optimizer, scheduler, step):
    meta = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, "method": delta.name,
            "delta_config": delta.config.model_dump(mode="json"), "model": {"name": "tiny-llama"}, "task": "causal-lm"}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "progress": {"step": step}, "method": delta.schedule_state()}
    checkpoint.save(directory, meta, delta.state_dict(), {}, state)


def _restore(directory, delta, optimizer, scheduler):
    _, tensors = checkpoint.load(directory)
    delta.load_state_dict(tensors)
    restored = checkpoint.load_trainer_state(directory)
    optimizer.load_state_dict(restored["optimizer"])
    scheduler.load_state_dict(restored["scheduler"])
    delta.load_schedule_state(restored["method"])
