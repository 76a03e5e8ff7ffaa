"""Frozen linear weights cast once under autocast (deltafit/frozen_casts.py): the same bits as
autocast's own casts, made again whenever the weight changes, and never in the way of training."""

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deltafit import frozen_casts, train
from tests.helpers import run_cli, write_recipe


@pytest.fixture(autouse=True)
def cache_switched_off_after():
    """The shared-input cast is process-wide while any cache is on: no test leaves it on."""
    yield
    frozen_casts._on.clear()
    frozen_casts._last_input.clear()


class CountWeightCasts(TorchDispatchMode):
    """Counts bf16 casts of tensors shaped like `weight`."""

    def __init__(self, weight):
        super().__init__()
        self.shape, self.count = weight.shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].shape == self.shape \
                and kwargs.get("dtype") == torch.bfloat16:
            self.count += 1
        return func(*args, **kwargs)


def frozen_linear(seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(16, 8)
    linear.weight.requires_grad_(False)
    return linear


def under_bf16(linear, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return linear(x)


def test_the_cached_cast_gives_autocasts_bits_and_is_made_once():
    plain, cached = frozen_linear(), frozen_linear()
    undo = frozen_casts.cache_frozen_casts(cached)
    x = torch.randn(4, 16, requires_grad=True)
    with CountWeightCasts(plain.weight) as plain_casts:
        expected = [under_bf16(plain, x) for _ in range(3)]
    with CountWeightCasts(cached.weight) as cached_casts:
        got = [under_bf16(cached, x) for _ in range(3)]
    assert all(torch.equal(a, b) and b.dtype == torch.bfloat16 for a, b in zip(expected, got))
    assert plain_casts.count == 3 and cached_casts.count == 1
    # Gradients through the cached weight reach the input as through autocast's.
    grad_plain, = torch.autograd.grad(expected[0].float().sum(), x)
    grad_cached, = torch.autograd.grad(got[0].float().sum(), x)
    assert torch.equal(grad_plain, grad_cached)
    undo()
    assert "forward" not in cached.__dict__ and frozen_casts.CACHE not in cached.__dict__


def test_an_input_shared_by_several_layers_is_cast_once_with_autocasts_gradients():
    """q, k and v take the same x: one cast of x, and x's gradient bit for bit autocast's (each
    consumer's bf16 gradient cast to fp32, then summed in fp32)."""
    layers = [frozen_linear(seed) for seed in range(3)]
    x = torch.randn(4, 16, requires_grad=True)
    with CountWeightCasts(x) as plain_casts:
        plain = sum(under_bf16(layer, x).float() for layer in layers)
    grad_plain, = torch.autograd.grad(plain.sum(), x)
    undo = [frozen_casts.cache_frozen_casts(layer) for layer in layers]
    with CountWeightCasts(x) as shared_casts:
        shared = sum(under_bf16(layer, x).float() for layer in layers)
    grad_shared, = torch.autograd.grad(shared.sum(), x)
    assert plain_casts.count == 3 and shared_casts.count == 1
    assert torch.equal(plain, shared) and torch.equal(grad_plain, grad_shared)
    with torch.no_grad():
        x.mul_(2)  # written in place: cast anew
    assert torch.equal(under_bf16(layers[0], x), under_bf16(frozen_linear(0), x))
    for u in undo:
        u()
    assert not frozen_casts._on and not frozen_casts._last_input


def test_inference_mode_tensors_have_no_version_and_pass_through():
    linear = frozen_linear()
    frozen_casts.cache_frozen_casts(linear)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        got = under_bf16(linear, x * 1)
    assert torch.equal(got, under_bf16(frozen_linear(), x))


def test_a_changed_weight_is_cast_again():
    plain, cached = frozen_linear(), frozen_linear()
    frozen_casts.cache_frozen_casts(cached)
    x = torch.randn(4, 16)
    under_bf16(cached, x)
    with torch.no_grad():  # an in-place write moves the version counter
        for linear in (plain, cached):
            linear.weight.add_(0.5)
    assert torch.equal(under_bf16(cached, x), under_bf16(plain, x))
    for linear in (plain, cached):  # new storage, as a fold gives
        linear.weight.data = linear.weight.detach() * 2
    assert torch.equal(under_bf16(cached, x), under_bf16(plain, x))


def test_outside_autocast_and_for_trainable_weights_nothing_is_cached():
    linear = frozen_linear()
    frozen_casts.cache_frozen_casts(linear)
    x = torch.randn(4, 16)
    assert linear(x).dtype == torch.float32 and frozen_casts.CACHE not in linear.__dict__
    linear.weight.requires_grad_(True)  # a block LISA unfroze: its weight trains, autocast casts it
    out = under_bf16(linear, x)
    assert frozen_casts.CACHE not in linear.__dict__
    out.float().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("delta", [
    {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    # No dropout: the LoRA paths take the base layers' shared input cast.
    {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    {"method": "vera", "r": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    # LISA opens one block every 2 steps: its weights train, then freeze again changed (cast anew).
    {"method": "lisa", "gamma": 1, "interval": 2},
    # Gradient checkpointing: the inputs are shared, the weights cast at each call as autocast does.
    {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "checkpointing": True},
], ids=["lora-dropout", "lora-all-linear", "vera", "lisa", "lora-checkpointing"])
def test_bf16_training_is_bit_identical_with_and_without_the_cache(tmp_path, capsys, tiny_llama, alpaca_file,
                                                                   monkeypatch, delta):
    """Six bf16 steps with periodic eval: the same losses and the same delta, and the cache was in
    use (casts reused) during the run."""
    delta = dict(delta)
    checkpointing = delta.pop("checkpointing", False)
    calls, made = [], set()
    real_cast = frozen_casts._cast

    def counting_cast(linear, weight, dtype):
        out = real_cast(linear, weight, dtype)
        calls.append(1)
        made.add(id(linear.__dict__[frozen_casts.CACHE]))
        return out

    monkeypatch.setattr(frozen_casts, "_cast", counting_cast)
    shared, real_shared_input = [], frozen_casts.shared_input

    def counting_shared_input(x):
        out = real_shared_input(x)
        shared.append(out.dtype != x.dtype)
        return out

    monkeypatch.setattr(frozen_casts, "shared_input", counting_shared_input)  # the base layers' lookups
    runs = {}
    for name in ("cached", "plain"):
        if name == "plain":
            monkeypatch.setattr(train, "_cache_frozen_casts", lambda *a, **k: (lambda: None))
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_llama,
                              {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.2},
                              delta=delta,
                              train={"max_steps": 6, "mixed_precision": "bf16", "eval_every": 3,
                                     "gradient_checkpointing": checkpointing})
        code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / name)
        assert code == 0, err
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line).get("loss") for line in lines],
                      (tmp_path / name / "final" / "delta.safetensors").read_bytes())
        if name == "cached" and not checkpointing:
            assert len(calls) > 2 * len(made) > 0  # each cast reused: forward after forward, step after step
        if name == "cached" and checkpointing:
            assert not calls and any(shared)  # no weight copy kept; inputs shared
    assert runs["cached"] == runs["plain"]
