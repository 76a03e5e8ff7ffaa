"""Reading what eval, merge and export start from: a deltafit checkpoint or a PEFT adapter.

`load_source(path)` returns (directory, metadata, tensors) for either; `source_recipe` the recipe
behind it; `attach_from_checkpoint` rebuilds the delta on a freshly built base model. Every command
that starts from a checkpoint path goes through here, so they accept the same inputs and refuse
the same mistakes.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from deltafit import checkpoint, deltas
from deltafit.errors import UserError


@contextmanager
def about_checkpoint(directory: Path):
    """Name the checkpoint in user errors raised while rebuilding its model and delta: the recipe
    keys they cite are those of its recipe.yaml, not of a recipe the user is editing."""
    try:
        yield
    except UserError as e:
        raise UserError(f"checkpoint '{directory}': {e}") from None


def attach_from_checkpoint(model, meta: dict, tensors: dict):
    """Rebuild the checkpoint's delta on `model` and load its tensors."""
    from deltafit.recipe import validate_delta

    delta = deltas.build(validate_delta(meta["delta_config"], source=f"checkpoint method '{meta['method']}'"))
    head = sorted({k[len("head."):].rsplit(".", 1)[0] for k in tensors if k.startswith("head.")})
    delta.attach(model, head=head, restoring=True)  # the tensors below replace any initialization
    delta.load_state_dict(tensors)
    return delta


def load_source(path: str, base_model: Optional[str] = None) -> tuple[Path, dict, dict]:
    """(directory, metadata, tensors) of a deltafit checkpoint or of a PEFT adapter directory
    (imported through its method's `from_peft`); `base_model` replaces the recorded base model."""
    from deltafit.peft_io import is_peft_adapter, load_peft_adapter

    if is_peft_adapter(Path(path)) and not (Path(path) / checkpoint.META).is_file():
        meta, tensors = load_peft_adapter(Path(path), base_model)
        return Path(path), meta, tensors
    directory, meta, tensors = load_checkpoint(path)
    if base_model:
        meta = {**meta, "model": {**meta["model"], "name": base_model}}
    return directory, meta, tensors


def load_checkpoint(path: str) -> tuple[Path, dict, dict]:
    """(directory, metadata, tensors) of a deltafit checkpoint (or a run directory: its final one)."""
    directory = checkpoint.find_checkpoint(path)
    meta, tensors = checkpoint.load(directory)
    return directory, meta, tensors


def source_recipe(directory: Path, meta: dict):
    """The recipe behind `load_source`'s result: the checkpoint's recipe.yaml (its model section as
    recorded in the metadata, so --base-model applies), or the one a PEFT import made up."""
    from deltafit.recipe import recipe_from_dict

    if "recipe" in meta:  # a PEFT adapter: no recipe file
        return recipe_from_dict(meta["recipe"], source=f"PEFT adapter '{directory}'")
    raw = checkpoint.read_recipe_dict(directory)
    raw["model"] = {**raw.get("model", {}), "name": meta["model"]["name"]}
    return recipe_from_dict(raw, source=f"{directory}/{checkpoint.RECIPE}")
