"""PEFT interoperability, checked against the real `peft` package.

Export: a deltafit checkpoint written with `deltafit export --format peft` loads with
`PeftModel.from_pretrained(base, dir)` and gives the same logits as deltafit's model (fp32,
max abs diff <= 1e-5). Import: an adapter trained and saved by peft itself is read by `deltafit
eval` / `deltafit merge`, with the same logits as peft's model.

Prefix tuning: PEFT numbers the real tokens after the prefix, deltafit from 0 (over the attention
mask); on RoPE models the export/import rotates the prefix keys by the prefix length, which makes
the two equal on every real token of rows without left padding (PEFT's positions ignore padding).
"""

from __future__ import annotations

import json

import pytest
import torch

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.loading import attach_from_checkpoint, load_source, source_recipe
from deltafit.model import build_model
from deltafit.peft_io import export_checkpoint
from tests.deltas.delta_testkit import make_batch, quiet_transformers, saved_checkpoint
from tests.helpers import run_cli, write_recipe

TOLERANCE = 1e-5  # fp32 on CPU; observed differences are ~1e-7 (summation order)

peft = pytest.importorskip("peft")  # a test dependency (pyproject's [test] extra); never silently absent in CI


def save_checkpoint(tmp_path, model_dir, task: str, delta: dict):
    """A deltafit checkpoint of a freshly attached, perturbed delta; returns (dir, model, delta)."""
    return saved_checkpoint(tmp_path / "ckpt", model_dir, delta, task=task)


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


def real_token_diff(theirs, ours, delta, batch) -> float:
    """Max abs logit difference over the real (unmasked) tokens: pad positions' logits are never used."""
    mask = batch["attention_mask"].bool()
    return (logits(theirs, None, batch) - logits(ours, delta, batch))[mask].abs().max().item()


def no_left_padding(arch: str = "llama") -> dict:
    return {k: v[:2] for k, v in make_batch(arch).items()}  # row 0 unpadded, row 1 right-padded


def without_labels(batch: dict) -> dict:
    """PEFT's AdaLoRA adds its orthogonality loss whenever labels are given, which a model loaded
    for inference cannot compute (it has no trainable adapter): compare logits without labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def train_with_cli(tmp_path, capsys, model_dir, data_file, delta: dict, steps: int = 6):
    """The final checkpoint of a real `deltafit train` run on the tiny model."""
    recipe = write_recipe(tmp_path / "recipe.yaml", model_dir, {"train": str(data_file), "format": "alpaca"}, delta,
                          train={"max_steps": steps, "batch_size": 4, "lr": 2e-2})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run" / "final"


def deltafit_model(path):
    """deltafit's model and delta for a checkpoint or PEFT adapter, as eval and merge rebuild them."""
    directory, meta, tensors = load_source(str(path))
    model, _, _ = build_model(source_recipe(directory, meta).model)
    return model.eval(), attach_from_checkpoint(model, meta, tensors), meta


def train_peft(model, steps: int = 3, after_step=None):
    """A few AdamW steps of a peft model on the fixed llama batch (lr 1e-2)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch("llama")
    for step in range(1, steps + 1):
        model(**batch).loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
    return model


def assert_merge_matches(adapter, theirs, tmp_path, capsys):
    """`deltafit merge` of a PEFT adapter saves a plain model with peft's logits."""
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli(capsys, "merge", adapter, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = without_labels(make_batch("llama"))
    diff = (logits(merged, None, batch) - logits(theirs, None, batch)).abs().max().item()
    assert diff <= TOLERANCE
    return diff


# -- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,rslora", [("lora", False), ("lora", True), ("lora-fa", False)],
                         ids=["lora", "rslora", "lora-fa"])
def test_lora_export_loads_in_peft_with_equal_logits_llama(tmp_path, tiny_llama, method, rslora):
    """LoRA-FA's result is a plain LoRA (B A with A frozen in training): PEFT's LORA type holds it."""
    directory, model, delta = save_checkpoint(tmp_path, tiny_llama, "causal-lm",
                                              {"method": method, "r": 4, "alpha": 8, "rslora": rslora,
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


NO_PEFT_FORM = {"adapter": {"bottleneck": 8}, "lamda": {"r": 4}, "lamda-pp": {"r": 4}, "said": {"dimension": 16},
                "aflora": {"r": 2}, "full": {}}


@pytest.mark.parametrize("method", sorted(NO_PEFT_FORM))
def test_methods_peft_cannot_express_are_refused(tmp_path, tiny_llama, method):
    assert deltas.get(method).peft_type is None
    directory, _, _ = save_checkpoint(tmp_path, tiny_llama, "causal-lm", {"method": method, **NO_PEFT_FORM[method]})
    with pytest.raises(UserError, match=f"method '{method}' cannot be expressed in PEFT's format; use the deltafit "
                                        f"checkpoint \\(deltafit eval/merge accept it directly\\)"):
        export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_prefix_on_absolute_positions_is_refused(tmp_path, tiny_bert):
    """PEFT puts BERT's real tokens at positions p.., deltafit at 0..: no PEFT adapter computes deltafit's model."""
    directory, _, _ = save_checkpoint(tmp_path, tiny_bert, "seq-cls", {"method": "prefix", "num_virtual_tokens": 3,
                                                                      "hidden": 16})
    with pytest.raises(UserError, match="prefix' on model type 'bert' cannot be expressed.*RoPE decoders.*deltafit "
                                        "checkpoint"):
        export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_export_cli_writes_the_adapter(tmp_path, tiny_llama, capsys):
    directory, _, _ = save_checkpoint(tmp_path, tiny_llama, "causal-lm", {"method": "lora", "r": 4, "alpha": 8})
    code, out, err = run_cli(capsys, "export", directory, "--format", "peft", "--output", tmp_path / "adapter")
    assert code == 0, err
    assert "LORA" in out
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    code, _, err = run_cli(capsys, "export", directory, "--output", tmp_path / "adapter")
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize("reparameterize", [True, False], ids=["mlp", "direct"])
def test_prefix_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, alpaca_file, capsys, reparameterize):
    final = train_with_cli(tmp_path, capsys, tiny_llama, alpaca_file, {
        "method": "prefix", "num_virtual_tokens": 3, "hidden": 16, "reparameterize": reparameterize}, steps=3)
    export_checkpoint(str(final), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (2, 16, 2)  # GQA: kv heads
    theirs = peft_model(tiny_llama, "causal-lm", tmp_path / "adapter")
    model, delta, _ = deltafit_model(final)
    batch = no_left_padding()
    assert real_token_diff(theirs, model, delta, batch) <= TOLERANCE
    with theirs.disable_adapter():
        assert real_token_diff(theirs, model, delta, batch) > 1e-3


def test_vera_export_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, alpaca_file, capsys):
    # q_proj (32 -> 32), v_proj (32 -> 16), down_proj (64 -> 32): the shared A and B are sliced per layer
    final = train_with_cli(tmp_path, capsys, tiny_llama, alpaca_file, {
        "method": "vera", "r": 4, "projection_seed": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]}, steps=3)
    export_checkpoint(str(final), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True and config["projection_prng_key"] == 3
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert stored["base_model.vera_A"].shape == (4, 64) and stored["base_model.vera_B"].shape == (32, 4)
    model, delta, _ = deltafit_model(final)
    batch = make_batch("llama")
    theirs = peft_model(tiny_llama, "causal-lm", tmp_path / "adapter")
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():
        assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max() > 1e-3
    # PEFT regenerating the projections from the seed itself gives them too (same draw as deltafit's)
    theirs = peft_model(tiny_llama, "causal-lm", _without_projections(tmp_path / "adapter", tmp_path / "seeded"))
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE


def _without_projections(adapter, out):
    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    tensors = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if ".vera_lambda_" in k}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_adalora_export_of_a_trimmed_run_loads_in_peft_with_equal_logits(tmp_path, tiny_llama, alpaca_file, capsys):
    final = train_with_cli(tmp_path, capsys, tiny_llama, alpaca_file, {
        "method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"]}, steps=6)
    export_checkpoint(str(final), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = [sum(kept) for kept in config["rank_pattern"].values()]
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6 and len(ranks) == 6
    assert sum(ranks) == 2 * 6 and min(ranks) < 4  # the schedule trimmed ranks to the target budget
    model, delta, _ = deltafit_model(final)
    assert sorted(delta.ranks().values()) == sorted(ranks)
    batch = without_labels(make_batch("llama"))
    theirs = peft_model(tiny_llama, "causal-lm", tmp_path / "adapter")
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE
    with theirs.disable_adapter():
        assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max() > 1e-4


def test_qlora_exports_as_lora_with_a_note(tmp_path, tiny_llama, capsys):
    directory, qlora_model, qlora = save_checkpoint(tmp_path, tiny_llama, "causal-lm",
                                                    {"method": "qlora", "r": 4, "alpha": 8, "dropout": 0.0})
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert "NF4-quantized" in capsys.readouterr().err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and len(config["target_modules"]) == 14  # all-linear
    theirs = peft_model(tiny_llama, "causal-lm", tmp_path / "adapter")  # on the full-precision base
    batch = make_batch("llama")
    # Exact: deltafit's LoRA with the same tensors on the same full-precision base.
    lora_model, lora, meta = deltafit_model(tmp_path / "adapter")
    assert meta["method"] == "lora"
    assert (logits(theirs, None, batch) - logits(lora_model, lora, batch)).abs().max().item() <= TOLERANCE
    # Against deltafit's QLoRA model only the base differs, so the gap is of the size of the bases'
    # own gap: full precision vs NF4 (what detach leaves: the dequantized 4-bit weights).
    quantization_gap = (logits(theirs, None, batch) - logits(qlora_model, qlora, batch)).abs().max().item()
    qlora.detach()
    with theirs.disable_adapter():
        base_gap = (logits(theirs, None, batch) - logits(qlora_model, None, batch)).abs().max().item()
    assert 1e-4 < quantization_gap <= 1.5 * base_gap


# -- import -----------------------------------------------------------------------------------


@pytest.fixture()
def peft_trained_lora(tmp_path, tiny_llama):
    """A LoRA adapter trained for a few steps by peft itself, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
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
        ("oft", {"peft_type": "OFT"}, "OFT.*cannot be imported: deltafit has no method.*reads .*IA3.*LORA"),
        # DoRA imports (tests/deltas/test_dora.py); one without its magnitude vectors is refused
        ("dora", {"use_dora": True}, "DoRA adapter: modules .* lack either lora_magnitude_vector"),
        ("pissa", {"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*path_initial_model_for_weight"),
        ("seq2seq", {"task_type": "SEQ_2_SEQ_LM"}, "task_type 'SEQ_2_SEQ_LM' is not supported"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(UserError, match=message):
            load_source(str(bad))


# -- import of adapters trained by peft: prefix, VeRA, AdaLoRA ---------------------------------


@pytest.mark.parametrize("projection", [True, False], ids=["prefix-projection", "direct"])
def test_peft_trained_prefix_imports_with_equal_logits(tmp_path, tiny_llama, alpaca_file, capsys, projection):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16)
    theirs = train_peft(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert meta["method"] == "prefix" and meta["delta_config"]["num_virtual_tokens"] == 3
    assert real_token_diff(theirs, model, delta, no_left_padding()) <= TOLERANCE
    code, _, err = run_cli(capsys, "eval", tmp_path / "peft-adapter", "--data", alpaca_file,
                           "--output", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["tokens"] > 0


@pytest.mark.parametrize("save_projection", [True, False], ids=["stored", "seeded"])
def test_peft_trained_vera_imports_and_merges_with_equal_logits(tmp_path, tiny_llama, capsys, save_projection):
    from peft import VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    config = VeraConfig(task_type="CAUSAL_LM", r=4, projection_prng_key=5, save_projection=save_projection,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = train_peft(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert meta["method"] == "vera" and meta["delta_config"]["projection_seed"] == 5
    batch = make_batch("llama")
    assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE
    assert_merge_matches(tmp_path / "peft-adapter", theirs, tmp_path, capsys)


def test_vera_adapter_with_foreign_projections_is_refused(tmp_path, tiny_llama):
    from peft import VeraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    peft_vera = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                               VeraConfig(task_type="CAUSAL_LM", r=4, save_projection=True, target_modules=["q_proj"]))
    peft_vera.save_pretrained(tmp_path / "peft-adapter")
    weights = tmp_path / "peft-adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match="vera_A/vera_B are not the projections drawn from projection_prng_key=0"):
        load_source(str(tmp_path / "peft-adapter"))


def test_peft_trained_adalora_imports_and_merges_with_equal_logits(tmp_path, tiny_llama, capsys):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=1, tinit=1, tfinal=1, deltaT=1, total_step=5,
                           lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    train_peft(theirs, steps=5, after_step=theirs.base_model.update_and_allocate).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    saved = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    assert min(sum(kept) for kept in saved["rank_pattern"].values()) < 4  # peft trimmed the ranks
    model, delta, meta = deltafit_model(tmp_path / "peft-adapter")
    assert meta["method"] == "adalora" and meta["delta_config"]["init_r"] == 4
    assert delta.ranks() == {f"{k.removesuffix('.lora_E')}.adalora": sum(v) for k, v in saved["rank_pattern"].items()}
    batch = without_labels(make_batch("llama"))
    assert (logits(model, delta, batch) - logits(theirs, None, batch)).abs().max().item() <= TOLERANCE
    assert_merge_matches(tmp_path / "peft-adapter", theirs, tmp_path, capsys)
