"""LayerNorm tuning's own promises: exactly the norm tensors train (found by type, final norm included),
targets narrow among norms only, models without norms are refused, and the PEFT LN_TUNING format
round-trips through the real `peft` (the contract suite in test_contract.py covers the rest)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.peft_io import export_checkpoint
from deltafit.recipe import validate_delta
from tests.test_peft_interop import (
    TOLERANCE,
    assert_merge_matches,
    deltafit_model,
    logits,
    peft_model,
    save_checkpoint,
    train_peft,
)

from delta_testkit import load_arch, make_batch, perturb, train_step


def layernorm(**options):
    return deltas.build(validate_delta({"method": "layernorm", **options}))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


def test_llama_trains_every_rmsnorm_weight_and_nothing_else(llama):
    model, delta = llama.fresh(), layernorm()
    delta.attach(model)
    blocks = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(delta.delta_parameters()) == blocks | {"model.norm.weight"}  # the final norm too
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(delta.delta_parameters())
    assert set(delta.state_dict()) == set(delta.delta_parameters())  # the checkpoint: norms under model names


def test_bert_trains_layernorm_weights_and_biases_plus_head(bert):
    model, delta = bert.fresh(), layernorm()
    delta.attach(model, head=bert.head)
    norms = {n for n in delta.delta_parameters()}
    assert norms == {f"{m}.{t}" for m in delta.describe_targets() for t in ("weight", "bias")}
    assert len(delta.describe_targets()) == 5 and "bert.embeddings.LayerNorm" in delta.describe_targets()
    got_grad = train_step(model, delta, make_batch("bert"))
    moved = {n for n, p in model.named_parameters() if id(p) in got_grad}
    head = {n for n, _ in model.named_parameters() if n.startswith(("classifier.", "bert.pooler."))}
    assert moved - head == norms  # every LayerNorm weight and bias, no linear or embedding weight
    assert head <= moved


def test_target_modules_and_layers_choose_among_norms(llama):
    model, delta = llama.fresh(), layernorm(target_modules=["input_layernorm"])
    delta.attach(model)
    assert delta.describe_targets() == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    model, delta = llama.fresh(), layernorm(layers=[-1])
    delta.attach(model)
    assert delta.describe_targets() == ["model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"]


def test_a_spec_naming_no_norm_is_refused_naming_the_key(llama):
    with pytest.raises(UserError, match="recipe key 'delta.target_modules'.*matches no module.*RMSNorm"):
        layernorm(target_modules=["q_proj"]).attach(llama.fresh())  # a linear layer, not a norm


def test_model_without_norms_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UserError, match="no LayerNorm/RMSNorm"):
        layernorm().expected_trainable_params(model)
    with pytest.raises(UserError, match="no LayerNorm/RMSNorm"):
        layernorm().attach(model)


def test_norm_without_affine_weight_is_not_a_target():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.LayerNorm(4))
    delta = layernorm()
    delta.attach(model)
    assert set(delta.delta_parameters()) == {"2.weight", "2.bias"}


def test_merge_keeps_trained_norms_and_detach_restores(llama):
    model, delta = llama.fresh(), layernorm()
    delta.attach(model)
    perturb(delta)
    trained = {n: p.detach().clone() for n, p in delta.delta_parameters().items()}
    delta.merge()
    assert all(torch.equal(model.state_dict()[n], v) for n, v in trained.items())
    model, delta = llama.fresh(), layernorm()
    delta.attach(model)
    perturb(delta)
    delta.detach()
    assert all(torch.equal(model.state_dict()[n], llama.pristine.state_dict()[n]) for n in trained)


# -- PEFT LN_TUNING -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, tiny_bert, arch):
    model_dir, task = (tiny_llama, "causal-lm") if arch == "llama" else (tiny_bert, "seq-cls")
    directory, model, delta = save_checkpoint(tmp_path, model_dir, task, {"method": "layernorm"})
    result = export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == delta.describe_targets()
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    own = [k for k in stored if ".ln_tuning_layers." in k]
    assert own and all(k.startswith("base_model.model.") for k in own)
    assert len(own) == len(delta.delta_parameters())
    if arch == "bert":
        assert result["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    theirs = peft_model(model_dir, task, tmp_path / "adapter")
    batch = make_batch(arch)
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():  # the norms really matter, so equal logits mean something
        assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() > 1e-4


def test_peft_trained_adapter_imports_and_merges_with_equal_logits(tmp_path, tiny_llama, capsys):
    from peft import LNTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LNTuningConfig(task_type="CAUSAL_LM"))
    train_peft(theirs).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert meta["method"] == "layernorm" and len(meta["delta_config"]["target_modules"]) == 5
    batch = make_batch("llama")
    assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():  # peft's training moved the norms: the comparison is not base vs base
        assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() > 1e-4
    assert_merge_matches(tmp_path / "peft-adapter", theirs, tmp_path, capsys)


def test_import_refuses_what_it_cannot_express():
    cls = deltas.get("layernorm")
    weight = {"model.norm.ln_tuning_layers.weight": torch.ones(4)}
    with pytest.raises(UserError, match="exclude_modules"):
        cls.from_peft({"exclude_modules": ["model.norm"]}, weight, None)
    with pytest.raises(UserError, match="not a norm copy"):
        cls.from_peft({}, {"model.norm.weight": torch.ones(4)}, None)
    config, state = cls.from_peft({"exclude_modules": None}, weight, None)
    assert config == {"method": "layernorm", "target_modules": ["model.norm"]} and list(state) == ["model.norm.weight"]
