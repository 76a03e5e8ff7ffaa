"""Scoring: loss/perplexity for causal LMs; accuracy, F1 and Matthews correlation for classifiers.

`evaluate_checkpoint(path)` needs only a checkpoint path: the base model, task, method, labels
and data come from the checkpoint's own metadata and recipe.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from deltafit.data.sources import LOCAL_EXTENSIONS
from deltafit.errors import UserError
from deltafit.fsutil import beside_checkpoint


def evaluate_loop(model, delta, loader, task: str, accelerator=None) -> dict:
    """Score a model (with its delta attached, or a plain one with delta=None) on a loader."""
    prepare = delta.prepare_inputs if delta is not None else (lambda b: b)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = _score_lm(model, prepare, loader, accelerator) if task == "causal-lm" else \
            _score_cls(model, prepare, loader, accelerator)
    model.train(was_training)
    return result


def _score_lm(model, prepare, loader, accelerator) -> dict:
    from deltafit.loss import causal_lm_loss

    # Token-weighted mean: the model's loss is a per-batch mean over its label tokens.
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for batch in loader:
        n = (batch["labels"][:, 1:] != -100).sum()
        loss = causal_lm_loss(model, prepare(dict(batch)))  # chunked: never the full fp32 logits
        total += float(loss) * float(n)
        count += float(n)
    if accelerator is not None:
        total, count = (accelerator.reduce(x.to(accelerator.device), "sum").cpu() for x in (total, count))
    loss = float(total / count) if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def _score_cls(model, prepare, loader, accelerator) -> dict:
    predictions, references = [], []
    for batch in loader:
        logits = model(**prepare(dict(batch))).logits
        pred, ref = logits.argmax(-1), batch["labels"]
        if accelerator is not None:
            pred, ref = accelerator.gather_for_metrics((pred, ref))
        predictions += pred.tolist()
        references += ref.tolist()
    scores = classification_metric().compute(predictions=predictions, references=references,
                                             num_labels=model.config.num_labels)
    return {**scores, "examples": len(references)}


@lru_cache(maxsize=1)
def classification_metric():
    """The `evaluate` metric module shipped in deltafit (loads offline, by path).

    `evaluate` copies the module into its modules cache (under HF_HOME) before importing it; where
    that cannot be written (a read-only or missing HOME) a temporary folder serves, so scoring never
    fails on a cache. Scores are kept in memory: no cache files either."""
    import tempfile

    import evaluate
    import evaluate.config

    import deltafit.metric_modules as modules

    for name in ("HF_MODULES_CACHE", "HF_METRICS_CACHE"):
        if not _can_create(Path(getattr(evaluate.config, name))):
            setattr(evaluate.config, name, Path(tempfile.mkdtemp(prefix=f"deltafit-{name.lower()}-")))
    return evaluate.load(str(Path(modules.__path__[0]) / "classification.py"), keep_in_memory=True,
                         cache_dir=str(evaluate.config.HF_METRICS_CACHE))


def _can_create(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------


def evaluate_checkpoint(path: str, data: Optional[str] = None, split: Optional[str] = None, base: bool = False,
                        batch_size: Optional[int] = None, output: Optional[str] = None,
                        base_model: Optional[str] = None) -> tuple[dict, Path]:
    """Score a checkpoint (or, with base=True, its untouched base model) on held-out data."""
    from torch.utils.data import DataLoader

    from deltafit.data import make_collator, prepare_data
    from deltafit.loading import about_checkpoint, attach_from_checkpoint, load_source, source_recipe
    from deltafit.model import build_model, load_tokenizer

    directory, meta, tensors = load_source(path, base_model)
    out = beside_checkpoint(directory, output, "eval", ".json", base)
    recipe = source_recipe(directory, meta)
    spec = _eval_data_spec(recipe.data, data, split)
    with about_checkpoint(directory):
        tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(spec, tokenizer, meta["task"], recipe.train.seed,
                            label_names=meta.get("label_names"), want_train=False)
    if not prepared.eval:
        raise UserError(f"no evaluation examples in '{spec.eval or spec.train}'")
    with about_checkpoint(directory):
        model, tokenizer, _ = build_model(recipe.model, label_names=meta.get("label_names"), tokenizer=tokenizer)
        delta = None if base else attach_from_checkpoint(model, meta, tensors)
    loader = DataLoader(prepared.eval, batch_size=batch_size or recipe.train.batch_size,
                        collate_fn=make_collator(tokenizer.pad_token_id, meta["task"]))
    results = {"checkpoint": str(directory), "model": "base" if base else meta["method"],
               "data": spec.eval or spec.train, "split": spec.eval_split,
               **evaluate_loop(model, delta, loader, meta["task"])}
    out.write_text(json.dumps(results, indent=2))
    return results, out


def _eval_data_spec(data_spec, data: Optional[str], split: Optional[str]):
    """The recipe's data section, pointed at --data/--split when given."""
    updates = {}
    if data:
        updates.update(eval=data, eval_split=split, eval_fraction=0.0)
    elif split:
        updates.update(eval_split=split, eval_fraction=0.0)
    spec = data_spec.model_copy(update=updates)
    scored = data or spec.eval or spec.train
    if split and Path(scored).suffix.lower() in LOCAL_EXTENSIONS:
        raise UserError(f"--split '{split}': '{scored}' is a single file with no named splits; leave --split out "
                        f"(or pass --data another file)")
    if not (spec.eval or spec.eval_split or spec.eval_fraction):
        raise UserError("the checkpoint's recipe names no evaluation data: pass --data FILE_OR_DATASET [--split NAME]")
    return spec
