"""Recipes: the typed, validated description of one experiment.

A recipe is YAML with five sections (model, data, delta, train, log). Every default lives in the
classes below, and each field's description is its help text (`deltafit validate` and the README's
recipe reference are generated from them). Unknown keys are errors with a did-you-mean.

This module imports no torch: validating a recipe's shape is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltafit.errors import UserError, did_you_mean


class Section(BaseModel):
    """Base of every recipe section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    name: str = Field(
        description="Base model: a hub id (org/name), a local directory, a .gguf file, or "
        "'pkg:<python_package>[/subdir]' for a model shipped inside an installed package."
    )
    task: Literal["causal-lm", "seq-cls"] = Field(
        "causal-lm", description="What the model is trained to do: next-token prediction or sequence classification."
    )
    num_labels: Optional[int] = Field(
        None, ge=2, description="Number of classes for seq-cls; inferred from the training labels when unset."
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer reference when it differs from the model's.")
    gguf_file: Optional[str] = Field(
        None, description="GGUF file name inside `name` when it is a directory holding several."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base weights are loaded in (training math follows train.mixed_precision)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model. Off unless you trust its author."
    )


class DataSpec(Section):
    train: str = Field(description="Training data: a hub dataset name, or a local .json/.jsonl/.csv/.tsv/.parquet file.")
    config: Optional[str] = Field(None, description="Hub dataset configuration (e.g. 'sst2' for 'glue').")
    split: str = Field("train", description="Split of the training source to train on.")
    eval: Optional[str] = Field(None, description="Separate evaluation file or hub dataset (defaults to the training source).")
    eval_split: Optional[str] = Field(None, description="Named split to evaluate on (e.g. 'validation').")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of the training data for evaluation when no eval split or file is given."
    )
    format: Literal["alpaca", "chat", "completion", "classification"] = Field(
        "alpaca", description="How rows become examples: alpaca (instruction/input/output), chat (messages with the "
        "tokenizer's chat template), completion (plain text, or prompt + completion), classification (text [+ pair] + label)."
    )
    text_column: str = Field("text", description="Text column (completion, classification).")
    text_pair_column: Optional[str] = Field(None, description="Second text column for sentence-pair classification.")
    label_column: str = Field("label", description="Label column for classification (numbers or strings).")
    prompt_column: Optional[str] = Field(
        None, description="For completion data: a prompt column masked out of the loss; the completion is `text_column`."
    )
    messages_column: str = Field("messages", description="Column of chat messages ([{role, content}, ...]).")
    instruction_column: str = Field("instruction", description="Alpaca instruction column.")
    input_column: str = Field("input", description="Alpaca input column (may be empty).")
    output_column: str = Field("output", description="Alpaca output column.")
    max_length: int = Field(512, ge=8, description="Examples are truncated to this many tokens; the count of truncated ones is reported.")
    train_on_inputs: bool = Field(
        False, description="Also train on prompt tokens (instruction, user turns). By default only responses count in the loss."
    )
    max_train_examples: Optional[int] = Field(None, ge=1, description="Use only the first N training rows (after shuffling with the seed).")
    max_eval_examples: Optional[int] = Field(None, ge=1, description="Use only the first N evaluation rows.")


class TrainSpec(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay; never applied to biases, norms or embeddings-like vectors.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup as a fraction of total steps.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate decay after warmup.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm to this value (null: no clipping).")
    seed: int = Field(42, description="Seed for initialization, data order and dropout.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision of the forward/backward pass.")
    eval_every: Optional[int] = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    save_every: Optional[int] = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept on disk.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class LogSpec(Section):
    jsonl: bool = Field(True, description="Write metrics.jsonl in the output directory.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Accelerate trackers to log to as well (their package must be installed)."
    )
    progress: bool = Field(True, description="Show a rich progress bar on the main process.")


class DeltaSpec(Section):
    """The delta section's shape before its method is known; each method's own config replaces it."""

    model_config = ConfigDict(extra="allow")
    method: str = Field("lora", description="Delta method (see `deltafit methods`).")


class Recipe(Section):
    name: Optional[str] = Field(None, description="Run name; defaults to the recipe file's stem.")
    output_dir: Optional[str] = Field(None, description="Where checkpoints and logs go; default runs/<name>.")
    model: ModelSpec
    data: DataSpec
    delta: Any = Field(default_factory=DeltaSpec, description="Delta method and its options.")
    train: TrainSpec = Field(default_factory=TrainSpec)
    log: LogSpec = Field(default_factory=LogSpec)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name or 'run'}")

    def to_dict(self) -> dict:
        out = self.model_dump(mode="json")
        out["delta"] = self.delta.model_dump(mode="json")
        return out


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file '{path}' does not exist (expected a .yaml file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"recipe '{path}' is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe '{path}' is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe '{path}' must be a mapping with sections model, data, delta, train, log")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (the delta section against its method's own config)."""
    raw = dict(raw)
    delta_raw = raw.pop("delta", None) or {"method": "lora"}
    if not isinstance(delta_raw, dict):
        raise UserError(f"{source}: recipe key 'delta' must be a mapping with at least 'method'")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {_explain(e, Recipe)}") from None
    recipe.delta = validate_delta(delta_raw, source)
    return recipe


def validate_delta(delta_raw: dict, source: str = "recipe"):
    from deltafit.deltas import config_class

    method = delta_raw.get("method", "lora")
    config_cls = config_class(method)  # raises UserError with did-you-mean
    try:
        return config_cls.model_validate(delta_raw)
    except ValidationError as e:
        raise UserError(f"{source}: {_explain(e, config_cls, prefix='delta')}") from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set a.b.c=value`; the value is parsed as YAML so numbers and lists keep their type."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set '{item}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def _explain(error: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line naming the first bad key, what was given and what would be valid."""
    err = error.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(([prefix] if prefix else []) + loc)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        return f"unknown recipe key '{key}'{did_you_mean(loc[-1], fields)}; valid keys here: {', '.join(fields)}"
    if err["type"] == "missing":
        return f"recipe key '{key}' is required ({_description(root, loc)})"
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    return f"recipe key '{key}': {err['msg']}{shown}"


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _description(model: type[BaseModel], loc: list[str]) -> str:
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    field = model.model_fields.get(loc[-1]) if isinstance(model, type) else None
    return (field.description or "no default") if field else "no default"


def field_docs(model: type[BaseModel]) -> list[tuple[str, str, str]]:
    """(name, default, description) rows, for help text and the README's recipe reference."""
    rows = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((name, default, field.description or ""))
    return rows
