"""(IA)^3's own promises: the paper's targets (keys and values scaled on their output, the FFN's down
projection on its input), the rescaling math itself, an exact merge (bias included), the checks on
feedforward_modules, and the PEFT IA3 format round-tripping through the real `peft` (the contract suite
in test_contract.py covers the rest)."""

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

from delta_testkit import forward, load_arch, make_batch, perturb


def ia3(**options):
    return deltas.build(validate_delta({"method": "ia3", **options}))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_arch("llama", tiny_llama)


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_arch("bert", tiny_bert)


def vectors(delta) -> dict:
    """{state key: vector} of the delta's own tensors."""
    return {k: v for k, v in delta.state_dict().items() if not k.startswith("head.")}


def test_llama_defaults_scale_keys_values_on_output_and_down_proj_on_input(llama):
    model, delta = llama.fresh(), ia3()
    delta.attach(model)
    shapes = {k: tuple(v.shape) for k, v in vectors(delta).items()}
    for i in range(2):  # k/v: GQA, 2 kv heads x 8 = 16 outputs; down_proj: 64 intermediate units
        assert shapes[f"model.layers.{i}.self_attn.k_proj.ia3_out.scale"] == (16,)
        assert shapes[f"model.layers.{i}.self_attn.v_proj.ia3_out.scale"] == (16,)
        assert shapes[f"model.layers.{i}.mlp.down_proj.ia3_in.scale"] == (64,)
    assert len(shapes) == 6
    assert all(torch.equal(v, torch.ones_like(v)) for v in vectors(delta).values())  # starts at the base


def test_bert_feedforward_is_the_ffn_output_dense_not_the_attention_output(bert):
    model, delta = bert.fresh(), ia3()
    delta.attach(model, head=bert.head)
    keys = set(vectors(delta))
    assert "bert.encoder.layer.0.output.dense.ia3_in.scale" in keys
    assert "bert.encoder.layer.0.attention.self.key.ia3_out.scale" in keys
    assert not any("attention.output" in k or "query" in k for k in keys)
    assert len(keys) == 6


def test_scaling_math_output_side_and_input_side(llama):
    model, delta = llama.fresh(), ia3()
    delta.attach(model)
    perturb(delta, scale=0.3)
    x = torch.randn(3, 32)
    k_proj, down = model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj
    l_k, l_ff = k_proj.ia3_out.scale, down.ia3_in.scale
    with torch.no_grad():
        assert torch.allclose(k_proj(x), l_k * (x @ k_proj.weight.t()), atol=1e-6)  # l_k * (W_k x)
        h = torch.randn(3, 64)
        assert torch.allclose(down(h), (l_ff * h) @ down.weight.t(), atol=1e-6)  # W_down (l_ff * h)


def test_merge_folds_rows_bias_and_columns_exactly(bert):
    model, delta = bert.fresh(), ia3()
    delta.attach(model, head=bert.head)
    perturb(delta, scale=0.3)
    key, ffn = model.bert.encoder.layer[0].attention.self.key, model.bert.encoder.layer[0].output.dense
    l_k, l_ff = key.ia3_out.scale.detach().clone(), ffn.ia3_in.scale.detach().clone()
    expected = (key.weight * l_k[:, None], key.bias * l_k, ffn.weight * l_ff[None, :], ffn.bias.clone())
    batch = make_batch("bert")
    unmerged = forward(model, delta, batch)
    delta.merge()
    assert not hasattr(key, "ia3_out") and not hasattr(ffn, "ia3_in")
    for got, want in zip((key.weight, key.bias, ffn.weight, ffn.bias), expected):
        assert torch.allclose(got, want, atol=0, rtol=1e-6)  # the input side leaves the bias alone
    assert (forward(model, None, batch) - unmerged).abs().max().item() <= 1e-5


def test_merge_on_bf16_base_keeps_dtype(llama):
    model, delta = llama.fresh().to(torch.bfloat16), ia3()
    delta.attach(model)
    perturb(delta, scale=0.3)
    delta.merge()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_feedforward_modules_choose_the_input_side(llama):
    model, delta = llama.fresh(), ia3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[])
    delta.attach(model)
    assert {k.split(".")[-2] for k in vectors(delta)} == {"ia3_out"}  # [] means: every target on its output
    model, delta = llama.fresh(), ia3(target_modules=["v_proj", "up_proj"], feedforward_modules=r".*\.up_proj")
    delta.attach(model)
    assert vectors(delta)["model.layers.0.mlp.up_proj.ia3_in.scale"].shape == (32,)
    assert numel(delta) == delta.expected_trainable_params(llama.fresh()) == 2 * (16 + 32)


def numel(delta) -> int:
    return sum(p.numel() for p in delta.delta_parameters().values())


@pytest.mark.parametrize("options,key", [
    ({"feedforward_modules": ["fc2"]}, "delta.feedforward_modules"),  # not among the targets
    ({"feedforward_modules": "down_proj("}, "delta.feedforward_modules"),  # not a regex
    ({"target_modules": ["nope"]}, "delta.target_modules"),
])
def test_bad_specs_are_refused_naming_the_key(llama, options, key):
    with pytest.raises(UserError, match=f"recipe key '{key}'"):
        ia3(**options).attach(llama.fresh())


def test_architecture_without_defaults_needs_explicit_targets():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(UserError, match="recipe key 'delta.target_modules'.*no default targets"):
        ia3().attach(model)
    with pytest.raises(UserError, match="recipe key 'delta.feedforward_modules'"):
        ia3(target_modules=["0", "2"]).attach(model)
    delta = ia3(target_modules=["0", "2"], feedforward_modules=["2"])
    delta.attach(model)
    assert sorted(vectors(delta)) == ["0.ia3_out.scale", "2.ia3_in.scale"]


# -- PEFT IA3 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, tiny_bert, tiny_gpt2, arch):
    model_dir, task = {"llama": (tiny_llama, "causal-lm"), "bert": (tiny_bert, "seq-cls"),
                       "gpt2": (tiny_gpt2, "causal-lm")}[arch]
    directory, model, delta = save_checkpoint(tmp_path, model_dir, task, {"method": "ia3"})
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and len(config["target_modules"]) == len(vectors(delta))
    assert config["feedforward_modules"] and set(config["feedforward_modules"]) < set(config["target_modules"])
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for module in config["target_modules"]:
        vector = stored[f"base_model.model.{module}.ia3_l"]
        assert vector.shape[0 if module in config["feedforward_modules"] else 1] == 1
    theirs = peft_model(model_dir, task, tmp_path / "adapter")
    batch = make_batch("bert" if arch == "bert" else "llama")
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():  # the vectors really matter, so equal logits mean something
        assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() > 1e-4


def test_peft_trained_adapter_imports_and_merges_with_equal_logits(tmp_path, tiny_llama, capsys):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), IA3Config(task_type="CAUSAL_LM"))
    train_peft(theirs).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert meta["method"] == "ia3" and meta["delta_config"]["feedforward_modules"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    batch = make_batch("llama")
    assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():
        assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() > 1e-4
    assert_merge_matches(tmp_path / "peft-adapter", theirs, tmp_path, capsys)


def test_peft_bert_default_with_attention_output_as_feedforward_imports(tmp_path, tiny_bert):
    """PEFT's BERT default scales attention.output.dense on its input too: imported as it is."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                            IA3Config(task_type="SEQ_CLS", modules_to_save=["classifier", "bert.pooler"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.eval().save_pretrained(tmp_path / "peft-adapter")
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert "bert.encoder.layer.0.attention.output.dense" in meta["delta_config"]["feedforward_modules"]
    batch = make_batch("bert")
    assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE


def test_import_refuses_tensors_that_are_not_ia3_vectors():
    cls = deltas.get("ia3")
    with pytest.raises(UserError, match="not an \\(IA\\)\\^3 vector"):
        cls.from_peft({}, {"model.layers.0.mlp.down_proj.ia3_l": torch.ones(4, 4)}, None)
    with pytest.raises(UserError, match="not an \\(IA\\)\\^3 vector"):
        cls.from_peft({}, {"model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(1, 4)}, None)
