"""Parallel adapters (He et al. 2022): what the contract suite cannot see. The adapter reads the
sublayer's input (not its output), its contribution is exactly s times the bottleneck, and the
placements pick the right sublayer on each architecture."""

from __future__ import annotations

import pytest
import torch

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import load_arch, make_batch

S = 2.5  # a scale that is not the default, so a hook ignoring the config would show


@pytest.fixture(scope="module")
def archs(tiny_llama, tiny_bert, tiny_gpt2):
    return {"llama": load_arch("llama", tiny_llama), "bert": load_arch("bert", tiny_bert),
            "gpt2": load_arch("gpt2", tiny_gpt2)}


def build(**options):
    return deltas.build(validate_delta({"method": "parallel-adapter", "bottleneck": 4, **options}))


def attach(spec, **options):
    """(model, delta) with hand-set adapter weights (seeded, non-zero everywhere, W_up included)."""
    model, delta = spec.fresh(), build(**options)
    delta.attach(model, head=spec.head)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in delta.delta_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, delta


def bottleneck(adapter, x):
    """W_up relu(W_down x + b_down) + b_up, written out by hand."""
    down, up = adapter.down, adapter.up
    return torch.relu(x @ down.weight.t() + down.bias) @ up.weight.t() + up.bias


# -- the adapter reads the sublayer input ---------------------------------------------------------


def test_llama_ffn_output_is_base_plus_s_times_bottleneck_of_its_input(archs):
    spec = archs["llama"]
    model, _ = attach(spec, scale=S)
    mlp, base_mlp = model.model.layers[0].mlp, spec.pristine.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = base_mlp(x) + S * bottleneck(mlp.parallel_adapter, x)
        wrong = base_mlp(x) + S * bottleneck(mlp.parallel_adapter, base_mlp(x))  # a serial adapter would read this
        got = mlp(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_bert_ffn_adds_beside_the_ffn_before_the_residual_layernorm(archs):
    """BERT's `output(h, x)` = LayerNorm(dense(h) + x): the adapter reads x, the FFN's input."""
    spec = archs["bert"]
    model, _ = attach(spec, scale=S)
    out, base = model.bert.encoder.layer[1].output, spec.pristine.bert.encoder.layer[1].output
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)  # intermediate activations, the sublayer input
    with torch.no_grad():
        expected = base.LayerNorm(base.dense(h) + x + S * bottleneck(out.parallel_adapter, x))
        assert torch.allclose(out(h, x), expected, atol=1e-5)
        assert not torch.allclose(out(h, x), base(h, x), atol=1e-3)


@pytest.mark.parametrize("arch,path", [("llama", "model.layers.0.self_attn"), ("gpt2", "transformer.h.0.attn")])
def test_attention_tuple_output_gets_s_times_bottleneck_of_the_attention_input(archs, arch, path):
    """Attention returns (output, weights) and Llama passes its input as hidden_states=: the first
    block's attention sees the same input in both models, so its output must differ by s·A(x)."""
    spec = archs[arch]
    model, _ = attach(spec, placement="attention", scale=S)
    seen = {}

    def capture(key):
        def hook(module, args, kwargs, out):
            seen[key] = ((args[0] if args else kwargs["hidden_states"]), out[0])
        return hook

    batch = {k: v for k, v in make_batch(arch).items() if k != "labels"}
    for key, m in (("base", spec.pristine), ("adapted", model)):
        handle = m.get_submodule(path).register_forward_hook(capture(key), with_kwargs=True)
        with torch.no_grad():
            m(**batch)
        handle.remove()
    (x, base_out), (x2, out) = seen["base"], seen["adapted"]
    assert torch.equal(x, x2)
    with torch.no_grad():
        expected = base_out + S * bottleneck(model.get_submodule(path).parallel_adapter, x)
    assert torch.allclose(out, expected, atol=1e-5)


# -- the scale -----------------------------------------------------------------------------------


def test_scale_multiplies_the_contribution_exactly(archs):
    spec = archs["llama"]
    x = torch.randn(2, 5, 32)
    diffs = {}
    for s in (1.0, 2.0):
        model, _ = attach(spec, scale=s)  # same seed: the same adapter weights
        with torch.no_grad():
            diffs[s] = model.model.layers[1].mlp(x) - spec.pristine.model.layers[1].mlp(x)
    assert diffs[1.0].abs().max() > 1e-2, "the adapter must contribute something"
    assert torch.allclose(diffs[2.0], 2 * diffs[1.0], rtol=1e-5, atol=1e-6)


# -- placements ----------------------------------------------------------------------------------

PLACES = {
    ("llama", "ffn"): ["model.layers.{}.mlp"],
    ("llama", "attention"): ["model.layers.{}.self_attn"],
    ("llama", "both"): ["model.layers.{}.self_attn", "model.layers.{}.mlp"],
    ("bert", "ffn"): ["bert.encoder.layer.{}.output"],
    ("bert", "attention"): ["bert.encoder.layer.{}.attention.output"],
    ("bert", "both"): ["bert.encoder.layer.{}.attention.output", "bert.encoder.layer.{}.output"],
    ("gpt2", "ffn"): ["transformer.h.{}.mlp"],
    ("gpt2", "attention"): ["transformer.h.{}.attn"],
}


@pytest.mark.parametrize("arch,placement", list(PLACES), ids=lambda v: v)
def test_placement_picks_the_sublayers(archs, arch, placement):
    spec = archs[arch]
    model, delta = spec.fresh(), build(placement=placement)
    delta.attach(model, head=spec.head)
    expected = {p.format(i) + ".parallel_adapter" for p in PLACES[arch, placement] for i in (0, 1)}
    assert set(delta.describe_targets()) == expected
    # 2md + m + d per adapter, d = 32 on every tiny model, m = 4
    assert sum(p.numel() for p in delta.delta_parameters().values()) == len(expected) * (2 * 4 * 32 + 4 + 32)


def test_target_modules_override_placement_and_layers_filter(archs):
    spec = archs["llama"]
    model, delta = spec.fresh(), build(placement="attention", target_modules=["o_proj"], layers=[-1])
    delta.attach(model)
    assert delta.describe_targets() == ["model.layers.1.self_attn.o_proj.parallel_adapter"]


def test_a_target_whose_input_and_output_widths_differ_is_refused(archs):
    model, delta = archs["llama"].fresh(), build(target_modules=["up_proj"])  # 32 -> 64
    with pytest.raises(UserError, match="delta.target_modules.*32 -> 64"):
        delta.attach(model)
    assert not [n for n, _ in model.named_modules() if "parallel_adapter" in n]


def test_unknown_architecture_without_target_modules_is_refused(archs):
    model = archs["llama"].fresh()
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="model type 'mystery'.*delta.target_modules"):
        build().expected_trainable_params(model)


def test_a_bottleneck_outweighing_the_base_is_refused_before_allocating(archs):
    model, delta = archs["llama"].fresh(), build(bottleneck=10**9)
    with pytest.raises(UserError, match="recipe key 'delta.bottleneck': 1000000000 would give"):
        delta.attach(model)
    assert not [n for n, _ in model.named_modules() if "parallel_adapter" in n]


def test_down_projection_starts_kaiming_uniform_and_up_at_zero(archs):
    model, delta = archs["llama"].fresh(), build(bottleneck=16)
    delta.attach(model)
    adapter = model.model.layers[0].mlp.parallel_adapter
    bound = 1 / 32**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.abs().max() > bound / 2
    assert not adapter.up.weight.any() and not adapter.up.bias.any() and not adapter.down.bias.any()


# -- training ------------------------------------------------------------------------------------


def test_loss_falls_on_a_tiny_llama(archs):
    spec = archs["llama"]
    model, delta = spec.fresh(), build(bottleneck=16)
    torch.manual_seed(0)
    delta.attach(model)
    optimizer = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-2, weight_decay=0.0)
    batch = make_batch("llama")
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The fresh model is the base; a fixed batch must be fitted steadily (5.77 -> ~5.33 measured).
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
