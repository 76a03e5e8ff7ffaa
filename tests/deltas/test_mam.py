"""MAM adapter: a preset that expands to prefix tuning + a parallel FFN adapter. Its tensors are those
of the two deltas written by hand, name for name and value for value, and it computes the same."""

from __future__ import annotations

import torch

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import TrainSpec, validate_delta
from deltafit.train import build_optimizer

from delta_testkit import forward, load_arch, perturb

SIZES = {"prefix_tokens": 4, "prefix_hidden": 16, "bottleneck": 8, "scale": 2.0}
BY_HAND = [{"method": "prefix", "num_virtual_tokens": 4, "hidden": 16},
           {"method": "parallel-adapter", "placement": "ffn", "bottleneck": 8, "scale": 2.0}]


def attached(arch, config, seed=0):
    model, delta = arch.fresh(), deltas.build(validate_delta(config))
    torch.manual_seed(seed)
    delta.attach(model, head=arch.head)
    return model, delta


def test_preset_and_hand_written_composition_give_the_same_tensors_and_outputs(tiny_llama, tiny_bert):
    for arch in (load_arch("llama", tiny_llama), load_arch("bert", tiny_bert)):
        preset_model, preset = attached(arch, {"method": "mam", **SIZES})
        hand_model, hand = attached(arch, BY_HAND)
        a, b = preset.state_dict(), hand.state_dict()
        assert a.keys() == b.keys() and {k.split(".", 1)[0] for k in a} >= {"prefix", "parallel-adapter"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        perturb(preset), perturb(hand)  # the same draws in the same key order
        batch = arch.batch()
        assert torch.equal(forward(preset_model, preset, batch), forward(hand_model, hand, batch))
        # The two parts really act: dropping either changes the output.
        for name in ("prefix", "parallel-adapter"):
            with torch.no_grad():
                saved = {k: p.clone() for k, p in preset.parts[name].delta_parameters().items()}
                for p in preset.parts[name].delta_parameters().values():
                    p.zero_()
                changed = forward(preset_model, preset, batch)
                for k, p in preset.parts[name].delta_parameters().items():
                    p.copy_(saved[k])
            assert not torch.allclose(changed, forward(hand_model, hand, batch))


def test_a_checkpoint_of_the_preset_loads_into_the_hand_written_composition(tiny_llama):
    arch = load_arch("llama", tiny_llama)
    model, preset = attached(arch, {"method": "mam", **SIZES})
    perturb(preset)
    again, hand = attached(arch, BY_HAND, seed=1)
    hand.load_state_dict(preset.state_dict())
    batch = arch.batch()
    assert torch.equal(forward(model, preset, batch), forward(again, hand, batch))


def test_facts_and_refusals(tiny_llama):
    cls = deltas.get("mam")
    assert not cls.mergeable and not cls.supports_packing and not cls.zero_init_identity
    arch = load_arch("llama", tiny_llama)
    model, delta = attached(arch, {"method": "mam", **SIZES})
    try:
        delta.merge()
        raise AssertionError("MAM merged")
    except UserError as e:
        assert "prefix" in str(e) and "parallel-adapter" in str(e)
    # The paper's bottleneck (512) is refused on a 16-wide model, naming the key.
    try:
        attached(arch, {"method": "mam", "prefix_tokens": 4, "prefix_hidden": 16})
        raise AssertionError("a 512 bottleneck on a 16-wide model was accepted")
    except UserError as e:
        assert "'delta.bottleneck'" in str(e) and "delta 'parallel-adapter'" in str(e)


def test_the_preset_lr_reaches_both_parts(tiny_llama):
    arch = load_arch("llama", tiny_llama)
    _, delta = attached(arch, {"method": "mam", **SIZES, "lr": 0.03})
    optimizer = build_optimizer(delta, TrainSpec(lr=1e-3))
    rates = {g["lr"] for g in optimizer.param_groups}
    assert rates == {0.03}
