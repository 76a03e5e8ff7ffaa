"""`deltafit validate`: what a recipe would do, worked out on a weightless (meta-device) model."""

from __future__ import annotations

from deltafit import deltas
from deltafit.deltas._targets import HEAD_NAMES
from deltafit.limits import check_recipe_fits


def make_plan(recipe) -> dict:
    """Model, task, method, modules that get a delta, parameter counts and data sizes."""
    from deltafit.data import describe_data, resolve_packing
    from deltafit.model import meta_model

    data = describe_data(recipe.data)
    packing = resolve_packing(recipe.data, recipe.model.task, deltas.build(recipe.delta))
    data["packing"] = {True: f"on (rows of <= {recipe.data.max_length} tokens, per-example attention)", False: "off",
                       None: "auto (on where it saves >= 10% of batch positions)"}[packing]
    model = meta_model(recipe.model, num_labels=len(data.get("labels") or []) or None)
    check_recipe_fits(recipe, model.config, data.get("labels"))  # positions and classes; sizes: delta.check_fits
    total = sum(p.numel() for p in model.parameters())
    delta = deltas.build(recipe.delta)
    delta.attach(model, head=_head_guess(model, recipe.model.task))  # refuses sizes the model cannot use
    if recipe.train.max_steps:  # with epochs the step count depends on the tokenized data: train checks it
        delta.check_run(recipe.train.max_steps)
    delta_params = sum(p.numel() for p in delta.delta_parameters().values())
    trainable = sum(p.numel() for p in delta.trainable_parameters().values())
    return {
        "model": recipe.model.name, "task": recipe.model.task, "architecture": type(model).__name__,
        "method": delta.name, "targets": delta.describe_targets(), "delta_params": delta_params,
        "deltas": [_component(name, part) for name, part in delta.components().items()],
        "trainable": trainable, "total": total, "data_format": recipe.data.format, "data": data,
        "mergeable": delta.mergeable, "steps": recipe.train.max_steps, "epochs": recipe.train.epochs,
    }


def _component(name: str, part) -> dict:
    """One delta of a composition: its method, modules and trainable count."""
    return {"name": name, "method": part.name, "targets": part.describe_targets(), "mergeable": part.mergeable,
            "trainable": sum(p.numel() for p in part.delta_parameters().values())}


def _head_guess(model, task: str) -> list[str]:
    """A seq-cls model's new head (without weights we cannot ask which keys were missing)."""
    if task != "seq-cls":
        return []
    return [n for n, _ in model.named_modules()
            if n and n.split(".")[-1] in HEAD_NAMES and not n.endswith("pooler.dense")]
