"""The Delta contract, run over every method in the registry on a tiny Llama (causal LM), a tiny
BERT (sequence classification) and a tiny GPT-2 (causal LM whose projections are transformers'
Conv1D, weight stored in x out). A method added to `deltafit.deltas.METHODS` is tested here without
touching this file; give it small options in OPTIONS if its defaults are heavy, and, if its options
name files that must first be made for each model (AdapterFusion's stage-1 adapter checkpoints), a
maker in delta_testkit.FILE_OPTIONS: `options(method, spec)` merges both.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import forward, hook_count, load_arch, make_batch, numel, perturb, snapshot, train_step

# Small options per method (defaults for anything not listed).
OPTIONS = {
    "lora": {"r": 4, "alpha": 8},
    "adapter": {"bottleneck": 8},
    "parallel-adapter": {"bottleneck": 8},
    "mam": {"prefix_tokens": 4, "prefix_hidden": 16, "bottleneck": 8},
    "unipelt": {"prefix_tokens": 4, "prefix_hidden": 16, "bottleneck": 8},
    "prefix": {"num_virtual_tokens": 4, "hidden": 16},
    "prompt": {"num_virtual_tokens": 4, "init": "random"},
    "lamda": {"r": 4}, "lamda-pp": {"r": 4},
    "adalora": {"init_r": 4, "target_r": 2},
    "aflora": {"r": 2},
    "qlora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"r": 4, "alpha": 8},
    "partial": {"layers": [0, -1], "unfreeze_every": 2}, "lisa": {"gamma": 1, "interval": 2},  # blocks that close
}
# (method, arch) pairs the method legitimately refuses with a UserError.
REFUSES = {("bitfit", "llama")}  # Llama has no biases: BitFit would train nothing
REFUSES.add(("qlora", "gpt2"))  # NF4 weights work only through F.linear; GPT-2's Conv1D multiplies with addmm

ARCHS = ["llama", "bert", "gpt2"]
CASES = [pytest.param(m, a, id=f"{m}-{a}") for m in deltas.METHODS for a in ARCHS]
SUPPORTED = [c for c in CASES if tuple(c.values) not in REFUSES]
REFUSED = [c for c in CASES if tuple(c.values) in REFUSES]


@pytest.fixture(scope="module")
def archs(tiny_llama, tiny_bert, tiny_gpt2, tmp_path_factory):
    dirs = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
    return {name: load_arch(name, d, files=tmp_path_factory.mktemp(f"{name}-files")) for name, d in dirs.items()}


def options(method: str, spec) -> dict:
    """OPTIONS plus the options naming files made for this arch's model (delta_testkit.FILE_OPTIONS)."""
    return {**OPTIONS.get(method, {}), **spec.file_options(method)}


def build(method: str, spec):
    return deltas.build(validate_delta({"method": method, **options(method, spec)}))


def attached(archs, method: str, arch: str):
    """(model, delta, expected count computed before attaching, arch) for a fresh model."""
    spec = archs[arch]
    model, delta = spec.fresh(), build(method, spec)
    torch.manual_seed(0)
    expected = delta.expected_trainable_params(model)
    delta.attach(model, head=spec.head)
    return model, delta, expected, spec


def stored_base(spec, method: str):
    """The base a method's delta sits on: a fresh copy, or for `lossy_base` methods (QLoRA keeps
    4-bit weights) the model after an untrained attach + detach, i.e. the base as the delta stores it."""
    model = spec.fresh()
    if deltas.get(method).lossy_base:
        delta = build(method, spec)
        delta.attach(model, head=spec.head)
        delta.detach()
    return model


def head_params(model, spec) -> dict:
    return {n: p for n, p in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in spec.head)}


# -- the class itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(deltas.METHODS))
def test_registry_entry_is_complete(method):
    cls = deltas.get(method)
    assert cls.name == method
    assert cls.Config.model_fields["method"].default == method
    assert cls.family in {"addition", "specification", "reparameterization", "baseline"}
    assert cls.description
    assert cls.mergeable or cls.not_mergeable_because
    for field_name, field in cls.Config.model_fields.items():
        assert field_name == "method" or field.description, f"{method}.{field_name} has no help text"


@pytest.mark.parametrize("method,arch", REFUSED)
def test_refuses_unsupported_model_with_user_error(archs, method, arch):
    model, delta = archs[arch].fresh(), build(method, archs[arch])
    with pytest.raises(UserError):
        delta.expected_trainable_params(model)
    with pytest.raises(UserError):
        delta.attach(model, head=archs[arch].head)


# -- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_only_delta_and_head_params_require_grad(archs, method, arch):
    model, delta, _, spec = attached(archs, method, arch)
    trainable = {id(p) for p in delta.trainable_parameters().values()}
    requires_grad = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == requires_grad
    assert delta.delta_parameters(), "a method must train something"
    assert {id(p) for p in head_params(model, spec).values()} <= trainable
    # No tensor is listed twice (the optimizer would update it twice).
    assert len(trainable) == len(delta.trainable_parameters())


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_param_count_matches_formula(archs, method, arch):
    model, delta, expected, _ = attached(archs, method, arch)
    assert numel(delta.delta_parameters().values()) == expected


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_delta_params_fp32_on_bf16_base_and_forward_runs(archs, method, arch):
    spec = archs[arch]
    model, delta = spec.fresh().to(torch.bfloat16), build(method, spec)
    base_ids = {id(p) for p in model.parameters()}
    delta.attach(model, head=spec.head)
    added = [p for p in delta.delta_parameters().values() if id(p) not in base_ids]
    assert all(p.dtype == torch.float32 for p in added)
    loss = model(**delta.prepare_inputs(make_batch(arch))).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.delta_parameters().values())


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_attaches_to_meta_device_model(archs, method, arch):
    """Planning a run (counts, targets) must work on a model with no weights in memory."""
    spec = archs[arch]
    with torch.device("meta"):
        model = type(spec.pristine)(spec.pristine.config)
    delta = build(method, spec)
    expected = delta.expected_trainable_params(model)
    delta.attach(model, head=spec.head)
    params = delta.delta_parameters().values()
    assert numel(params) == expected
    assert all(p.device.type == "meta" for p in params)


# -- behaviour -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_fresh_delta_output_vs_base(archs, method, arch):
    spec = archs[arch]
    batch = make_batch(arch)
    base = forward(stored_base(spec, method), None, batch)
    model, delta, _, _ = attached(archs, method, arch)
    out = forward(model, delta, batch)
    if delta.zero_init_identity:
        assert torch.equal(out, base), "a zero-init delta must leave the output exactly unchanged"
    else:  # prompt/prefix add inputs: then the output really differs (or is even shaped differently)
        assert out.shape != base.shape or not torch.allclose(out, base)


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_attached_in_eval_mode_the_delta_is_in_eval_mode(archs, method, arch):
    """eval, merge, export and generation attach to a model already in eval mode: the modules the
    delta adds follow it (no dropout, no sampled gates), so two forward passes agree."""
    spec = archs[arch]
    chosen = {**options(method, spec), **({"dropout": 0.5} if _has_dropout(method) else {})}
    model, delta = spec.fresh().eval(), deltas.build(validate_delta({"method": method, **chosen}))
    delta.attach(model, head=spec.head)
    perturb(delta)
    assert not [n for n, m in model.named_modules() if m.training], "modules left in training mode"
    batch = make_batch(arch)
    torch.manual_seed(1)
    first = forward(model, delta, batch)
    torch.manual_seed(2)
    assert torch.equal(forward(model, delta, batch), first)


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_one_step_changes_only_delta_and_head(archs, method, arch):
    model, delta, _, spec = attached(archs, method, arch)
    perturb(delta)
    trainable = {id(p) for p in delta.trainable_parameters().values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got_grad = train_step(model, delta, make_batch(arch))
    assert got_grad <= trainable, "a frozen tensor received a gradient"
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (id(p) in got_grad), f"{n}: moved={moved} but got a gradient={id(p) in got_grad}"
    missed = [n for n, p in delta.delta_parameters().items() if id(p) not in got_grad]
    assert not missed, f"delta tensors the loss never reaches: {missed}"
    for n, p in head_params(model, spec).items():
        assert id(p) in got_grad, f"head tensor {n} did not train"


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_save_load_round_trip(archs, method, arch, tmp_path):
    model, delta, _, _ = attached(archs, method, arch)
    perturb(delta)
    train_step(model, delta, make_batch(arch))
    batch = make_batch(arch)
    trained = forward(model, delta, batch)
    save_file({k: v.contiguous() for k, v in delta.state_dict().items()}, tmp_path / "delta.safetensors")

    model2, delta2, _, _ = attached(archs, method, arch)
    perturb(delta2, seed=99)  # a different starting point, so loading has something to undo
    with torch.no_grad():
        for p in delta2.trainable_parameters().values():
            p.add_(0.1)
    assert not torch.equal(forward(model2, delta2, batch), trained)
    delta2.load_state_dict(load_file(tmp_path / "delta.safetensors"))
    assert torch.equal(forward(model2, delta2, batch), trained)


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_state_dict_holds_only_delta_and_head(archs, method, arch):
    model, delta, expected, spec = attached(archs, method, arch)
    state, params = delta.state_dict(), delta.trainable_parameters()
    # Inserted tensors frozen from the start are stored too when they cannot be regenerated
    # (LoRA-FA's random A); nothing else of the model is.
    frozen = {n for n, p in delta.insertions.named_parameters(trainable_only=False) if not p.requires_grad}
    assert set(state) == set(params) | frozen
    assert all(torch.equal(state[k], params[k]) for k in params)
    held = {id(p) for p in delta.delta_parameters().values()}
    head_only = [p for p in head_params(model, spec).values() if id(p) not in held]
    assert numel(params.values()) == expected + numel(head_only)  # the formula's tensors, plus the head
    with pytest.raises(UserError):
        delta.load_state_dict({k: v for k, v in list(state.items())[1:]})  # one tensor missing


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_detach_without_training_restores_base_bit_for_bit(archs, method, arch):
    spec = archs[arch]
    model = spec.fresh()
    original = snapshot(stored_base(spec, method))
    delta = build(method, spec)
    delta.attach(model, head=spec.head)
    delta.detach()
    _assert_structure_restored(model, original)
    _assert_tensors_equal(model, original)


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_detach_after_training(archs, method, arch):
    spec = archs[arch]
    model = spec.fresh()
    reference = stored_base(spec, method)
    original = snapshot(reference)
    batch = make_batch(arch)
    delta = build(method, spec)
    delta.attach(model, head=spec.head)
    perturb(delta)
    train_step(model, delta, batch)
    delta.detach()
    _assert_structure_restored(model, original)
    body = {n for n in original["tensors"] if not any(n == h or n.startswith(h + ".") for h in spec.head)}
    if delta.detach_restores_weights:
        _assert_tensors_equal(model, original, only=body)
        if not spec.head:
            assert torch.equal(forward(model, None, batch), forward(reference, None, batch))
    else:  # documented: the delta *is* the base weights (full FT), detach keeps them trained
        assert any(not torch.equal(model.state_dict()[n], original["tensors"][n]) for n in body)


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_a_training_step_leaves_none_of_its_graph_alive(archs, method, arch):
    """Steps as the trainer runs them (activations recomputed, and on BERT `model.pooling: mean`, whose
    pooler runs in forward but never in backward): once a step is done, no tensor its forward pass
    made is still alive. One that is keeps its whole graph, and a run's memory grows every step."""
    import gc
    import weakref

    from deltafit.model import mean_pooling_hook
    from deltafit.recompute import RecomputedActivations

    model, delta, _, spec = attached(archs, method, arch)
    if arch == "bert":
        model.bert.register_forward_hook(mean_pooling_hook, with_kwargs=True)
    made = []

    def remember(module, args, output):
        made.extend(weakref.ref(t) for t in (output if isinstance(output, tuple) else (output,))
                    if torch.is_tensor(t) and t.grad_fn is not None)  # not leaves: parameters live on

    for module in model.modules():
        module.register_forward_hook(remember)
    recomputed = RecomputedActivations().attach(model)
    optimizer = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-3)
    model.train()
    for step in range(2):
        with recomputed.active():
            loss = model(**delta.prepare_inputs(make_batch(arch))).loss
        loss.backward()
        delta.before_optimizer_step(step + 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        delta.on_step_end(step + 1, 2)
        del loss
    gc.collect()
    alive = [ref() for ref in made if ref() is not None]
    assert len(made) > 10 and not alive, [(tuple(t.shape), t.grad_fn) for t in alive[:5]]


@pytest.mark.parametrize("method,arch", SUPPORTED)
def test_merge(archs, method, arch):
    model, delta, _, spec = attached(archs, method, arch)
    if not delta.mergeable:
        with pytest.raises(UserError, match="cannot be merged"):
            delta.merge()
        return
    batch = make_batch(arch)
    perturb(delta)
    unmerged = forward(model, delta, batch)
    assert not torch.allclose(unmerged, forward(spec.pristine, None, batch)), "perturbed delta must matter"
    delta.merge()
    merged = forward(model, None, batch)  # a plain model now: no hooks, no prepare_inputs
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert hook_count(model) == hook_count(spec.pristine)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in spec.pristine.named_modules()]


# -- mixed precision -----------------------------------------------------------------------------

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _has_dropout(method: str) -> bool:
    return "dropout" in deltas.config_class(method).model_fields


def _dropouts(method: str) -> list[float]:
    """0, and 0.1 where the method has a dropout option (its own code path: masks, custom backward)."""
    return [0.0, 0.1] if _has_dropout(method) else [0.0]


def _autocast_cases() -> list:
    """Every method x precision x dropout, each on one arch: the arch cycles through those the method
    supports (one step per case keeps the suite short; a method with dropout meets every arch)."""
    cases = []
    for method in deltas.METHODS:
        supported = [a for a in ARCHS if (method, a) not in REFUSES]
        combos = [(p, d) for d in _dropouts(method) for p in PRECISIONS]
        for i, (precision, dropout) in enumerate(combos):
            arch = supported[i % len(supported)]
            case_id = f"{method}-{arch}-{precision}-dropout{dropout}"
            cases.append(pytest.param(method, arch, precision, dropout, id=case_id))
    return cases


AUTOCAST = _autocast_cases()


@pytest.mark.parametrize("method,arch,precision,dropout", AUTOCAST)
def test_one_step_under_autocast(archs, method, arch, precision, dropout):
    """train.mixed_precision bf16/fp16: Accelerate runs forward under torch.autocast (on CPU too) with
    fp32 weights; one trainer-like step must give a finite loss and finite, non-zero gradients."""
    spec = archs[arch]
    chosen = {**options(method, spec), **({"dropout": dropout} if _has_dropout(method) else {})}
    model, delta = spec.fresh(), deltas.build(validate_delta({"method": method, **chosen}))
    delta.attach(model, head=spec.head)
    perturb(delta)  # zero-init halves (LoRA's B) would leave their partners without a gradient
    params = delta.trainable_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.0)
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=PRECISIONS[precision]):
        loss = model(**delta.prepare_inputs(make_batch(arch))).loss
        extra = delta.extra_loss()
        loss = loss if extra is None else loss + extra
    loss.backward()
    assert math.isfinite(loss.item())
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert grads, "no trainable tensor got a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values()), "non-finite gradients"
    assert any(g.abs().sum() > 0 for g in grads.values()), "all gradients are zero"
    delta.check_run(10)
    delta.before_optimizer_step(1)
    optimizer.step()
    delta.on_step_end(1, 10)
    assert all(torch.isfinite(p).all() for p in params.values())


def _assert_structure_restored(model, original) -> None:
    now = snapshot(model)
    assert now["modules"] == original["modules"], "detach left extra submodules"
    assert now["hooks"] == original["hooks"], "detach left hooks behind"
    assert now["flags"] == original["flags"], "detach did not restore requires_grad flags"
    assert set(now["tensors"]) == set(original["tensors"])


def _assert_tensors_equal(model, original, only=None) -> None:
    for name, tensor in model.state_dict().items():
        if only is None or name in only:
            assert torch.equal(tensor, original["tensors"][name]), f"{name} differs from the base after detach"
