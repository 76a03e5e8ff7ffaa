"""QLoRA's own promises: 4-bit storage, bounded quantization error, configured blocks, LoRA-only
training, and a merge that is exact with respect to the dequantized base (the contract suite in
test_contract.py covers the rest)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltafit import deltas
from deltafit.deltas.qlora import quantized_weights
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import forward, load_arch, make_batch, perturb, train_step

# NF4 levels are asymmetric: the widest gap is between -1 and -0.6962, so the nearest level is at
# most (1 - 0.6962) / 2 = 0.1519 of the block's absmax away; the int8 double-quantized scale adds
# at most max|scale - mean| / 128 (one int8 step, at the clamped end) per value.
NF4_HALF_GAP = 0.1519


class TwoLinears(nn.Module):
    """A model with weights big enough to make the 4-bit accounting meaningful."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def qlora(**options):
    return deltas.build(validate_delta({"method": "qlora", **options}))


@pytest.fixture()
def small():
    torch.manual_seed(0)
    model = TwoLinears()
    originals = {n: m.weight.detach().clone() for n, m in model.named_children()}
    return model, originals


def test_defaults_follow_the_paper():
    c = qlora().config
    assert (c.r, c.alpha, c.target_modules, c.block_size, c.scaler_block_size) == (64, 16.0, "all-linear", 64, 256)


def test_weights_are_stored_in_4_bits(small):
    model, originals = small
    qlora(r=4).attach(model)
    stored = quantized_weights(model)
    assert set(stored) == {"up", "down"}
    for name, weight in stored.items():
        inner = [getattr(weight, a) for a in weight.__tensor_flatten__()[0]]
        nbytes = sum(t.numel() * t.element_size() for t in inner)
        fp32 = originals[name].numel() * 4
        assert nbytes < 0.3 * fp32, f"{name}: {nbytes} bytes vs {fp32} in fp32"
        assert weight.quantized_data.dtype == torch.uint8 and weight.quantized_data.numel() * 2 == weight.numel()
    # No full-precision copy of the quantized weights is left among the model's tensors.
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    frozen_matrices = [n for n, t in tensors.items() if t.dim() == 2 and not t.requires_grad]
    assert sorted(frozen_matrices) == ["down.weight", "up.weight"]  # the NF4 buffers themselves
    assert all(tensors[n] is stored[n.split(".")[0]] for n in frozen_matrices)


def test_dequantized_weights_are_within_the_nf4_bound(small):
    model, originals = small
    qlora(r=4).attach(model)
    for name, weight in quantized_weights(model).items():
        w, w_hat = originals[name].view(-1, 64), weight.get_original_weight().view(-1, 64)
        scales = w.abs().amax(1)
        spread = (scales - scales.mean()).view(-1, weight.scaler_block_size).abs().amax(1)
        bound = NF4_HALF_GAP * scales + spread.repeat_interleave(weight.scaler_block_size) / 128
        assert ((w - w_hat).abs() <= bound[:, None] + 1e-7).all()
        relative = ((w - w_hat).norm() / w.norm()).item()
        assert 0.0 < relative < 0.12, relative  # lossy, but ~0.09 for Gaussian-like weights


def test_block_size_and_double_quantization_as_configured(small):
    model, _ = small
    qlora(r=4, block_size=32, scaler_block_size=8).attach(model)
    weight = quantized_weights(model)["up"]
    n_blocks = 256 * 512 // 32
    assert weight.block_size == 32 and weight.n_blocks == n_blocks
    assert weight.quantized_scalers.dtype == torch.int8 and weight.quantized_scalers.numel() == n_blocks
    assert weight.scaler_block_size == 8 and weight.quantization_factor.numel() == n_blocks // 8


def test_scaler_block_falls_back_to_a_divisor_of_the_block_count():
    model = nn.Sequential(nn.Linear(576, 192))  # SmolLM2's k_proj shape: 1728 blocks of 64
    qlora(r=4).attach(model)
    weight = quantized_weights(model)["0"]
    assert weight.n_blocks == 1728 and weight.scaler_block_size == 216  # largest divisor <= 256


def test_block_size_that_does_not_divide_a_weight_is_a_user_error():
    with pytest.raises(UserError, match="delta.block_size"):
        qlora(r=4, block_size=48).attach(nn.Sequential(nn.Linear(10, 10)))


def test_tied_weights_are_refused():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1].weight = model[0].weight
    with pytest.raises(UserError, match="shares its weight"):
        qlora(r=4).attach(model)


def test_training_a_step_changes_only_lora(tiny_llama):
    arch = load_arch("llama", tiny_llama)
    model, delta = arch.fresh(), qlora(r=4, dropout=0.0)
    delta.attach(model)
    stored = {n: w.quantized_data.clone() for n, w in quantized_weights(model).items()}
    assert len(stored) == 2 * 7  # all-linear: q k v o gate up down in both blocks, not lm_head
    lora = {id(p) for n, p in delta.trainable_parameters().items() if ".lora." in n}
    assert lora and len(lora) == len(delta.trainable_parameters())
    perturb(delta)
    got_grad = train_step(model, delta, make_batch("llama"))
    assert got_grad == lora
    for name, weight in quantized_weights(model).items():
        assert torch.equal(weight.quantized_data, stored[name])


def test_merge_is_exact_with_respect_to_the_dequantized_base(tiny_llama, capsys):
    arch = load_arch("llama", tiny_llama)
    model, delta = arch.fresh(), qlora(r=4, dropout=0.0)
    delta.attach(model)
    perturb(delta)
    batch = make_batch("llama")
    dequantized = {n: w.get_original_weight().clone() for n, w in quantized_weights(model).items()}
    updates = {k.rsplit(".", 1)[0]: u.delta_weight().detach() for k, (_, _, u) in delta.insertions.hosts.items()}
    unmerged = forward(model, delta, batch)
    delta.merge()
    assert "dequantized base" in capsys.readouterr().err
    assert not quantized_weights(model)
    modules = dict(model.named_modules())
    for name, w_hat in dequantized.items():
        assert torch.equal(modules[name].weight, w_hat + updates[name])
    assert (forward(model, None, batch) - unmerged).abs().max().item() <= 1e-5


def test_bf16_base_keeps_bf16_and_runs(tiny_llama):
    arch = load_arch("llama", tiny_llama)
    model, delta = arch.fresh().to(torch.bfloat16), qlora(r=4)
    delta.attach(model)
    assert all(w.dtype == torch.bfloat16 for w in quantized_weights(model).values())
    loss = model(**delta.prepare_inputs(make_batch("llama"))).loss
    loss.backward()
    assert torch.isfinite(loss)
    delta.detach()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
