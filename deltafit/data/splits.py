"""Splits: which rows train and which evaluate (eval file, named split, held-out fraction, caps),
and the checks that the columns a format reads exist and that data.format suits model.task."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from deltafit.data.formats import CAUSAL_FORMATS, messages_column
from deltafit.data.mixture import check_mixture, is_mixture, source_specs
from deltafit.data.sources import LOCAL_EXTENSIONS, load_rows
from deltafit.errors import UserError, did_you_mean


@dataclass
class _Splits:
    train: object  # ArrowRows, datasets.Dataset or None
    eval: object
    eval_source: str
    eval_key: str = "data.eval"
    # A mixture (data.train as a list): (recipe key, that source's data section, rows, weight) per
    # source, encoded one by one and mixed by `prepare`; `train` is then None.
    parts: Optional[list[tuple[str, object, object, float]]] = None


def _load_splits(spec, seed: int, want_train: bool) -> _Splits:
    _check_eval_options(spec)
    if is_mixture(spec):
        parts = [(key, s, _load_train(s, key), w) for key, s, w in source_specs(spec)] if want_train else None
        evaluation, source, key = _load_eval(spec)
        return _Splits(None, _cap_eval(evaluation, spec), source, key, parts)
    train = _load_train(spec, "data.train") if want_train or spec.eval_fraction else None
    evaluation, source, key = _load_eval(spec)
    train, held_out = _select_train(train, spec, seed)
    if held_out is not None:
        source = f"{spec.eval_fraction:g} of data.train held out (seeded shuffle)"
        evaluation, key = held_out, "data.train"
    return _Splits(train if want_train else None, _cap_eval(evaluation, spec), source, key)


def _load_train(spec, key: str):
    rows = load_rows(spec.train, spec.config, spec.split, key=key, columns=spec.columns, delimiter=spec.delimiter)
    _check_columns(rows, spec, key, spec.train)
    return rows


def _cap_eval(evaluation, spec):
    if evaluation is not None and spec.max_eval_examples:
        evaluation = evaluation.select(range(min(spec.max_eval_examples, len(evaluation))))
    return evaluation


def _check_eval_options(spec) -> None:
    check_mixture(spec)
    if spec.eval_fraction and (spec.eval or spec.eval_split):
        raise UserError("recipe key 'data.eval_fraction': set either eval_fraction or data.eval / data.eval_split, "
                        "not both")
    single_file = not is_mixture(spec) and Path(spec.train).suffix.lower() in LOCAL_EXTENSIONS
    if spec.eval_split and not spec.eval and single_file:
        raise UserError(f"recipe key 'data.eval_split': '{spec.train}' is a single file with no named splits; "
                        f"put the evaluation rows in their own file and set data.eval")


def _load_eval(spec):
    """(rows, description, recipe key) of a named eval split or separate eval source, else (None, 'none', ...)."""
    if spec.eval:
        # data.eval names a whole dataset: its split is eval_split, else 'train' (a file's only split).
        split = spec.eval_split or "train"
        config = spec.config if spec.eval == spec.train else None
        rows = load_rows(spec.eval, config, split, key="data.eval", columns=spec.columns, delimiter=spec.delimiter)
        _check_columns(rows, spec, "data.eval", spec.eval)
        return rows, f"{spec.eval} (split {split})", "data.eval"
    if spec.eval_split:
        rows = load_rows(spec.train, spec.config, spec.eval_split, key="data.eval_split", columns=spec.columns,
                         delimiter=spec.delimiter)
        _check_columns(rows, spec, "data.eval_split", f"{spec.train} split {spec.eval_split}")
        return rows, f"{spec.train} (split {spec.eval_split})", "data.eval_split"
    return None, "none", "data.eval"


def _select_train(train, spec, seed: int):
    """(training rows, held-out rows or None): one seeded shuffle serves both the hold-out and the cap."""
    if train is None or not (spec.eval_fraction or spec.max_train_examples):
        return train, None
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = None
    if spec.eval_fraction:
        k = max(1, round(len(train) * spec.eval_fraction))
        if k >= len(train):
            raise UserError(f"recipe key 'data.eval_fraction': holding out {k} of {len(train)} rows leaves none "
                            f"to train on")
        held_out, order = train.select(order[:k]), order[k:]
    return train.select(order[: spec.max_train_examples or len(order)]), held_out


def _required_columns(spec) -> list[tuple[str, str]]:
    """(recipe key, column) pairs the format reads."""
    needed = {
        "alpaca": ["instruction_column", "output_column"],
        "chat": ["messages_column"],
        "completion": ["text_column"] + (["prompt_column"] if spec.prompt_column else []),
        "classification": ["text_column", "label_column"] + (["text_pair_column"] if spec.text_pair_column else []),
    }[spec.format]
    # Alpaca data often has no input column at all; only a column the user named must exist.
    # Compared with the default rather than "was it set": a checkpoint's recipe.yaml writes every key,
    # so eval of a run trained on data without an input column would demand one.
    if spec.format == "alpaca" and spec.input_column != type(spec).model_fields["input_column"].default:
        needed.append("input_column")
    return [(f"data.{name}", getattr(spec, name)) for name in needed]


def _check_columns(ds, spec, key: str, source: str) -> None:
    available = list(ds.column_names)
    for recipe_key, column in _required_columns(spec):
        if recipe_key == "data.messages_column":
            column = messages_column(available, spec)  # the default also finds ShareGPT's 'conversations'
        if column not in available:
            raise UserError(f"recipe key '{recipe_key}': column '{column}' is not in {key} '{source}'"
                            f"{did_you_mean(column, available)}; available columns: {', '.join(available)}")


def check_task(spec, task: str) -> None:
    """data.format (of the data section and of every training source) must make the kind of examples
    model.task trains on, and data.prompt_template needs completion data with a prompt column;
    recipe validation calls this too."""
    check_mixture(spec)
    mixture = is_mixture(spec)
    # The data section's own format renders evaluation data, and every source that sets none.
    inherits = not mixture or bool(spec.eval) or any(entry.format is None for entry in spec.train)
    checks = [("data", spec)] * inherits + [(key, s) for key, s, _ in source_specs(spec) if mixture]
    for prefix, s in checks:
        _check_format(s, task, prefix)


def _check_format(spec, task: str, prefix: str) -> None:
    wants = "seq-cls" if spec.format == "classification" else "causal-lm"
    if task != wants:
        hint = "classification" if task == "seq-cls" else f"one of {', '.join(CAUSAL_FORMATS)}"
        raise UserError(f"recipe key '{prefix}.format': '{spec.format}' makes {wants} examples but model.task is "
                        f"'{task}' (use data.format {hint})")
    if spec.prompt_template and not (spec.format == "completion" and spec.prompt_column):
        raise UserError(f"recipe key '{prefix}.prompt_template': it shapes the prompt of completion data with a "
                        f"prompt column (data.format completion and data.prompt_column); format '{spec.format}' "
                        f"{'has no prompt column set' if spec.format == 'completion' else 'renders its own prompts'}")
