"""Reading what eval, merge, export and generate start from: a deltafit checkpoint, a PEFT adapter,
or (for eval and generate) a merged model directory.

`load_source(path)` returns (directory, metadata, tensors) for any of them (tensors None for a merged
model: its delta is in its weights); `source_recipe` the recipe behind it; `attach_from_checkpoint`
rebuilds the delta on a freshly built base model. Every command that starts from a checkpoint path
goes through here, so they accept the same inputs and refuse the same mistakes.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from deltafit import checkpoint, deltas
from deltafit.errors import UserError
from deltafit.fsutil import CHECKPOINT_MARKERS

MERGED = "merged"  # the `method` of a merged model's metadata


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


def load_source(path: str, base_model: Optional[str] = None, merged: bool = False) -> tuple[Path, dict, Optional[dict]]:
    """(directory, metadata, tensors) of a deltafit checkpoint or of a PEFT adapter directory
    (imported through its method's `from_peft`); `base_model` replaces the recorded base model.
    With `merged`, a merged model directory too (`load_merged_model`: tensors None)."""
    from deltafit.peft_io import is_peft_adapter, load_peft_adapter

    if merged and is_merged_model(Path(path)):
        return load_merged_model(Path(path), base_model)
    if is_peft_adapter(Path(path)) and not (Path(path) / checkpoint.META).is_file():
        meta, tensors = load_peft_adapter(Path(path), base_model)
        return Path(path), meta, tensors
    directory, meta, tensors = load_checkpoint(path)
    if base_model:
        meta = {**meta, "model": {**meta["model"], "name": base_model}}
    return directory, meta, tensors


def is_merged_model(path: Path) -> bool:
    """A transformers model directory (what `deltafit merge` writes), not a checkpoint or an adapter."""
    return (path / "config.json").is_file() and not any((path / m).is_file() for m in CHECKPOINT_MARKERS)


def load_merged_model(path: Path, base_model: Optional[str] = None) -> tuple[Path, dict, None]:
    """(directory, metadata, None) of a merged model. `deltafit merge` saves only the model and its
    tokenizer, so the metadata is read off config.json: the task from the architecture, the label
    names of a classifier, the saved dtype. It records no data (eval asks for --data), and its prompts
    are raw text (format completion) unless the caller says otherwise."""
    if base_model:
        raise UserError(f"--base-model: '{path}' is a merged model, its own base; leave --base-model out")
    config = _read_config(path)
    architectures = config.get("architectures") or []
    task = "seq-cls" if any("ForSequenceClassification" in str(a) for a in architectures) else "causal-lm"
    dtype = config.get("dtype") or config.get("torch_dtype")  # merge may save bfloat16/float16: keep it
    model = {"name": str(path), "task": task, **({"dtype": dtype} if dtype in ("bfloat16", "float16") else {})}
    data_format = "classification" if task == "seq-cls" else "completion"
    meta = {"task": task, "method": MERGED, "recipe": {"model": model, "data": {"train": "", "format": data_format}}}
    labels = _label_names(config) if task == "seq-cls" else None
    return path, {**meta, "label_names": labels} if labels else meta, None


def _read_config(path: Path) -> dict:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model '{path}': config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"model '{path}': config.json is not a JSON object")
    return config


def _label_names(config: dict) -> Optional[list[str]]:
    """A classifier's label names by id (the training labels deltafit saved as id2label), so the eval
    data's labels map to the ids the head was trained with."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        names = [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        return None
    # transformers' placeholders (LABEL_0, ...) name no training label: ids then come from the data.
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def load_checkpoint(path: str) -> tuple[Path, dict, dict]:
    """(directory, metadata, tensors) of a deltafit checkpoint (or a run directory: its final one)."""
    directory = checkpoint.find_checkpoint(path)
    meta, tensors = checkpoint.load(directory)
    return directory, meta, tensors


def source_recipe(directory: Path, meta: dict):
    """The recipe behind `load_source`'s result: the checkpoint's recipe.yaml (its model section as
    recorded in the metadata, so --base-model applies), or the one a PEFT import made up."""
    from deltafit.recipe import recipe_from_dict

    if "recipe" in meta:  # a PEFT adapter or a merged model: no recipe file
        kind = "merged model" if meta.get("method") == MERGED else "PEFT adapter"
        return recipe_from_dict(meta["recipe"], source=f"{kind} '{directory}'")
    raw = checkpoint.read_recipe_dict(directory)
    raw["model"] = {**raw.get("model", {}), "name": meta["model"]["name"]}
    return recipe_from_dict(raw, source=f"{directory}/{checkpoint.RECIPE}")
