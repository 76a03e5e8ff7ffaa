"""Fold a mergeable delta into its base weights and save a plain transformers model.

Before saving, the merged model is checked against the unmerged one on a few real inputs; the
largest logit difference is reported (and too large a difference refuses to save).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from deltafit import deltas
from deltafit.errors import UserError
from deltafit.fsutil import atomic_dir, new_output_dir

# Texts used to compare merged and unmerged logits when the recipe's data is not at hand. Every
# merged weight acts on every token, so two short texts (of different lengths: padding and the
# attention mask take part) catch a wrong fold as surely as a long batch, for a fraction of the
# cost: the two forward passes must stay small next to the load and save they guard.
SAMPLE_TEXTS = [
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b",
]
MAX_ALLOWED_DIFF = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


def merge_checkpoint(path: str, output: str, dtype: Optional[str] = None, base_model: Optional[str] = None) -> dict:
    from deltafit.loading import about_checkpoint, attach_from_checkpoint, load_source, source_recipe
    from deltafit.model import build_model
    from deltafit.recipe import validate_delta

    directory, meta, tensors = load_source(path, base_model)
    # The method's facts from its recorded config: a composition merges only if all its deltas do.
    method = deltas.build(validate_delta(meta["delta_config"], source=f"checkpoint '{directory}'"))
    if not method.mergeable:
        raise UserError(f"method '{meta['method']}' cannot be merged: {method.not_mergeable_because}; "
                        f"use the checkpoint as is with `deltafit eval`")
    out = new_output_dir(Path(output), directory)
    recipe = source_recipe(directory, meta)
    with about_checkpoint(directory):
        model, tokenizer, _ = build_model(recipe.model, label_names=meta.get("label_names"))
        delta = attach_from_checkpoint(model, meta, tensors)
    model.eval()
    inputs = _sample_inputs(tokenizer)
    with torch.no_grad():
        before = model(**delta.prepare_inputs(dict(inputs))).logits.float()
        delta.merge()
        after = model(**inputs).logits.float()
    diff = float((before - after).abs().max())
    limit = MAX_ALLOWED_DIFF[recipe.model.dtype]
    if diff > limit:
        raise RuntimeError(f"merged logits differ from unmerged by {diff:.3g} (> {limit}): not saving")
    target_dtype = dtype or recipe.model.dtype
    model.to(getattr(torch, target_dtype))
    _save_pretrained(model, tokenizer, out)
    return {"output": str(out), "method": meta["method"], "max_abs_logit_diff": diff,
            "inputs": int(inputs["input_ids"].shape[0]), "dtype": target_dtype}


def _sample_inputs(tokenizer) -> dict:
    return dict(tokenizer(SAMPLE_TEXTS, return_tensors="pt", padding=True))


def _save_pretrained(model, tokenizer, out: Path) -> None:
    """save_pretrained into a temp sibling, renamed into place: no half-written model directory."""
    from deltafit.model import quiet_loading

    with atomic_dir(out) as tmp, quiet_loading():  # no transformers progress bar: deltafit reports the save
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
