"""Fold a mergeable delta into its base weights and save a plain transformers model.

Before saving, the merged model is checked against the unmerged one on a few real inputs; the
largest logit difference is reported (and too large a difference refuses to save).

A targeted weight that another module shares (an LM head tied to the input embeddings) is untied
first: folding the update into it would change the other module too. The saved config then says
`tie_word_embeddings: false`, so transformers loads both copies as saved instead of re-tying them.
The weights are saved in the dtype they were merged in (model.dtype), or in the base's stored 16-bit
dtype where a float32 merge ran on such a base, unless --dtype says otherwise.
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
SAVE_DTYPES = ("float32", "bfloat16", "float16")
MEAN_POOLING_NOTE = ("note: this classifier pools the mean of its tokens (model.pooling: mean), recorded as "
                     "deltafit_pooling in config.json; plain transformers ignores it and pools the [CLS] token, "
                     "so only deltafit (eval) reproduces these logits")


class MergeMismatch(UserError, RuntimeError):
    """The merged model's logits differ from the unmerged one's: a fault of deltafit's merge (so a
    RuntimeError), not of the user's input; a UserError too only so that the CLI prints it as one
    line instead of a traceback (nothing was saved)."""


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
    _untie_targets(model, tensors)
    inputs = _sample_inputs(tokenizer)
    with torch.no_grad():
        before = model(**delta.prepare_inputs(dict(inputs))).logits.float()
        delta.merge()
        after = model(**inputs).logits.float()
    diff = float((before - after).abs().max())
    limit = MAX_ALLOWED_DIFF[recipe.model.dtype]
    if diff > limit:
        raise MergeMismatch(f"internal error: merging '{meta['method']}' of '{directory}': merged logits differ "
                            f"from unmerged by {diff:.3g} (> {limit}); nothing was saved. This is a deltafit bug: "
                            f"please report it; the checkpoint itself still works with `deltafit eval`")
    target_dtype = dtype or _save_dtype(recipe.model)
    model.to(getattr(torch, target_dtype))
    _save_pretrained(model, tokenizer, out)
    result = {"output": str(out), "method": meta["method"], "max_abs_logit_diff": diff,
              "inputs": int(inputs["input_ids"].shape[0]), "dtype": target_dtype}
    if _mean_pooled(model):
        result["note"] = MEAN_POOLING_NOTE
    return result


def _untie_targets(model, tensors: dict) -> list[str]:
    """Give each module the delta changes its own copy of a weight that another module shares (tied
    embeddings), and record in the config that the weights are no longer tied. Returns those modules."""
    sharing: dict[int, dict[int, str]] = {}  # weight -> {module -> one of its names}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            sharing.setdefault(id(weight), {}).setdefault(id(module), name)
    keys = ["." + key for key in tensors]
    untied = [name for modules in sharing.values() if len(modules) > 1
              for name in modules.values() if any(f".{name}." in key for key in keys)]
    for name in untied:
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    if untied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return untied


def _save_dtype(spec) -> str:
    """The dtype the weights were merged in (model.dtype), except that a float32 merge on a base stored
    in 16 bits saves in the base's dtype: the merged model is then the size of the base."""
    if spec.dtype != "float32":
        return spec.dtype  # more bits would only hold the same 16-bit values, at twice the size
    return _stored_dtype(spec) or spec.dtype


def _stored_dtype(spec) -> Optional[str]:
    """The dtype the base's weights are stored in (its config's dtype / torch_dtype), when floating."""
    from deltafit.model import load_config

    config = load_config(spec)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else None
    return name if name in SAVE_DTYPES else None


def _mean_pooled(model) -> bool:
    from deltafit.model import POOLING_CONFIG_KEY

    return getattr(model.config, POOLING_CONFIG_KEY, None) == "mean"


def _sample_inputs(tokenizer) -> dict:
    return dict(tokenizer(SAMPLE_TEXTS, return_tensors="pt", padding=True))


def _save_pretrained(model, tokenizer, out: Path) -> None:
    """save_pretrained into a temp sibling, renamed into place: no half-written model directory."""
    from deltafit.model import quiet_loading

    with atomic_dir(out) as tmp, quiet_loading():  # no transformers progress bar: deltafit reports the save
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
