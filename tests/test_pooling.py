"""Classification pooling (`model.pooling: cls | mean`): the hook's math, the default read from a
sentence-transformers folder, the plain model for cls, refusals, and train -> eval -> merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from deltafit.model import build_model, default_pooling, masked_mean
from deltafit.recipe import ModelSpec
from tests.helpers import assert_one_clean_line, run_cli, write_recipe


def batch(tokenizer):
    enc = tokenizer(["a great fine movie indeed", "bad"], padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the second row is padded: the mask matters
    return enc


def seeded_build(spec):
    torch.manual_seed(0)  # the new head's random init, the same for every build
    model, tokenizer, _ = build_model(spec)
    return model.eval(), tokenizer


def test_mean_pooling_is_the_masked_mean_through_the_head(tiny_bert):
    model, tok = seeded_build(ModelSpec(name=str(tiny_bert), task="seq-cls", pooling="mean"))
    enc = batch(tok)
    with torch.no_grad():
        logits = model(**enc).logits
        hidden = model.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        by_hand = (hidden * mask).sum(1) / mask.sum(1)
        expected = model.classifier(by_hand)
    assert torch.allclose(masked_mean(hidden, enc["attention_mask"]), by_hand, atol=1e-6)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert model.config.deltafit_pooling == "mean"


def test_cls_is_the_plain_model(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    cls_model, tok = seeded_build(ModelSpec(name=str(tiny_bert), task="seq-cls", pooling="cls"))
    default_model, _ = seeded_build(ModelSpec(name=str(tiny_bert), task="seq-cls"))  # no sentence-transformers files
    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    enc = batch(tok)
    with torch.no_grad():
        want = plain(**enc).logits
        assert torch.equal(cls_model(**enc).logits, want) and torch.equal(default_model(**enc).logits, want)
    assert default_model.config.deltafit_pooling == "cls"


def sentence_transformers_copy(tiny_bert, tmp_path, mean=True):
    folder = tmp_path / "st-model"
    shutil.copytree(tiny_bert, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}))
    return folder


@pytest.mark.parametrize("mean", [True, False])
def test_default_follows_a_sentence_transformers_pooling_config(tiny_bert, tmp_path, mean):
    from transformers import AutoConfig

    folder = sentence_transformers_copy(tiny_bert, tmp_path, mean)
    assert default_pooling(AutoConfig.from_pretrained(folder), str(folder)) == ("mean" if mean else "cls")
    default_model, tok = seeded_build(ModelSpec(name=str(folder), task="seq-cls"))
    chosen, _ = seeded_build(ModelSpec(name=str(folder), task="seq-cls", pooling="mean" if mean else "cls"))
    enc = batch(tok)
    with torch.no_grad():
        assert torch.equal(default_model(**enc).logits, chosen(**enc).logits)
    # an explicit setting wins over the folder's
    other, _ = seeded_build(ModelSpec(name=str(folder), task="seq-cls", pooling="cls" if mean else "mean"))
    with torch.no_grad():
        assert not torch.allclose(other(**enc).logits, chosen(**enc).logits)


def test_refused_where_it_cannot_apply(capsys, tmp_path, tiny_llama, alpaca_file, cls_file):
    recipe = write_recipe(tmp_path / "lm.yaml", tiny_llama, {"train": str(alpaca_file)})
    code, out, err = run_cli(capsys, "validate", recipe, "--set", "model.pooling=mean")
    assert_one_clean_line(code, err, "model.pooling", "seq-cls", out=out)
    recipe = write_recipe(tmp_path / "cls.yaml", tiny_llama, {"train": str(cls_file), "format": "classification",
                                                              "text_column": "sentence"}, task="seq-cls")
    code, out, err = run_cli(capsys, "validate", recipe, "--set", "model.pooling=cls")
    assert_one_clean_line(code, err, "model.pooling", "LlamaForSequenceClassification", "no pooler", out=out)
    code, out, err = run_cli(capsys, "validate", recipe, "--set", "model.pooling=max")
    assert_one_clean_line(code, err, "model.pooling", out=out)


def test_train_eval_merge_keep_mean_pooling(capsys, tmp_path, tiny_bert, cls_file):
    data = {"train": str(cls_file), "eval": str(cls_file), "format": "classification", "text_column": "sentence"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_bert, data, task="seq-cls", train={"max_steps": 3, "batch_size": 8})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["pooling"] = "mean"
    recipe.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err
    assert "pooling: mean" in (tmp_path / "run" / "final" / "recipe.yaml").read_text()
    code, out, err = run_cli(capsys, "eval", tmp_path / "run" / "final")
    assert code == 0, err
    written = " ".join(out.split()).rsplit("written to ", 1)[1].split()[0]
    first = json.loads(Path(written).read_text())
    code, out, err = run_cli(capsys, "merge", tmp_path / "run" / "final", "--output", tmp_path / "merged")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["deltafit_pooling"] == "mean"
    # the merged model pools the same way when deltafit loads it without a recipe saying so
    merged, tok = seeded_build(ModelSpec(name=str(tmp_path / "merged"), task="seq-cls"))
    assert merged.config.deltafit_pooling == "mean"
    assert 0.0 <= first["accuracy"] <= 1.0
