"""Recipes: the typed, validated description of one experiment.

A recipe is YAML with five sections (model, data, delta, train, log). Every default lives in the
classes below, and each field's description is its help text (`deltafit validate` and the README's
recipe reference are generated from them). Unknown keys are errors with a did-you-mean.

This module imports no torch: validating a recipe's shape is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from deltafit.errors import UserError, did_you_mean


class Section(BaseModel):
    """Base of every recipe section: unknown keys are rejected, assignments re-validated."""

    # NaN and infinity are no valid setting anywhere (`epochs: .inf` would never end).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    pooling: Optional[Literal["cls", "mean"]] = Field(
        None, description="seq-cls on encoders with a pooler (BERT family): what the classifier reads. cls: the "
        "architecture's own head (the pooler on the first token); mean: the attention-masked mean of the last "
        "hidden states (sentence-transformers' pooling). Default: what the model was trained for when its files "
        "say (a sentence-transformers 1_Pooling/config.json, or a merged deltafit model's config), else cls."
    )


class TrainSource(Section):
    """One source of a training mixture (`data.train` as a list). Every key left out is the data section's."""

    source: str = Field(description="A hub dataset name, a local data file or folder, or builtin:<task>.")
    weight: float = Field(
        1.0, gt=0, description="Relative weight: the source's share of the mixture is weight / sum of the weights."
    )
    format: Optional[Literal["alpaca", "chat", "completion", "classification"]] = Field(
        None, description="data.format for this source.")
    config: Optional[str] = Field(None, description="data.config for this source.")
    split: Optional[str] = Field(None, description="data.split for this source.")
    text_column: Optional[str] = Field(None, description="data.text_column for this source.")
    text_pair_column: Optional[str] = Field(None, description="data.text_pair_column for this source.")
    label_column: Optional[str] = Field(None, description="data.label_column for this source.")
    prompt_column: Optional[str] = Field(None, description="data.prompt_column for this source.")
    prompt_template: Optional[str] = Field(None, description="data.prompt_template for this source.")
    messages_column: Optional[str] = Field(None, description="data.messages_column for this source.")
    instruction_column: Optional[str] = Field(None, description="data.instruction_column for this source.")
    input_column: Optional[str] = Field(None, description="data.input_column for this source.")
    output_column: Optional[str] = Field(None, description="data.output_column for this source.")
    columns: Optional[list[str]] = Field(None, min_length=1, description="data.columns for this source.")
    delimiter: Optional[str] = Field(None, min_length=1, description="data.delimiter for this source.")

    def overrides(self) -> dict:
        """The data keys this source sets itself (`source` becomes data.train)."""
        return {k: v for k, v in self.model_dump(exclude={"source", "weight"}).items() if v is not None}


class DataSpec(Section):
    train: Union[Annotated[list[TrainSource], Field(min_length=1)], str] = Field(
        description="Training data: a hub dataset name, a local .json/.jsonl/.csv/.tsv/.parquet/.txt file, or a "
        "mixture: a list of {source, weight, ...} entries, each with its own data keys (format, columns...) where they "
        "differ. The mixture holds as many examples as its sources together (at most data.max_train_examples); "
        "source i supplies weight_i / sum(weights) of them, drawn by a seeded shuffle (train.seed), without "
        "repetition while its examples last and repeated when upsampled. A mixture needs data.eval (or none) for "
        "evaluation.",
    )
    config: Optional[str] = Field(None, description="Hub dataset configuration (e.g. 'sst2' for 'glue').")
    split: str = Field("train", description="Split of the training source to train on.")
    eval: Optional[str] = Field(
        None, description="Separate evaluation file or hub dataset (defaults to the training source).",
    )
    eval_split: Optional[str] = Field(None, description="Named split to evaluate on (e.g. 'validation').")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Hold out this fraction of the training data for evaluation when no eval split or file is given."
    )
    format: Literal["alpaca", "chat", "completion", "classification"] = Field(
        "alpaca", description="How rows become examples: alpaca (instruction/input/output), chat (messages with the "
        "tokenizer's chat template), completion (plain text, or prompt + completion), classification "
        "(text [+ pair] + label)."
    )
    text_column: str = Field("text", description="Text column (completion, classification).")
    text_pair_column: Optional[str] = Field(None, description="Second text column for sentence-pair classification.")
    label_column: str = Field("label", description="Label column for classification (numbers or strings).")
    prompt_column: Optional[str] = Field(
        None,
        description="For completion data: a prompt column masked out of the loss; the completion is `text_column`."
    )
    messages_column: str = Field(
        "messages", description="Column of chat conversations: [{role, content}, ...] messages, or ShareGPT "
        "[{from, value}, ...] turns (from: human, gpt, system; user and assistant also work). Left at 'messages', "
        "data without that column but with a 'conversations' column (ShareGPT's) is read from 'conversations'."
    )
    instruction_column: str = Field("instruction", description="Alpaca instruction column.")
    input_column: str = Field("input", description="Alpaca input column (may be empty).")
    output_column: str = Field("output", description="Alpaca output column.")
    columns: Optional[list[str]] = Field(
        None, min_length=1, description="Names of the columns of a header-less .csv/.tsv file (e.g. GLUE CoLA: "
        "[source, label, orig, sentence]): its first line is then data, not a header. Applies to data.train and "
        "data.eval; any other kind of source refuses it."
    )
    delimiter: Optional[str] = Field(
        None, min_length=1, description="Field separator of a header-less delimited .txt file: each non-blank line is "
        "one row, split on this exact string (no quoting; each field stripped of surrounding spaces) into the "
        "columns data.columns names, e.g. '||' for the "
        "E2E NLG files (`MR||reference`). Only .txt sources take it, and they need it."
    )
    prompt_template: Optional[str] = Field(
        None, description="For completion data with data.prompt_column: the prompt the model sees, '{prompt}' standing "
        "for the prompt column's text, e.g. '{prompt}\\nText: '. Training, evaluation and `deltafit generate --data` "
        "render prompts through it alike."
    )
    max_length: int = Field(
        512, ge=8, description="Examples are truncated to this many tokens (the count of truncated ones is reported); "
        "packed rows hold at most this many."
    )
    packing: Optional[bool] = Field(
        None, description="Pack several causal-LM training examples into each row of up to max_length tokens, each "
        "attending only to itself (positions restart per example). Default (null): on for causal-LM data when it "
        "saves at least 10% of batch positions and the delta method supports it; off for classification (true is "
        "refused there). Evaluation data is never packed."
    )
    cache: bool = Field(
        True, description="Reuse the tokenized data from <DELTAFIT_CACHE or ~/.cache/deltafit>/data, keyed on the data "
        "files' bytes, the tokenizer and its chat template and every data option; false re-tokenizes every run."
    )
    train_on_inputs: bool = Field(
        False,
        description="Also train on prompt tokens (instruction, user turns). By default only responses count in the "
        "loss."
    )
    max_train_examples: Optional[int] = Field(
        None, ge=1, description="Use only the first N training rows (after shuffling with the seed).",
    )
    max_eval_examples: Optional[int] = Field(None, ge=1, description="Use only the first N evaluation rows.")

    @field_validator("prompt_template")
    @classmethod
    def _has_prompt(cls, template: Optional[str]) -> Optional[str]:
        if template is not None and "{prompt}" not in template:
            raise ValueError("must contain '{prompt}', where the prompt column's text goes")
        return template

    @field_validator("columns")
    @classmethod
    def _column_names(cls, names: Optional[list[str]]) -> Optional[list[str]]:
        # Each name becomes a column the other data keys refer to: an empty or repeated one could not be.
        if names is not None and any(not name.strip() for name in names):
            raise ValueError("every column needs a name (an empty or blank one was given)")
        if names is not None and len(set(names)) != len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"column names must be unique ({', '.join(repeated)} repeated)")
        return names


# The metrics periodic evaluation logs, as metrics.jsonl names them (evaluate_loop's keys with an 'eval_'
# prefix), per task, each with the direction that is better. tests/test_early_stopping.py checks them
# against what evaluation returns.
EVAL_METRICS = {"causal-lm": {"eval_loss": "min", "eval_perplexity": "min"},
                "seq-cls": {"eval_accuracy": "max", "eval_f1": "max", "eval_matthews_correlation": "max"}}
EvalMetric = Literal[tuple(name for metrics in EVAL_METRICS.values() for name in metrics)]


class EarlyStopping(Section):
    """train.early_stopping: end training once the evaluated metric stops improving."""

    metric: Optional[EvalMetric] = Field(
        None, description="Evaluation metric to watch, as metrics.jsonl names it: eval_loss or eval_perplexity "
        "(causal-lm); eval_accuracy, eval_f1 or eval_matthews_correlation (seq-cls). Default: the task's first.")
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="Which way is better, 'min' or 'max'. Optional: each metric's direction is known (min: "
        "loss, perplexity; max: the others), and a mode that contradicts it is refused.")
    patience: int = Field(3, ge=1, description="Stop after this many evaluations in a row without improvement.")
    min_delta: float = Field(
        0.0, ge=0, description="An evaluation improves only by beating the best so far by more than this.")


class TrainSpec(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay; never applied to biases, norms or embeddings-like vectors.",
    )
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup as a fraction of total steps.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup.",
    )
    max_grad_norm: Optional[float] = Field(
        1.0, gt=0, description="Clip the gradient norm to this value (null: no clipping).",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for initialization, data order and dropout "
                      "(0 to 2**32 - 1, the range every random generator involved accepts).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision of the forward/backward pass (master weights and optimizer stay "
        "fp32). auto: bf16 where the hardware runs it natively (a CUDA GPU with bf16; a CPU with AMX or AVX-512 "
        "BF16), else fp32; the first log line says which and why. no: fp32. fp16: with loss scaling (GPUs).",
    )
    eval_every: Optional[int] = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    early_stopping: Optional[EarlyStopping] = Field(
        None, description="Stop training when periodic evaluation (train.eval_every) stops improving: {metric, mode, "
        "patience, min_delta}, e.g. {metric: eval_loss, patience: 3}; the final checkpoint is written as usual. "
        "Null: off.")
    keep_best: bool = Field(
        False, description="The final checkpoint holds the best evaluated delta (train.best_metric), not the last; "
        "its deltafit.json says which step and value. Needs train.eval_every.")
    best_metric: Optional[EvalMetric] = Field(
        None, description="Metric keep_best chooses by (its direction is known). Default: train.early_stopping's "
        "metric when set, else the task's first (eval_loss, eval_accuracy).")
    save_every: Optional[int] = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept on disk.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    fsdp: bool = Field(
        False, description="Shard the base model and the delta across processes with PyTorch FSDP2 (fully_shard per "
        "transformer block, then the root); on one process it is ignored.")
    compile: bool = Field(
        False, description="torch.compile each transformer block (one compilation serves them all). The first step "
        "pays for it (about 100 s for SmolLM2-135M on 2 CPU cores) and a CPU needs a C++ compiler. Measured on a "
        "2-core AVX2 CPU in fp32, where matmuls are 70% of a step: 0-5% faster after that; it fuses the elementwise "
        "work around the matmuls, so it pays more where that work is a larger share (bf16, GPUs) and on long runs.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss or gradient: 'stop' the run with a message naming the step (the last "
        "checkpoint stays intact), or 'skip' that optimizer step and go on (each skip is logged).")

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        # The generic unknown-key message cannot list the keys of an optional sub-section: say them here.
        keys = EarlyStopping.model_fields
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"must be a mapping of {', '.join(keys)} (e.g. {{patience: 3}}), or null for off")
        unknown = [key for key in raw or {} if key not in keys]
        if unknown:
            hint = did_you_mean(unknown[0], keys)
            raise ValueError(f"unknown key '{unknown[0]}'{hint}; valid keys: {', '.join(keys)}")
        return raw

    @field_validator("early_stopping", "keep_best")
    @classmethod
    def _needs_evaluation(cls, value: Any, info) -> Any:
        # Both choose among periodic evaluations (the final one alone leaves nothing to choose from).
        if value and not info.data.get("eval_every"):
            raise ValueError("needs periodic evaluation: set train.eval_every (evaluate every N steps)")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_as_boolean(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `no` (or `false`, `off`) as the boolean False: that means "no".
        # True has no such reading (which precision would it be?), so it is refused, not guessed.
        if value is False:
            return "no"
        if value is True:
            raise ValueError("true is not a precision; use 'auto', 'no', 'bf16' or 'fp16'")
        return value


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

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: Optional[str]) -> Optional[str]:
        # The name becomes a path component (runs/<name>, tracker log dirs): it must not climb out.
        if name is not None and (not name.strip() or any(c in name for c in "/\\") or name in (".", "..")):
            raise ValueError("must be a plain run name without '/' or '\\' (use output_dir to choose a directory)")
        if name is not None and not name.isprintable():
            raise ValueError("must be printable text (no control characters such as NUL or newlines)")
        return name

    @field_validator("output_dir")
    @classmethod
    def _printable_path(cls, path: Optional[str]) -> Optional[str]:
        if path is not None and (not path.strip() or not path.isprintable()):
            raise ValueError("must be a directory path of printable text (no control characters such as NUL)")
        return path

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name or 'run'}")

    def to_dict(self) -> dict:
        out = self.model_dump(mode="json")
        # A composition is written back as the list the user wrote (compose.py), one method as its mapping.
        to_list = getattr(self.delta, "to_list", None)
        out["delta"] = to_list() if to_list else self.delta.model_dump(mode="json")
        return out


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides and validate everything."""
    path = Path(path)
    raw = read_recipe_file(path)
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path))


def read_recipe_file(path: Path) -> dict:
    """A recipe file's mapping, read as plain YAML data: tags naming Python objects are refused
    (SafeLoader never imports or calls anything) and so is a key given twice."""
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        raise UserError(f"recipe file '{path}' is a directory; give a .yaml file"
                        + (f" (it holds {', '.join(yamls)})" if yamls else ""))
    if not path.is_file():
        raise UserError(f"recipe file '{path}' does not exist (expected a .yaml file)")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise UserError(f"recipe '{path}' is {size / 2**20:.1f} MiB; a recipe is a short YAML file (at most "
                        f"{MAX_RECIPE_BYTES // 2**20} MiB): is it a data file? Data goes in data.train")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except _TooLarge as e:
        raise UserError(f"recipe '{path}' is refused: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe '{path}' is not valid YAML{_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"recipe '{path}' is not UTF-8 text (invalid byte at offset {e.start})") from None
    if raw is None:
        raise UserError(f"recipe '{path}' is empty (expected a mapping with sections model, data, delta, train, log)")
    if not isinstance(raw, dict):
        raise UserError(f"recipe '{path}' must be a mapping with sections model, data, delta, train, log "
                        f"(got a {type(raw).__name__})")
    return raw


# Bounds that keep a hostile recipe from hanging or exhausting memory before any check runs: the
# file's size, and the size of the document once every alias is expanded ("billion laughs": nine
# nested levels of nine aliases each make 387 million values out of a few hundred bytes).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"
EXTENSION_PREFIX = "x-"


class _TooLarge(yaml.YAMLError):
    """A document past MAX_RECIPE_NODES once its aliases are expanded."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (plain data only) that also refuses duplicate keys, which YAML forbids but
    PyYAML silently resolves to the last value: `lr` set twice would train with the second.
    Merge keys (`<<: *common`, YAML 1.1) work as usual: a key written next to them overrides the
    merged one, which is no duplicate. Documents that expand past MAX_RECIPE_NODES are refused."""

    def construct_document(self, node):
        expanded = _expanded_size(node, {})
        if expanded > MAX_RECIPE_NODES:
            raise _TooLarge(f"it expands to {expanded:,} values through its aliases (&anchor / *alias); at most "
                            f"{MAX_RECIPE_NODES:,} are accepted")
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!set [a]`: SafeLoader says "expected a mapping node"
            return super().construct_mapping(node, deep=deep)
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue  # `<<`: SafeLoader merges the aliased mapping in (flatten_mapping)
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # complex keys: left to SafeLoader
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first at line {first_line[key]}); keep one",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` stands for with every alias expanded; each node is counted once
    (memoized by identity), so this takes time linear in the document as written."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias (a node inside itself) counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def _yaml_problem(error: yaml.YAMLError) -> str:
    """' at line L, column C: what is wrong (and where the unclosed construct started)', one line."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = str(getattr(error, "problem", None) or error)
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start and (mark is None or start.line != mark.line):
        problem += f" ({context} that starts at line {start.line + 1})"
    if "tag:yaml.org,2002:python/" in problem:
        problem += "; Python tags are refused, recipes are plain YAML data"
    return f"{at}: " + " ".join(problem.split())


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (the delta section against its method's own config)."""
    # Top-level keys starting with 'x-' hold YAML anchors for `<<: *name` merges (as in Compose files).
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))}
    delta_raw = raw.pop("delta", None)
    delta_raw = {"method": "lora"} if delta_raw is None else delta_raw
    if not isinstance(delta_raw, (dict, list)):
        raise UserError(f"{source}: recipe key 'delta' must be a mapping with at least 'method' (got {delta_raw!r}), "
                        f"e.g. delta: {{method: lora}}, or a list of such mappings to combine methods; leave it out "
                        f"for LoRA's defaults")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {_explain(e, Recipe)}") from None
    recipe.delta = validate_delta(delta_raw, source)
    _check_task_and_format(recipe, source)
    return recipe


def _check_task_and_format(recipe: Recipe, source: str) -> None:
    """model.task and data.format must agree; checked here so `validate` catches it too."""
    from deltafit.data.splits import check_task

    try:
        check_task(recipe.data, recipe.model.task)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if recipe.model.pooling and recipe.model.task != "seq-cls":
        raise UserError(f"{source}: recipe key 'model.pooling': pooling picks what a sequence classifier reads "
                        f"(model.task seq-cls); model.task is '{recipe.model.task}', so remove model.pooling")


def validate_delta(delta_raw, source: str = "recipe"):
    """The delta section as a method's config: a mapping is one method; a list is several on one base
    (a composition, deltafit/deltas/compose.py), and a list of one is that method alone."""
    if isinstance(delta_raw, list):
        try:
            parts = validate_delta_list(delta_raw)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        return parts[0] if len(parts) == 1 else _composition(parts)
    if isinstance(delta_raw, dict) and delta_raw.get("method") == "compose":  # as a checkpoint records it
        try:
            return _composition(validate_delta_list(delta_raw.get("deltas")))
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    return _one_delta(delta_raw, source, "delta")


def validate_delta_list(sections) -> list:
    """Each entry of `delta:` against its own method's config; names (default: the method) unique."""
    if not isinstance(sections, list) or not sections:
        raise UserError("recipe key 'delta' must be a method's mapping or a non-empty list of them")
    parts, names = [], {}
    for i, section in enumerate(sections):
        if not isinstance(section, dict):
            raise UserError(f"recipe key 'delta.{i}' must be a mapping with at least 'method' (got {section!r}), "
                            f"e.g. {{method: bitfit}}")
        label = section.get("name") or section.get("method", "lora")
        part = _one_delta(section, f"delta '{label}'" if isinstance(label, str) else "delta", f"delta.{i}")
        name = part.name or part.method
        if name in names:
            raise UserError(f"recipe key 'delta.{i}.name': deltas {names[name]} and {i} are both named '{name}'; "
                            f"give each a distinct name (e.g. name: {name}-2)")
        if name == "head" or name.isdigit():
            raise UserError(f"recipe key 'delta.{i}.name': '{name}' is reserved (the task head's tensors and list "
                            f"indexes use it); choose another name")
        names[name] = i
        parts.append(part)
    return parts


def _composition(parts: list):
    from deltafit.deltas.compose import ComposeConfig

    return ComposeConfig.model_construct(method="compose", deltas=parts, name=None, lr=None, weight_decay=None)


def _one_delta(delta_raw: dict, source: str, prefix: str):
    from deltafit.deltas import METHODS, config_class

    method = delta_raw.get("method", "lora")
    if not isinstance(method, str) or method == "compose":
        raise UserError(f"{source}: recipe key '{prefix}.method' must be one method name (got {method!r}); "
                        f"valid: {', '.join(METHODS)}")
    try:
        config_cls = config_class(method)
    except UserError as e:  # unknown method, with did-you-mean
        raise UserError(f"{source}: {str(e).replace('delta.method', prefix + '.method')}") from None
    try:
        return config_cls.model_validate(delta_raw)
    except ValidationError as e:
        raise UserError(f"{source}: {_explain(e, config_cls, prefix=prefix)}") from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set a.b.c=value`; the value is parsed as YAML so numbers and lists keep their type."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{item}' must look like section.key=value (e.g. train.lr=1e-4)")
    if _starts_comment(value):
        raise UserError(f"--set '{item}': in YAML, '#' after a space starts a comment, so the value would be read as "
                        f"{yaml.safe_load(value)!r}; quote it: --set '{key}=\"{value}\"'")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # an entry of a list of sections: data.train.1.weight
            node = node[_list_index(node, part, item)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)) or (isinstance(child, list) and not part.isdigit()
                                                   and not all(isinstance(c, dict) for c in child)):
            raise UserError(f"--set '{item}': '{part}' is a value, not a section")
        node = child
    if isinstance(node, list):
        node[_list_index(node, parts[-1], item)] = parsed
    elif not isinstance(node, dict):
        raise UserError(f"--set '{item}': '{parts[-2]}' is a value, not a section")
    else:
        node[parts[-1]] = parsed


def _list_index(node: list, part: str, item: str) -> int:
    """An entry of a list of sections by index (data.train.1) or, for deltas, by name (delta.lora.r;
    a delta's name defaults to its method)."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    names = [_entry_name(entry) for entry in node]
    if part in names:
        return names.index(part)
    by_name = f" or a name: {', '.join(n for n in names if n)}" if any(names) else ""
    raise UserError(f"--set '{item}': '{part}' is no entry of a list of {len(node)} "
                    f"(use 0 to {len(node) - 1}{by_name})")


def _entry_name(entry) -> Optional[str]:
    if not isinstance(entry, dict) or "method" not in entry and "name" not in entry:
        return None
    name = entry.get("name") or entry.get("method")
    return name if isinstance(name, str) else None


def _starts_comment(value: str) -> bool:
    """An unquoted YAML value loses everything from a '#' at its start or after whitespace."""
    text = value.strip()
    return not text.startswith(("'", '"')) and (text.startswith("#") or " #" in text or "\t#" in text)


def _explain(error: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line naming the first bad key, what was given and what would be valid."""
    err = error.errors()[0]
    loc = _key_path(err["loc"])
    key = ".".join(([prefix] if prefix else []) + loc)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        return f"unknown recipe key '{key}'{did_you_mean(loc[-1], fields)}; valid keys here: {', '.join(fields)}"
    if err["type"] == "missing":
        return f"recipe key '{key}' is required ({_description(root, loc)})"
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        fields = ", ".join(_fields_at(root, loc))
        return f"recipe key '{key}' must be a mapping of keys{shown}; valid keys here: {fields}"
    # A union (e.g. a name or a list of names) fails once per member: say what each would accept.
    others = [e["msg"] for e in error.errors()[1:] if _key_path(e["loc"]) == loc and e["msg"] != err["msg"]]
    return f"recipe key '{key}': {err['msg']}" + "".join(f", or {m[0].lower()}{m[1:]}" for m in others) + shown


def _key_path(loc) -> list[str]:
    """An error location as recipe keys: pydantic adds the tag of each union member ('str',
    'list[str]') after the field name, which is no key the user wrote."""
    return [str(p) for p in loc if isinstance(p, int) or not (p in _UNION_TAGS or "[" in p)]


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        if part.isdigit():  # an entry of a list of sections (data.train.1)
            continue
        field = model.model_fields.get(part)
        model = _section_in(getattr(field, "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _section_in(annotation) -> Optional[type[BaseModel]]:
    """The section class an annotation holds: itself, or inside a list / Optional / Union (data.train)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_in(arg)
        if found is not None:
            return found
    return None


def _description(model: type[BaseModel], loc: list[str]) -> str:
    loc = [part for part in loc if not part.isdigit()]
    for part in loc[:-1]:
        model = _section_in(model.model_fields[part].annotation) or model.model_fields[part].annotation
    field = model.model_fields.get(loc[-1]) if isinstance(model, type) else None
    section = getattr(field, "annotation", None)
    if isinstance(section, type) and issubclass(section, BaseModel):  # a whole section is missing
        required = [name for name, f in section.model_fields.items() if f.is_required()]
        return f"a section with at least: {', '.join(required)}"
    return (field.description or "no default") if field else "no default"


# ----------------------------------------------------------------------------------------------
# JSON Schema (`deltafit schema`)


def recipe_schema() -> dict:
    """The recipe's JSON Schema, for editors (the YAML language server) and other tools.

    `Recipe.delta` is `Any` here because the delta section is validated against its method's own
    config once the method is known (`validate_delta`). The schema instead states the union of every
    registered method's config, told apart by `method`. Those configs live beside their methods'
    torch code, so this imports torch (`deltafit --help` does not: the CLI imports this lazily)."""
    from deltafit.deltas import METHODS, config_class

    configs = tuple(config_class(name) for name in METHODS)
    delta = Annotated[Union[configs], Field(discriminator="method")]
    described = Recipe.model_fields["delta"].description
    model = create_model("Recipe", __base__=Recipe, delta=(delta, Field(default_factory=dict, description=described)))
    schema = model.model_json_schema()
    _one_section_or_a_list(schema, described)
    _method_may_be_omitted_only_for_the_default(schema)
    # Top-level 'x-' keys hold YAML anchors (recipe_from_dict drops them): allowed, with any value.
    schema["patternProperties"] = {f"^{EXTENSION_PREFIX}": {}}
    schema["description"] = ("A deltafit recipe: model, data, delta (one of the registered methods, told apart by "
                             "`method`; LoRA when left out; or a list of them, combined on one base), train and log.")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


DELTA_SECTION = "DeltaSection"  # the $defs entry: one method's section (the union over methods)


def _one_section_or_a_list(schema: dict, described: str) -> None:
    """`delta` is one method's section or a non-empty list of them (a composition)."""
    section = {k: v for k, v in schema["properties"]["delta"].items() if k not in ("description", "default")}
    schema["$defs"][DELTA_SECTION] = section
    ref = {"$ref": f"#/$defs/{DELTA_SECTION}"}
    schema["properties"]["delta"] = {"description": described,
                                     "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1}]}


def _method_may_be_omitted_only_for_the_default(schema: dict) -> None:
    """A delta section without `method` is the default method's (LoRA's); every other method's
    branch requires `method`, so such a section matches exactly one branch of the union."""
    default = DeltaSpec.model_fields["method"].default
    schema["properties"]["delta"]["default"] = {"method": default}
    delta = schema["$defs"][DELTA_SECTION]
    for method, ref in delta["discriminator"]["mapping"].items():
        branch = schema["$defs"][ref.rsplit("/", 1)[-1]]
        if method != default:
            branch["required"] = ["method", *[key for key in branch.get("required", []) if key != "method"]]


def field_docs(model: type[BaseModel]) -> list[tuple[str, str, str]]:
    """(name, default, description) rows, for help text and the README's recipe reference."""
    rows = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((name, default, field.description or ""))
    return rows
