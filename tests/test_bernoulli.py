"""Dropout's bulk draws (deltafit/bernoulli.py): the same distribution as PyTorch's bernoulli_(p),
seeded as it is, in every dtype, in force while a run trains and gone after.

Tests that need the override force it (`bulk` fixture), so they check the same thing on an Intel
machine with MKL, where deltafit leaves PyTorch's kernel alone, as on any other CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from deltafit import bernoulli
from deltafit.recipe import load_recipe
from deltafit.train import TrainHooks, fit
from tests.helpers import write_recipe


@pytest.fixture()
def bulk(monkeypatch):
    monkeypatch.setattr(bernoulli, "pytorch_draws_serially", lambda: True)
    with bernoulli.faster_bernoulli() as active:
        assert active
        yield


def ours(shape, p: float, seed: int) -> torch.Tensor:
    """What the bulk kernel draws for a fresh float tensor, called directly (not through the dispatcher)."""
    return bernoulli.bernoulli_(torch.empty(shape), p, generator=torch.Generator().manual_seed(seed))


def pytorchs(shape, p: float, seed: int) -> torch.Tensor:
    return torch.empty(shape).bernoulli_(p, generator=torch.Generator().manual_seed(seed))


def within(mean: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(mean - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.001, 0.1, 0.5, 0.9])
def test_draws_are_bernoulli_p_from_both_halves_of_every_word(bulk, p):
    n = 2_000_001  # odd: the last word's second half goes unused
    x = torch.empty(n).bernoulli_(p)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert within(float(x.mean()), p, n)
    # Even and odd elements come from the two 32-bit halves of the same 64-bit words.
    assert within(float(x[0::2].mean()), p, x[0::2].numel()) and within(float(x[1::2].mean()), p, x[1::2].numel())
    # Neighbours (the two halves of a word, and consecutive words) are uncorrelated.
    centred = x - p
    correlation = float((centred[:-1] * centred[1:]).mean()) / (p * (1 - p))
    assert abs(correlation) < 5 / math.sqrt(n)


def test_the_override_is_the_bulk_kernel_and_leaves_with_the_block(monkeypatch):
    before = pytorchs(1000, 0.3, seed=1)
    monkeypatch.setattr(bernoulli, "pytorch_draws_serially", lambda: True)
    with bernoulli.faster_bernoulli():
        inside = pytorchs(1000, 0.3, seed=1)
    after = pytorchs(1000, 0.3, seed=1)
    assert torch.equal(inside, ours(1000, 0.3, seed=1))
    assert not torch.equal(inside, before)  # 1000 draws at p = 0.3 agree by chance with probability 0
    assert torch.equal(after, before)  # PyTorch's own kernel is back


def test_seeded_draws_repeat_and_an_explicit_generator_leaves_the_default_alone(bulk):
    torch.manual_seed(5)
    a = torch.empty(4097).bernoulli_(0.5)
    torch.manual_seed(5)
    b = torch.empty(4097).bernoulli_(0.5)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    c = pytorchs(4097, 0.5, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(c, pytorchs(4097, 0.5, seed=5)) and not torch.equal(c, pytorchs(4097, 0.5, seed=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.bool,
                                   torch.int64, torch.uint8])
def test_every_dtype_and_layout_in_place(bulk, dtype):
    base = torch.zeros(301, 7, dtype=dtype)
    view = base.t()  # not contiguous
    result = view.bernoulli_(0.5)
    assert result is view and result.dtype == dtype and result.shape == (7, 301)
    values = base.to(torch.float64)
    assert set(values.unique().tolist()) == {0.0, 1.0}
    assert within(float(values.mean()), 0.5, values.numel())


def test_certain_and_invalid_probabilities_and_empty_tensors_as_pytorch_has_them(bulk):
    assert torch.equal(torch.full((5,), 7.0).bernoulli_(0.0), torch.zeros(5))
    assert torch.equal(torch.full((5,), 7.0).bernoulli_(1.0), torch.ones(5))
    assert torch.empty(0).bernoulli_(0.5).numel() == 0
    assert torch.equal(torch.full((3,), 2, dtype=torch.int64).bernoulli_(1.0), torch.ones(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"bernoulli_ expects p to be in \[0, 1\], but got p=1.5"):
        torch.empty(3).bernoulli_(1.5)


def test_dropout_and_sdpas_attention_dropout_draw_in_bulk(bulk):
    x = torch.ones(10_000)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.25, training=True)
    torch.manual_seed(0)
    assert torch.equal(dropped, bernoulli.bernoulli_(torch.empty(10_000), 0.75) / 0.75)
    # SDPA on a CPU with dropout runs its math path, whose attention dropout is the largest (batch x
    # heads x length^2): its mask must be the bulk one too.
    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.manual_seed(1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(1)
    keep = bernoulli.bernoulli_(torch.empty(2, 3, 16, 16), 0.8)
    expected = ((q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) * keep / 0.8) @ v
    torch.testing.assert_close(out, expected)


def test_pytorch_draws_serially_unless_built_with_mkl_on_intel(monkeypatch):
    for vendor, mkl, serial in [("GenuineIntel", True, False), ("AuthenticAMD", True, True), ("", True, True),
                                ("GenuineIntel", False, True)]:
        monkeypatch.setattr(bernoulli, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda mkl=mkl: mkl)
        assert bernoulli.pytorch_draws_serially() is serial
    monkeypatch.setattr(bernoulli, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    before = pytorchs(1000, 0.3, seed=2)
    with bernoulli.faster_bernoulli() as active:
        assert not active and torch.equal(pytorchs(1000, 0.3, seed=2), before)


def test_cpu_vendor_is_read_on_this_machine():
    vendor = bernoulli.cpu_vendor()
    assert isinstance(vendor, str)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return
    if "vendor_id" in text:
        assert vendor and vendor in text


def test_training_draws_in_bulk_and_pytorchs_kernel_is_back_after(monkeypatch, tiny_bert, cls_file, tmp_path):
    monkeypatch.setattr(bernoulli, "pytorch_draws_serially", lambda: True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert,
                          {"train": str(cls_file), "format": "classification", "text_column": "sentence",
                           "max_length": 32}, delta={"method": "lora", "r": 4, "dropout": 0.1}, task="seq-cls",
                          train={"max_steps": 2})
    seen = []
    hooks = TrainHooks(before_forward=lambda run, batch: seen.append(pytorchs(256, 0.5, seed=3)))
    fit(load_recipe(recipe), output_dir=tmp_path / "out", hooks=hooks)
    assert len(seen) == 2 and all(torch.equal(s, ours(256, 0.5, seed=3)) for s in seen)
    assert not torch.equal(pytorchs(256, 0.5, seed=3), ours(256, 0.5, seed=3))
    assert json.loads((tmp_path / "out" / "final" / "deltafit.json").read_text())
