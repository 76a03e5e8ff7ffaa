"""Learned masking: the forward is exactly W0 * mask, the scores train straight-through, the final
checkpoint is the mask packed 1 bit per weight, and merge is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deltafit import deltas
from deltafit.deltas._sparse import pack_bits, unpack_bits
from deltafit.errors import UserError
from deltafit.recipe import validate_delta
from tests.helpers import run_cli, write_recipe

from delta_testkit import forward, load_arch, make_batch, train_step

MASKED = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)  # tiny Llama: q, k, v, o, gate, up, down in 2 blocks


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


def attach(spec, seed: int = 0, **options):
    torch.manual_seed(seed)
    model, delta = spec.fresh(), deltas.build(validate_delta({"method": "masking", **options}))
    delta.attach(model, head=spec.head)
    return model, delta


def masks(delta) -> dict[str, torch.Tensor]:
    return {key.removesuffix(".mask"): u.mask().clone() for key, u in delta._updates().items()}


def manually_masked(spec, found: dict[str, torch.Tensor]):
    """The base with each masked weight replaced by W0 * mask, by hand."""
    model = spec.fresh()
    with torch.no_grad():
        for name, mask in found.items():
            model.get_submodule(name).weight.mul_(mask)
    return model


def test_init_keeps_about_95_percent_and_scores_sit_near_the_threshold(llama):
    _, delta = attach(llama)
    assert abs(delta.kept_fraction() - 0.95) < 0.01  # 18432 weights: the std of the fraction is 0.0016
    scores = torch.cat([p.detach().flatten() for p in delta.delta_parameters().values()])
    assert scores.numel() == MASKED
    assert scores.min() >= -0.05 * 0.01 and scores.max() <= 0.95 * 0.01
    _, delta = attach(llama, init_keep=1.0)
    assert delta.kept_fraction() == 1.0


def test_forward_is_exactly_w0_times_the_mask(llama):
    model, delta = attach(llama)
    with torch.no_grad():  # make the mask far from the init: about half of the weights dropped
        for p in delta.delta_parameters().values():
            p.normal_()
    found = masks(delta)
    assert 0.3 < delta.kept_fraction() < 0.7
    batch = make_batch("llama")
    assert torch.equal(forward(model, delta, batch), forward(manually_masked(llama, found), None, batch))
    # One layer on its own: F.linear(x, W0 * mask, b).
    name = "model.layers.0.mlp.down_proj"
    layer, x = model.get_submodule(name), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight * found[name], layer.bias))


def test_scores_get_the_straight_through_gradient(llama):
    model, delta = attach(llama)
    name = "model.layers.1.self_attn.q_proj"
    layer, update = model.get_submodule(name), delta._updates()[name + ".mask"]
    x = torch.randn(3, 4, 32, requires_grad=True)
    upstream = torch.randn(3, 4, 32)
    (layer(x) * upstream).sum().backward()
    # Reference: a dense float mask m as a leaf; d loss / d m of F.linear(x, W0 * m) is grad_W * W0.
    m = update.mask().float().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, layer.weight * m, layer.bias) * upstream).sum().backward()
    assert torch.allclose(update.scores.grad, m.grad, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    grad_w = upstream.reshape(-1, 32).t() @ x.detach().reshape(-1, 32)
    assert torch.allclose(update.scores.grad, grad_w * layer.weight, atol=1e-6)
    assert layer.weight.grad is None  # the base stays frozen


def test_training_moves_scores_and_flips_the_mask_not_the_weights(llama):
    model, delta = attach(llama)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".mask." not in n}
    before = masks(delta)
    for _ in range(5):
        train_step(model, delta, make_batch("llama"))  # AdamW lr 1e-2 >> the 0.01 score interval
    after = masks(delta)
    assert sum(int((before[k] != after[k]).sum()) for k in before) > 0
    assert all(torch.equal(model.get_parameter(n), p) for n, p in base.items())


# -- the packed mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8,), (3, 5), (7, 13), (1,)])
def test_pack_bits_matches_numpy_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel()))
    assert torch.equal(unpack_bits("k", packed, mask), mask)
    with pytest.raises(UserError, match="not a packed bit mask"):
        unpack_bits("k", torch.cat([packed, packed]), mask)


def test_final_checkpoint_is_the_packed_mask_and_reloads_exactly(llama, tmp_path):
    model, delta = attach(llama)
    for _ in range(3):
        train_step(model, delta, make_batch("llama"))
    batch = make_batch("llama")
    trained, found = forward(model, delta, batch), masks(delta)
    final = delta.final_state_dict()
    assert all(k.endswith(".mask.bits") and v.dtype == torch.uint8 for k, v in final.items())
    assert sum(v.numel() for v in final.values()) == MASKED // 8  # 1 bit per weight (sizes are multiples of 8)
    step = delta.state_dict()  # step checkpoints keep the scores, for resume
    assert all(k.endswith(".mask.scores") and v.dtype == torch.float32 for k, v in step.items())
    save_file(final, tmp_path / "bits.safetensors")
    save_file(step, tmp_path / "scores.safetensors")
    assert (tmp_path / "bits.safetensors").stat().st_size < (tmp_path / "scores.safetensors").stat().st_size / 16

    model2, delta2 = attach(llama, seed=5)
    assert not torch.equal(forward(model2, delta2, batch), trained)
    delta2.load_state_dict(load_file(tmp_path / "bits.safetensors"))
    assert all(torch.equal(found[k], m) for k, m in masks(delta2).items())
    assert torch.equal(forward(model2, delta2, batch), trained)
    assert all(torch.equal(delta2.final_state_dict()[k], final[k]) for k in final)


def test_merge_is_exactly_w0_times_the_mask(llama):
    model, delta = attach(llama)
    with torch.no_grad():
        for p in delta.delta_parameters().values():
            p.normal_()
    batch = make_batch("llama")
    unmerged, found = forward(model, delta, batch), masks(delta)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in found}
    delta.merge()
    assert all(torch.equal(model.get_submodule(n).weight, base[n] * found[n]) for n in found)
    assert torch.equal(forward(model, None, batch), unmerged)


def test_cli_train_saves_packed_masks_then_eval_and_merge_work(tmp_path, tiny_llama, alpaca_file, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama,
                          {"train": str(alpaca_file), "format": "alpaca", "eval_fraction": 0.25, "max_length": 200},
                          delta={"method": "masking", "target_modules": ["q_proj", "v_proj"]},
                          train={"max_steps": 3, "save_every": 2})
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    final = load_file(str(tmp_path / "run" / "final" / "delta.safetensors"))
    assert len(final) == 4 and all(k.endswith(".mask.bits") for k in final)
    step = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "delta.safetensors"))
    assert all(k.endswith(".mask.scores") for k in step)
    code, out, err = run_cli(capsys, "eval", tmp_path / "run" / "final")
    assert code == 0, err
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert code == 0, err
    assert "max abs diff" in out
