"""DoRA's own promises: m starts at W0's row norms, the layer computes m * (W0 + s B A) / ||W0 + s B A||
with the norm detached, merge writes exactly that weight, and PEFT's DoRA (LORA + use_dora) round
trips both ways with equal logits (the contract suite in test_contract.py covers the rest)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltafit import checkpoint, deltas
from deltafit.loading import attach_from_checkpoint, load_source, source_recipe
from deltafit.model import build_model
from deltafit.peft_io import export_checkpoint
from deltafit.recipe import recipe_from_dict, validate_delta
from tests.helpers import run_cli

from delta_testkit import forward, load_arch, make_batch, perturb, quiet_transformers

TOLERANCE = 1e-5  # fp32 on CPU
TARGETS = ["q_proj", "v_proj", "down_proj"]


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 6)

    def forward(self, x):
        return self.proj(x)


def dora(**options):
    return deltas.build(validate_delta({"method": "dora", "r": 2, "alpha": 4, **options}))


@pytest.fixture()
def small():
    torch.manual_seed(0)
    model = OneLinear()
    w0, b0 = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    delta = dora(target_modules=["proj"])
    delta.attach(model)
    return model, delta, delta.insertions.hosts["proj.dora"][2], w0, b0


def dora_weight(update, w0, detach_norm=True):
    """The paper's W' = m * (W0 + s B A) / ||W0 + s B A|| (row norms of the out x in weight)."""
    full = w0 + update.lora.scale * update.lora.B @ update.lora.A
    norm = full.norm(p=2, dim=1)
    return update.magnitude[:, None] * full / (norm.detach() if detach_norm else norm)[:, None]


def test_magnitude_starts_at_the_row_norms_of_w0(small):
    _, _, update, w0, _ = small
    assert torch.equal(update.magnitude, torch.linalg.norm(w0, dim=1))
    assert torch.allclose(update.magnitude, w0.norm(p=2, dim=1))  # PEFT's weight.norm(p=2, dim=1)
    assert not update.lora.B.any()


def test_a_fresh_attach_is_exactly_the_base(small, tiny_llama):
    model, _, _, w0, b0 = small
    x = torch.randn(5, 12)
    assert torch.equal(model(x), F.linear(x, w0, b0))
    arch = load_arch("llama", tiny_llama)
    llama, delta = arch.fresh(), dora(target_modules="all-linear")
    delta.attach(llama)
    batch = make_batch("llama")
    assert torch.equal(forward(llama, delta, batch), forward(arch.pristine, None, batch))


def test_the_layer_computes_the_decomposed_weight(small):
    model, delta, update, w0, b0 = small
    perturb(delta, scale=0.3)
    x = torch.randn(5, 12)
    expected = F.linear(x, dora_weight(update, w0), b0)
    assert (model(x) - expected).abs().max().item() <= 1e-5
    # ... and not plain LoRA on W0: the magnitude really rescales each row.
    assert (model(x) - F.linear(x, w0 + update.lora.delta_weight(), b0)).abs().max().item() > 1e-3


def test_the_norm_gets_no_gradient(small):
    model, delta, update, w0, b0 = small
    perturb(delta, scale=0.3)
    x = torch.randn(5, 12)
    model(x).pow(2).sum().backward()
    params = (update.magnitude, update.lora.A, update.lora.B)
    ours = [p.grad.clone() for p in params]
    for detach_norm, same in [(True, True), (False, False)]:
        reference = torch.autograd.grad(F.linear(x, dora_weight(update, w0, detach_norm), b0).pow(2).sum(), params)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, reference)) is same


def test_merge_writes_the_decomposed_weight(small):
    model, delta, update, w0, b0 = small
    perturb(delta, scale=0.3)
    expected = dora_weight(update, w0).detach()
    x = torch.randn(5, 12)
    unmerged = model(x).detach()
    delta.merge()
    assert torch.allclose(model.proj.weight, expected, atol=1e-6) and torch.equal(model.proj.bias, b0)
    assert (model(x) - unmerged).abs().max().item() <= 1e-5
    assert [n for n, _ in model.named_modules()] == ["", "proj"]


def test_param_count_is_lora_plus_one_magnitude_per_output(small):
    model, delta, _, _, _ = small
    assert sum(p.numel() for p in delta.delta_parameters().values()) == 2 * (12 + 6) + 6


# -- PEFT: a LORA adapter with use_dora -----------------------------------------------------------


def peft_lora_model(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()


def test_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama):
    pytest.importorskip("peft")
    quiet_transformers()
    recipe = recipe_from_dict({"model": {"name": str(tiny_llama), "task": "causal-lm"},
                               "data": {"train": "unused.json", "format": "alpaca"},
                               "delta": {"method": "dora", "r": 4, "alpha": 8, "target_modules": TARGETS}})
    model, _, head = build_model(recipe.model)
    delta = deltas.build(recipe.delta)
    delta.attach(model, head=head)
    perturb(delta, scale=0.2)
    meta = checkpoint.metadata(recipe, delta, None, step=1, epoch=0.0)
    directory = checkpoint.save(tmp_path / "ckpt", meta, delta.state_dict(), recipe.to_dict())
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["r"] == 4
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert stored["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (32,)
    theirs = peft_lora_model(tiny_llama, tmp_path / "adapter")
    batch = make_batch("llama")
    ours = forward(model.eval(), delta, batch)
    assert (forward(theirs, None, batch) - ours).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():
        assert (forward(theirs, None, batch) - ours).abs().max().item() > 1e-3


@pytest.fixture()
def peft_trained_dora(tmp_path, tiny_llama):
    """A DoRA adapter trained for a few steps by peft itself, saved with save_pretrained."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**make_batch("llama")).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "peft-adapter")
    return tmp_path / "peft-adapter", model.eval()


def test_peft_trained_dora_imports_with_equal_logits(peft_trained_dora):
    adapter, theirs = peft_trained_dora
    directory, meta, tensors = load_source(str(adapter))
    assert meta["method"] == "dora" and meta["delta_config"]["r"] == 4
    model, _, _ = build_model(source_recipe(directory, meta).model)
    delta = attach_from_checkpoint(model, meta, tensors)
    magnitude = delta.state_dict()["model.layers.0.self_attn.q_proj.dora.magnitude"]
    assert not torch.allclose(magnitude, model.model.layers[0].self_attn.q_proj.weight.norm(dim=1))  # trained
    batch = make_batch("llama")
    assert (forward(model.eval(), delta, batch) - forward(theirs, None, batch)).abs().max().item() <= TOLERANCE


def test_peft_trained_dora_merges_with_equal_logits(peft_trained_dora, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter, theirs = peft_trained_dora
    code, _, err = run_cli(capsys, "merge", adapter, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = make_batch("llama")
    assert (forward(merged, None, batch) - forward(theirs, None, batch)).abs().max().item() <= TOLERANCE
