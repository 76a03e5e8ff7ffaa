"""UniPELT: LoRA + prefix + adapter, each scaled by a learned gate (deltafit/deltas/unipelt.py).

The gates train; a closed gate removes its LoRA or adapter exactly (and leaves a prefix of zeros, as
in the reference); open gates give the plain composition `[lora, prefix, adapter]` with the same
tensors; the checkpoint round-trips; it trains; and on a decoder the gates are causal, so KV-cache
generation computes what a full forward computes. On the tiny BERT (seq-cls) and the tiny Llama
(causal LM); the contract suite covers GPT-2 too.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltafit import deltas
from deltafit.deltas.unipelt import GATES
from deltafit.errors import UserError
from deltafit.recipe import validate_delta

from delta_testkit import forward, load_arch, make_batch, perturb, train_step, trainer_parts

SMALL = {"prefix_tokens": 4, "prefix_hidden": 16, "bottleneck": 8}
CLOSED, OPEN = -1.0e4, 1.0e4  # gate biases whose sigmoid is exactly 0 / 1 in fp32
ARCHS = ["llama", "bert"]


@pytest.fixture(scope="module")
def archs(tiny_llama, tiny_bert):
    return {"llama": load_arch("llama", tiny_llama), "bert": load_arch("bert", tiny_bert)}


def attached(spec, restoring: bool = False, **options):
    model, delta = spec.fresh(), deltas.build(validate_delta({"method": "unipelt", **SMALL, **options}))
    torch.manual_seed(0)
    delta.attach(model, head=spec.head, restoring=restoring)
    return model, delta


def trained_like(spec, **options):
    """Attached, every tensor (gates included) moved off its initial value."""
    model, delta = attached(spec, **options)
    perturb(delta, scale=0.2)
    return model, delta


def gate_biases(delta, kind: str) -> list[torch.nn.Parameter]:
    return [p for k, p in delta.gate_parameters().items() if f".{kind}_gate.bias" in k]


def set_gates(delta, kind: str, bias: float) -> None:
    with torch.no_grad():
        for p in gate_biases(delta, kind):
            p.fill_(bias)


def hand_composition(spec, delta):
    """`delta: [lora, prefix, adapter]` with the UniPELT parts' options, holding its part tensors."""
    model = spec.fresh()
    plain = deltas.build(validate_delta([part.config.model_dump() for part in delta.parts.values()]))
    plain.attach(model, head=spec.head, restoring=True)
    plain.load_state_dict({k: v for k, v in delta.state_dict().items() if not k.startswith(GATES)})
    return model, plain


def test_sizes_follow_the_paper_and_parts_are_named():
    delta = deltas.build(validate_delta({"method": "unipelt"}))
    assert list(delta.parts) == ["lora", "prefix", "adapter"]
    lora, prefix, adapter = (delta.parts[n].config for n in ("lora", "prefix", "adapter"))
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 8.0, None)  # default targets: query, value
    assert (prefix.num_virtual_tokens, prefix.hidden) == (10, 512)
    assert (adapter.reduction_factor, adapter.bottleneck, adapter.variant) == (16.0, None, "pfeiffer")
    assert not adapter.train_layernorms and not delta.mergeable and not delta.supports_packing
    with pytest.raises(Exception, match="either bottleneck or reduction_factor"):
        validate_delta({"method": "unipelt", "bottleneck": 8, "reduction_factor": 4})


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_are_trainable_and_get_gradients(archs, arch):
    spec = archs[arch]
    model, delta = trained_like(spec)
    gates = delta.gate_parameters()
    blocks = 2  # one gate per LoRA module (query, value), adapter and attention layer, per block
    assert len(gates) == 2 * 4 * blocks
    assert all(k in delta.trainable_parameters() and p.requires_grad for k, p in gates.items())
    assert {id(p) for p in delta.trainable_parameters().values()} == {id(p) for p in model.parameters()
                                                                     if p.requires_grad}
    got_grad = train_step(model, delta, spec.batch())
    assert [k for k, p in gates.items() if id(p) not in got_grad] == []
    grouped = [id(p) for params, _, _ in delta.optimizer_groups() for p in params.values()]
    assert sorted(grouped) == sorted(id(p) for p in delta.trainable_parameters().values())  # each once


def _zero_lora(delta):
    for _, _, update in delta.parts["lora"].insertions.hosts.values():
        update.B.zero_()


def _zero_adapter(delta):
    for _, _, bottleneck in delta.parts["adapter"].insertions.hosts.values():
        bottleneck.up.weight.zero_()
        bottleneck.up.bias.zero_()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("part, remove", [("lora", _zero_lora), ("adapter", _zero_adapter)], ids=["lora", "adapter"])
def test_closing_a_gate_removes_its_submodule_exactly(archs, arch, part, remove):
    """A closed gate (sigmoid exactly 0) == the gate open at 0.5 with that submodule's output zeroed."""
    spec = archs[arch]
    model, delta = trained_like(spec)
    batch = spec.batch()
    gated = forward(model, delta, batch)
    set_gates(delta, part, CLOSED)
    closed = forward(model, delta, batch)
    set_gates(delta, part, 0.0)
    with torch.no_grad():
        remove(delta)
    assert torch.equal(closed, forward(model, delta, batch))
    assert not torch.allclose(closed, gated)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_closed_prefix_gate_leaves_zero_keys_and_values_not_no_prefix(archs, arch):
    """As in the reference, the gate scales the prefix keys and values: closed, they are zeros, which
    still take attention weight (score 0) with nothing to give. So it equals a prefix of zeros and
    differs from no prefix at all."""
    spec = archs[arch]
    model, delta = trained_like(spec)
    batch = spec.batch()
    set_gates(delta, "lora", OPEN)
    set_gates(delta, "adapter", OPEN)
    gated = forward(model, delta, batch)
    set_gates(delta, "prefix", CLOSED)
    closed = forward(model, delta, batch)
    assert not torch.allclose(closed, gated)
    set_gates(delta, "prefix", 0.0)
    encoder = delta.parts["prefix"].insertions.hosts["delta_prefix"][2]
    with torch.no_grad():
        encoder.mlp[2].weight.zero_()
        encoder.mlp[2].bias.zero_()
    assert torch.equal(closed, forward(model, delta, batch))
    # Without the prefix: the same LoRA and adapter (gates open = ungated), no prefix positions.
    bare = spec.fresh()
    without = deltas.build(validate_delta([delta.parts[n].config.model_dump() for n in ("lora", "adapter")]))
    without.attach(bare, head=spec.head, restoring=True)
    without.load_state_dict({k: v for k, v in delta.state_dict().items()
                             if k.startswith(("lora.", "adapter.", "head."))})
    assert not torch.allclose(closed, forward(bare, without, batch), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_open_gates_give_the_ungated_composition(archs, arch):
    spec = archs[arch]
    model, delta = trained_like(spec)
    batch = spec.batch()
    for kind in ("lora", "adapter", "prefix"):
        set_gates(delta, kind, OPEN)
    plain_model, plain = hand_composition(spec, delta)
    assert set(plain.state_dict()) == {k for k in delta.state_dict() if not k.startswith(GATES)}
    assert torch.equal(forward(model, delta, batch), forward(plain_model, plain, batch))
    # gates: false is that composition itself: same tensors, same names, same output.
    ungated_model, ungated = attached(spec, restoring=True, gates=False)
    ungated.load_state_dict(plain.state_dict())
    assert set(ungated.state_dict()) == set(plain.state_dict()) and not ungated.gate_parameters()
    assert torch.equal(forward(ungated_model, ungated, batch), forward(plain_model, plain, batch))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_round_trip(archs, arch, tmp_path):
    spec = archs[arch]
    model, delta = trained_like(spec)
    batch = spec.batch()
    expected = forward(model, delta, batch)
    save_file({k: v.contiguous() for k, v in delta.state_dict().items()}, str(tmp_path / "d.safetensors"))
    state = load_file(str(tmp_path / "d.safetensors"))
    heads = {"head"} if spec.head else set()
    assert {k.split(".", 1)[0] for k in state} == {"lora", "prefix", "adapter", "gates"} | heads
    again, reloaded = attached(spec, restoring=True)
    reloaded.load_state_dict(state)
    assert torch.equal(forward(again, reloaded, batch), expected)
    # A checkpoint without gates (gates: false) does not fit a gated UniPELT, and says so.
    _, ungated = attached(spec, restoring=True, gates=False)
    with pytest.raises(UserError, match="gate tensors"):
        attached(spec, restoring=True)[1].load_state_dict(ungated.state_dict())


def test_loss_falls_on_a_tiny_llama(archs):
    spec = archs["llama"]
    model, delta = attached(spec)
    optimizer, scheduler = trainer_parts(delta, total=12)
    batch = spec.batch()
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**delta.prepare_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    moved = [k for k, p in delta.gate_parameters().items() if k.endswith(".bias") and p.item() != 0.0]
    assert moved, "the gates must train"


def test_decoder_gates_are_causal(archs):
    """On Llama (auto: causal) no position's gates see a later token: changing the last token leaves
    every earlier position's logits unchanged. Mean pooling (the encoders' setting) would leak it."""
    spec = archs["llama"]
    ids = make_batch("llama")["input_ids"][:1]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    later = {**batch, "input_ids": batch["input_ids"].clone()}
    later["input_ids"][0, -1] = (later["input_ids"][0, -1] + 1) % 250 + 5
    for pooling, leaks in (("auto", False), ("mean", True)):
        model, delta = trained_like(spec, gate_pooling=pooling)
        first, second = forward(model, delta, batch)[:, :-1], forward(model, delta, later)[:, :-1]
        assert torch.equal(first, second) != leaks, pooling


def test_kv_cache_steps_match_a_full_forward(archs):
    """What `generate` does: prepare_inputs once on the prompt, then one token at a time on the returned
    cache. The prefix is gated once (not again at each step) and the per-token gates match training's."""
    spec = archs["llama"]
    model, delta = trained_like(spec)
    ids = make_batch("llama", length=6)["input_ids"][:2]
    prompt = {"input_ids": ids[:, :5], "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    with torch.no_grad():
        inputs = delta.prepare_inputs(prompt)
        out = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=ids[:, 5:], attention_mask=mask, position_ids=torch.full((2, 1), 5),
                     past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    full = forward(model, delta, {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)})
    torch.testing.assert_close(step, full[:, -1], rtol=0, atol=1e-5)


def test_encoder_gates_average_real_tokens_only(archs):
    """On BERT (mean pooling) a gate averages its sequence's real tokens: a padded row computes what
    the same row alone, unpadded, computes (the reference also averaged the padding)."""
    spec = archs["bert"]
    model, delta = trained_like(spec)
    batch = make_batch("bert")
    padded = forward(model, delta, batch)
    real = batch["attention_mask"][1].bool()
    alone = {"input_ids": batch["input_ids"][1:2, real], "attention_mask": batch["attention_mask"][1:2, real]}
    torch.testing.assert_close(forward(model, delta, alone)[0], padded[1], rtol=0, atol=1e-5)
