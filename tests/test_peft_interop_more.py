"""PEFT interoperability and merge, continued: what an adapter or merged model must carry so that it
means what the checkpoint meant.

- a mean-pooled classifier cannot be exported (PEFT pools [CLS]); its merge says so in a note;
- the checkpoint's label names travel in the adapter (safetensors metadata), and an adapter that
  names none is refused on eval data whose labels do not cover its head;
- GPT-2's Conv1D layers: PEFT's fan_in_fan_out=True imports, and deltafit's export writes it;
- a LoRA on a tied LM head merges (the head is untied) and reloads in transformers as merged;
- merge saves in the base's stored dtype; a failed merge self-check is one line, not a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

from deltafit import peft_io
from deltafit.errors import UserError
from deltafit.merge import merge_checkpoint
from deltafit.peft_io import WEIGHTS, export_checkpoint
from tests.deltas.delta_testkit import make_batch, quiet_transformers, saved_checkpoint
from tests.helpers import assert_one_clean_line, run_cli
from tests.test_peft_interop import TOLERANCE, deltafit_model, logits, without_labels

peft = pytest.importorskip("peft")

LABELS = ["neg", "neu", "pos"]  # ids 0, 1, 2 as trained
TEXTS = [f"the cat sat {i} on a great mat {i * 7 % 13}" for i in range(60)]


def classifier_checkpoint(directory, model_dir, label_names, pooling=None, delta=None):
    """(checkpoint dir, model, delta): a deltafit seq-cls checkpoint with these label names, its LoRA
    and head perturbed strongly enough that rows get different predicted classes."""
    from deltafit import checkpoint, deltas
    from deltafit.model import build_model
    from deltafit.recipe import recipe_from_dict
    from tests.deltas.delta_testkit import perturb

    quiet_transformers()
    model_section = {"name": str(model_dir), "task": "seq-cls", **({"pooling": pooling} if pooling else {})}
    recipe = recipe_from_dict({"model": model_section, "data": {"train": "unused.tsv", "format": "classification"},
                               "delta": delta or {"method": "lora", "r": 4, "alpha": 8}})
    model, _, head = build_model(recipe.model, num_labels=len(label_names), label_names=label_names)
    torch.manual_seed(0)
    attached = deltas.build(recipe.delta)
    attached.attach(model, head=head)
    perturb(attached, scale=0.2)
    _spread_predictions(model, attached, model_dir)
    meta = checkpoint.metadata(recipe, attached, label_names, step=1, epoch=0.0)
    return checkpoint.save(directory, meta, attached.state_dict(), recipe.to_dict()), model.eval(), attached


def _texts_batch(model_dir) -> dict:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(model_dir)(TEXTS, return_tensors="pt", padding=True))


def _spread_predictions(model, delta, model_dir) -> None:
    """A random head predicts one class for every row; centring its bias on TEXTS' logits makes each
    class win on some rows (what the label tests need)."""
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)
        model.classifier.bias.sub_(logits(model.eval(), delta, _texts_batch(model_dir)).mean(0))


@contextmanager
def captured_warnings():
    """Python warnings and transformers/peft log records, as one text."""
    from transformers.utils import logging as hf_logging

    buffer, handler = io.StringIO(), None
    handler = logging.StreamHandler(buffer)
    loggers = [logging.getLogger(name) for name in ("transformers", "peft")]
    hf_logging.set_verbosity_warning()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Deprecation notices of transformers' own API (peft calls it) are no fault of an adapter.
            notices = (FutureWarning, DeprecationWarning)
            yield lambda: buffer.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught
                                                      if not issubclass(w.category, notices))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        quiet_transformers()


# -- 1. mean pooling ---------------------------------------------------------------------------


def test_mean_pooled_classifier_export_is_refused_and_its_merge_carries_a_note(tmp_path, tiny_bert, capsys):
    directory, _, _ = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS[:2], pooling="mean")
    code, out, err = run_cli(capsys, "export", directory, "--output", tmp_path / "adapter")
    assert_one_clean_line(code, err, "model.pooling: mean", "[CLS]", "model.pooling: cls", "deltafit eval", out=out)
    assert not (tmp_path / "adapter").exists()
    code, out, err = run_cli(capsys, "merge", directory, "--output", tmp_path / "merged")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "[CLS]" in notes[0] and "deltafit" in notes[0], out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["deltafit_pooling"] == "mean"


def test_cls_pooled_classifier_merges_without_a_note(tmp_path, tiny_bert):
    directory, _, _ = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS[:2], pooling="cls")
    assert "note" not in merge_checkpoint(str(directory), str(tmp_path / "merged"))


def test_cls_export_of_a_mean_default_base_imports_pooling_cls(tmp_path, tiny_bert):
    """On a sentence-transformers base deltafit defaults to mean pooling; PEFT pools [CLS], so the
    import must say cls or its logits would differ from PEFT's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tests.test_pooling import sentence_transformers_copy

    base_dir = sentence_transformers_copy(tiny_bert, tmp_path, mean=True)
    directory, model, delta = classifier_checkpoint(tmp_path / "ckpt", base_dir, LABELS[:2], pooling="cls")
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    ours, our_delta, meta = deltafit_model(tmp_path / "adapter")
    assert meta["model"]["pooling"] == "cls"
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = without_labels(make_batch("bert"))
    assert (logits(theirs, None, batch) - logits(ours, our_delta, batch)).abs().max().item() <= TOLERANCE


# -- 2. label names ----------------------------------------------------------------------------


def _predicted_rows_file(path, model, delta, model_dir, keep_classes):
    """A TSV whose labels are the checkpoint's own predictions, keeping rows predicted as `keep_classes`."""
    predicted = logits(model, delta, _texts_batch(model_dir)).argmax(-1).tolist()
    rows = [(t, LABELS[p]) for t, p in zip(TEXTS, predicted) if p in keep_classes]
    assert len({label for _, label in rows}) == 2, predicted  # the test needs both kept classes present
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    return path


def test_label_names_survive_export_on_eval_data_missing_a_class(tmp_path, tiny_bert, capsys):
    directory, model, delta = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS)
    data = _predicted_rows_file(tmp_path / "two.tsv", model, delta, tiny_bert, keep_classes=(1, 2))
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    scores = {}
    for name, source in (("checkpoint", directory), ("adapter", tmp_path / "adapter")):
        out = tmp_path / f"{name}.json"
        code, _, err = run_cli(capsys, "eval", source, "--data", data, "--output", out)
        assert code == 0, err
        scores[name] = json.loads(out.read_text())
    assert scores["checkpoint"]["accuracy"] == pytest.approx(1.0)  # labels are its own predictions
    assert {k: scores["adapter"][k] for k in ("accuracy", "f1", "examples")} == \
           {k: scores["checkpoint"][k] for k in ("accuracy", "f1", "examples")}


def test_adapter_without_label_names_is_refused_on_data_missing_a_class(tmp_path, tiny_bert, capsys):
    from safetensors.torch import load_file, save_file

    directory, model, delta = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS)
    data = _predicted_rows_file(tmp_path / "two.tsv", model, delta, tiny_bert, keep_classes=(1, 2))
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / WEIGHTS
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT itself saves it
    code, out, err = run_cli(capsys, "eval", tmp_path / "adapter", "--data", data,
                             "--output", tmp_path / "eval.json")
    assert_one_clean_line(code, err, "does not name its labels", "3 outputs", "2 distinct labels", out=out)


def test_exported_label_names_load_silently_in_peft(tmp_path, tiny_bert):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    directory, model, delta = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS)
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    stored = safe_open(str(tmp_path / "adapter" / WEIGHTS), framework="pt").metadata()
    assert json.loads(stored[peft_io.LABELS_KEY]) == LABELS
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    with captured_warnings() as text:
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert text() == ""
    batch = without_labels(make_batch("bert"))
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE


def test_mismatched_stored_label_names_are_refused(tmp_path, tiny_bert):
    from safetensors.torch import load_file, save_file

    directory, _, _ = classifier_checkpoint(tmp_path / "ckpt", tiny_bert, LABELS)
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / WEIGHTS
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", peft_io.LABELS_KEY: '["a", "b"]'})
    with pytest.raises(UserError, match="names 2 labels .* 3 outputs"):
        deltafit_model(tmp_path / "adapter")


# -- 3. GPT-2's Conv1D and fan_in_fan_out ------------------------------------------------------


PEFT_GPT2_CONFIGS = {
    "lora": lambda p: p.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
                                   fan_in_fan_out=True),
    "dora": lambda p: p.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
                                   fan_in_fan_out=True, use_dora=True),
    "ia3": lambda p: p.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                 fan_in_fan_out=True),
    "vera": lambda p: p.VeraConfig(task_type="CAUSAL_LM", r=8, target_modules=["c_fc"], fan_in_fan_out=True,
                                   save_projection=True),
    "adalora": lambda p: p.AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=4, total_step=10,
                                         target_modules=["c_attn"], fan_in_fan_out=True),
}


@pytest.mark.parametrize("method", sorted(PEFT_GPT2_CONFIGS))
def test_peft_adapter_on_gpt2_conv1d_imports_with_equal_logits(tmp_path, tiny_gpt2, method):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2), PEFT_GPT2_CONFIGS[method](peft))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for _, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours, delta, meta = deltafit_model(tmp_path / "adapter")
    assert meta["method"] == method
    batch = without_labels(make_batch("gpt2"))
    theirs.eval()
    diff = (logits(ours, delta, batch) - logits(theirs, None, batch)).abs().max().item()
    assert diff <= TOLERANCE
    with theirs.disable_adapter():  # the adapter matters: equal logits mean something
        assert (logits(ours, delta, batch) - logits(theirs, None, batch)).abs().max().item() > 1e-3


@pytest.mark.parametrize("targets,expected", [(["c_attn", "c_fc"], True), (["lm_head"], False)],
                         ids=["conv1d", "linear"])
def test_gpt2_export_sets_fan_in_fan_out_and_loads_in_peft_silently(tmp_path, tiny_gpt2, targets, expected):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory, model, delta = saved_checkpoint(tmp_path / "ckpt", tiny_gpt2,
                                               {"method": "lora", "r": 4, "alpha": 8, "target_modules": targets})
    export_checkpoint(str(directory), str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is expected
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with captured_warnings() as text:
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert "fan_in_fan_out" not in text()
    batch = without_labels(make_batch("gpt2"))
    assert (logits(theirs, None, batch) - logits(model, delta, batch)).abs().max().item() <= TOLERANCE


# -- 4. merging into a tied LM head ------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    directory = tmp_path_factory.mktemp("tied-llama")
    tok = make_tokenizer(directory, pad=False)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_lora_on_a_tied_lm_head_merges_and_reloads_as_merged(tmp_path, tied_llama, capsys):
    from transformers import AutoModelForCausalLM

    directory, model, delta = saved_checkpoint(tmp_path / "ckpt", tied_llama, {
        "method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]})
    code, _, err = run_cli(capsys, "merge", directory, "--output", tmp_path / "merged")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    quiet_transformers()
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    base = AutoModelForCausalLM.from_pretrained(tied_llama)
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the input side untouched
    batch = without_labels(make_batch("llama"))
    diff = (logits(merged.eval(), None, batch) - logits(model, delta, batch)).abs().max().item()
    assert diff <= TOLERANCE


def test_failed_merge_check_is_one_line_and_saves_nothing(tmp_path, tiny_llama, capsys, monkeypatch):
    import deltafit.merge

    directory, _, _ = saved_checkpoint(tmp_path / "ckpt", tiny_llama, {"method": "lora", "r": 4, "alpha": 8})
    monkeypatch.setitem(deltafit.merge.MAX_ALLOWED_DIFF, "float32", -1.0)  # any difference now fails the check
    code, out, err = run_cli(capsys, "merge", directory, "--output", tmp_path / "merged")
    assert_one_clean_line(code, err, "internal error", "nothing was saved", out=out)
    assert not (tmp_path / "merged").exists()


# -- 5. merge dtype ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import _tiny_llama

    source = _tiny_llama(tmp_path_factory.mktemp("f32-llama"))
    directory = tmp_path_factory.mktemp("bf16-llama")
    AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("requested,expected", [(None, "bfloat16"), ("float32", "float32")],
                         ids=["stored", "override"])
def test_merge_saves_in_the_base_dtype_unless_told(tmp_path, bf16_llama, requested, expected):
    from safetensors import safe_open

    directory, _, _ = saved_checkpoint(tmp_path / "ckpt", bf16_llama, {"method": "lora", "r": 4, "alpha": 8})
    result = merge_checkpoint(str(directory), str(tmp_path / "merged"), dtype=requested)
    assert result["dtype"] == expected
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == expected
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{expected}"}
