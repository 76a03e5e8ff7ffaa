"""PEFT interoperability, checked against the real `peft` package.

Export: a deltafit checkpoint written with `deltafit export --format peft` loads with
`PeftModel.from_pretrained(base, dir)` and gives the same logits as deltafit's model (fp32,
max abs diff <= 1e-5). Import: an adapter trained and saved by peft itself is read by `deltafit
eval` / `deltafit merge`, with the same logits as peft's model.
"""

from __future__ import annotations

import json

import pytest
import torch

from deltafit import checkpoint, deltas
from deltafit.errors import UserError
from deltafit.evaluate import attach_from_checkpoint, load_source, source_recipe
from deltafit.export import export_checkpoint
from deltafit.model import build_model
from deltafit.recipe import recipe_from_dict
from tests.deltas.delta_testkit import make_batch, perturb, quiet_transformers
from tests.helpers import run_cli

TOLERANCE = 1e-5  # fp32 on CPU; observed differences are ~1e-7 (summation order)

peft = pytest.importorskip("peft")  # a test dependency (pyproject's [test] extra); never silently absent in CI


def save_checkpoint(tmp_path, model_dir, task: str, delta: dict):
    """A deltafit checkpoint of a freshly attached, perturbed delta; returns (dir, model, delta)."""
    quiet_transformers()
    data = {"train": "unused.tsv", "format": "classification" if task == "seq-cls" else "alpaca"}
    recipe = recipe_from_dict({"model": {"name": str(model_dir), "task": task}, "data": data, "delta": delta})
    model, _, head = build_model(recipe.model, num_labels=2 if task == "seq-cls" else None)
    torch.manual_seed(0)
    attached = deltas.build(recipe.delta)
    attached.attach(model, head=head)
    perturb(attached, scale=0.2)
    meta = checkpoint.metadata(recipe, attached, None, step=1, epoch=0.0)
    directory = checkpoint.save(tmp_path / "ckpt", meta, attached.state_dict(), recipe.to_dict())
    return directory, model.eval(), attached


def peft_model(model_dir, task: str, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    torch.manual_seed(1234)  # a different random head than deltafit's: only modules_to_save can make them agree
    if task == "seq-cls":
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, adapter).eval()


def logits(model, delta, batch):
    with torch.no_grad():
        return model(**(delta.prepare_inputs(dict(batch)) if delta is not None else batch)).logits


def unpadded(arch: str) -> dict:
    batch = make_batch(arch)
    return {k: v[:1] for k, v in batch.items()}  # row 0 has no padding


# -- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_export_loads_in_peft_with_equal_logits_llama(tmp_path, tiny_llama, rslora):
    directory, model, delta = save_checkpoint(tmp_path, tiny_llama, "causal-lm",
                                              {"method": "lora", "r": 4, "alpha": 8, "rslora": rslora,
                                               "target_modules": "all-linear"})
    result = export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["use_rslora"] is rslora
    assert config["base_model_name_or_path"] == str(tiny_llama.resolve()) and result["modules_to_save"] is None
    theirs = peft_model(tiny_llama, "causal-lm", tmp_path / "adapter")
    batch = make_batch("llama")
    diff = (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item()
    assert diff <= TOLERANCE
    with theirs.disable_adapter():  # the adapter really matters, so equal logits mean something
        assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max() > 1e-3


def test_lora_export_with_classifier_head_bert(tmp_path, tiny_bert):
    directory, model, delta = save_checkpoint(tmp_path, tiny_bert, "seq-cls",
                                              {"method": "lora", "r": 4, "alpha": 8, "rslora": True})
    result = export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert result["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    theirs = peft_model(tiny_bert, "seq-cls", tmp_path / "adapter")
    batch = make_batch("bert")
    diff = (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item()
    assert diff <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prompt_tuning_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, tiny_bert, arch):
    model_dir, task = (tiny_llama, "causal-lm") if arch == "llama" else (tiny_bert, "seq-cls")
    directory, model, delta = save_checkpoint(tmp_path, model_dir, task,
                                              {"method": "prompt", "num_virtual_tokens": 4, "init": "random"})
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    theirs = peft_model(model_dir, task, tmp_path / "adapter")
    # PEFT keeps right padding after the tokens and numbers positions from 0 over the padding, so
    # the layouts agree for rows without left padding (BERT's right-padded row 1 included).
    batch = make_batch(arch) if arch == "bert" else unpadded(arch)
    if arch == "bert":
        batch = {k: v[:2] for k, v in batch.items()}
    diff = (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item()
    assert diff <= TOLERANCE


def test_methods_peft_cannot_express_are_refused(tmp_path, tiny_llama):
    directory, _, _ = save_checkpoint(tmp_path, tiny_llama, "causal-lm", {"method": "adapter", "bottleneck": 8})
    with pytest.raises(UserError, match="cannot be expressed in PEFT's format.*deltafit eval/merge"):
        export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_export_cli_writes_the_adapter(tmp_path, tiny_llama, capsys):
    directory, _, _ = save_checkpoint(tmp_path, tiny_llama, "causal-lm", {"method": "lora", "r": 4, "alpha": 8})
    code, out, err = run_cli(capsys, "export", directory, "--format", "peft", "--output", tmp_path / "adapter")
    assert code == 0, err
    assert "LORA" in out
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    code, _, err = run_cli(capsys, "export", directory, "--output", tmp_path / "adapter")
    assert code == 2 and "not empty" in err


# -- import -----------------------------------------------------------------------------------


@pytest.fixture()
def peft_trained_lora(tmp_path, tiny_llama):
    """A LoRA adapter trained for a few steps by peft itself, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch("llama")
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "peft-adapter")
    return tmp_path / "peft-adapter", model.eval()


def test_peft_trained_lora_imports_with_equal_logits(peft_trained_lora):
    adapter, theirs = peft_trained_lora
    directory, meta, tensors = load_source(str(adapter))
    recipe = source_recipe(directory, meta)
    assert meta["method"] == "lora" and meta["delta_config"]["r"] == 4
    model, _, _ = build_model(recipe.model)
    delta = attach_from_checkpoint(model, meta, tensors)
    batch = make_batch("llama")
    diff = (logits(model.eval(), delta, batch) - logits(theirs, None, batch)).abs().max().item()
    assert diff <= TOLERANCE


def test_eval_and_merge_accept_a_peft_adapter(peft_trained_lora, tmp_path, tiny_llama, alpaca_file, capsys):
    adapter, theirs = peft_trained_lora
    code, _, err = run_cli(capsys, "eval", adapter, "--data", alpaca_file, "--base-model", tiny_llama,
                           "--output", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["tokens"] > 0
    code, out, err = run_cli(capsys, "merge", adapter, "--output", tmp_path / "merged")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = make_batch("llama")
    assert (logits(merged, None, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE


def test_base_model_override_is_used(peft_trained_lora, tmp_path):
    adapter, _ = peft_trained_lora
    directory, meta, _ = load_source(str(adapter), base_model=str(tmp_path / "elsewhere"))
    recipe = source_recipe(directory, meta)
    assert recipe.model.name == meta["model"]["name"] == str(tmp_path / "elsewhere")


def test_unsupported_peft_adapters_are_refused(peft_trained_lora, tmp_path):
    adapter, _ = peft_trained_lora
    config = json.loads((adapter / "adapter_config.json").read_text())
    for name, change, message in [
        ("ia3", {"peft_type": "IA3"}, "IA3.*cannot be imported.*LORA, PROMPT_TUNING"),
        ("dora", {"use_dora": True}, "use_dora=True has no deltafit equivalent"),
        ("seq2seq", {"task_type": "SEQ_2_SEQ_LM"}, "task_type 'SEQ_2_SEQ_LM' is not supported"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(UserError, match=message):
            load_source(str(bad))
