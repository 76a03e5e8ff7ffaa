"""Scoring: loss/perplexity for causal LMs; accuracy, F1 and Matthews correlation for classifiers;
with `--generate`, scores of a causal LM's greedy answers.

`evaluate_checkpoint(path)` needs only a checkpoint path: the base model, task, method, labels
and data come from the checkpoint's own metadata and recipe (a merged model records no data: --data).

Generation scores (`metric_modules/generation.py`, loaded offline like the classification one) sit
beside the loss under gen_* keys: gen_exact_match, gen_rougeL (ROUGE-L F, 0-1), gen_bleu (sacreBLEU,
0-100), gen_json_valid / gen_json_exact / gen_json_fields (shares, 0-1), and gen_examples, the
distinct prompts answered: rows sharing a prompt are answered once and scored against all their
references. The answers go to `<results>-predictions.jsonl` ({prompt, references, prediction}).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from deltafit.data.formats import CAUSAL_FORMATS
from deltafit.data.sources import LOCAL_EXTENSIONS
from deltafit.errors import UserError, did_you_mean
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
    scores = metric_module("classification").compute(predictions=predictions, references=references,
                                                     num_labels=model.config.num_labels)
    return {**scores, "examples": len(references)}


@lru_cache(maxsize=None)
def metric_module(name: str):
    """The `evaluate` metric module `deltafit/metric_modules/<name>.py` (loads offline, by path).

    `evaluate` copies the module into its modules cache (under HF_HOME) before importing it; where
    that cannot be written (a read-only or missing HOME) a temporary folder serves, so scoring never
    fails on a cache. Scores are kept in memory: no cache files either."""
    import tempfile

    import evaluate
    import evaluate.config

    import deltafit.metric_modules as modules

    for folder in ("HF_MODULES_CACHE", "HF_METRICS_CACHE"):
        if not _can_create(Path(getattr(evaluate.config, folder))):
            setattr(evaluate.config, folder, Path(tempfile.mkdtemp(prefix=f"deltafit-{folder.lower()}-")))
    return evaluate.load(str(Path(modules.__path__[0]) / f"{name}.py"), keep_in_memory=True,
                         cache_dir=str(evaluate.config.HF_METRICS_CACHE))


def _can_create(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """`deltafit eval --generate`: greedy answers to the eval prompts, scored against the references.
    `metrics` None picks the default: exact_match, rouge, bleu, and json when every reference is a
    JSON object or array. `max_examples` caps the rows answered (None: all of them)."""

    metrics: Optional[tuple[str, ...]] = None
    max_new_tokens: int = 128
    max_examples: Optional[int] = None

    def check(self) -> None:
        from deltafit.metric_modules import GENERATION_METRICS

        unknown = [m for m in self.metrics or () if m not in GENERATION_METRICS]
        if unknown or self.metrics == ():
            hint = did_you_mean(unknown[0], GENERATION_METRICS) if unknown else ""
            raise UserError(f"--metrics '{','.join(self.metrics or ())}'{hint}: give a comma list of "
                            f"{', '.join(GENERATION_METRICS)}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: give at least 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"--max-examples {self.max_examples}: give at least 1 (or leave it out for every row)")


def evaluate_checkpoint(path: str, data: Optional[str] = None, split: Optional[str] = None, base: bool = False,
                        batch_size: Optional[int] = None, output: Optional[str] = None,
                        base_model: Optional[str] = None, generation: Optional[GenerationRequest] = None,
                        data_format: Optional[str] = None, overrides: tuple = ()) -> tuple[dict, Path]:
    """Score a checkpoint, PEFT adapter or merged model (or, with base=True, the untouched base model)
    on held-out data; with `generation`, also score its greedy answers (predictions written beside
    the results, `<results>-predictions.jsonl`)."""
    from torch.utils.data import DataLoader

    from deltafit.data import make_collator, prepare_data
    from deltafit.loading import about_checkpoint, attach_from_checkpoint, load_source, source_recipe
    from deltafit.model import build_model, load_tokenizer

    if generation is not None:
        generation.check()
    directory, meta, tensors = load_source(path, base_model, merged=True)
    _check_source(directory, meta, data, base, generation)
    recipe = _with_data_overrides(_with_format(source_recipe(directory, meta), data_format), overrides, directory)
    spec = _eval_data_spec(recipe.data, data, split)
    out = beside_checkpoint(directory, output, "eval", ".json", base, inputs=(data, spec.train, spec.eval))
    with about_checkpoint(directory):
        tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(spec, tokenizer, meta["task"], recipe.train.seed,
                            label_names=meta.get("label_names"), want_train=False)
    if not prepared.eval:
        raise UserError(f"no evaluation examples in '{spec.eval or spec.train}'")
    # Rows, references and metric packages are checked before any weights load: a mistake costs nothing.
    plan = _generation_plan(generation, tokenizer, spec, recipe.train.seed) if generation else None
    with about_checkpoint(directory):
        model, tokenizer, _ = build_model(recipe.model, label_names=meta.get("label_names"), tokenizer=tokenizer)
        delta = None if base or tensors is None else attach_from_checkpoint(model, meta, tensors)
    _check_label_count(directory, meta, prepared.label_names, model)
    batch_size = batch_size or recipe.train.batch_size
    loader = DataLoader(prepared.eval, batch_size=batch_size, collate_fn=make_collator(tokenizer.pad_token_id,
                                                                                       meta["task"]))
    results = {"checkpoint": str(directory), "model": "base" if base else meta["method"],
               "data": spec.eval or spec.train, "split": spec.eval_split,
               **evaluate_loop(model, delta, loader, meta["task"])}
    if plan is not None:
        results.update(_generation_scores(plan, (model, tokenizer, delta), spec, batch_size, _predictions_path(out)))
    out.write_text(json.dumps(results, indent=2))
    return results, out


def _check_source(directory: Path, meta: dict, data: Optional[str], base: bool,
                  generation: Optional[GenerationRequest]) -> None:
    from deltafit.loading import MERGED

    if meta["method"] == MERGED and not data:
        raise UserError(f"'{directory}' is a merged model, which records no data: pass --data FILE_OR_DATASET "
                        f"(and --format alpaca|chat|completion unless it is raw text)")
    if meta["method"] == MERGED and base:
        raise UserError(f"--base: '{directory}' is a merged model, with no separate base to compare with")
    if generation is not None and meta["task"] != "causal-lm":
        raise UserError(f"--generate: '{directory}' is a {meta['task']} (classification) model; --generate needs a "
                        f"causal-lm one (leave --generate out for accuracy, F1 and MCC)")


def _check_label_count(directory: Path, meta: dict, data_labels, model) -> None:
    """A classifier that names no labels (a PEFT adapter made by PEFT, a merged model with
    LABEL_0...) gets its ids from the eval data's sorted labels; with fewer or more of them than the
    head has outputs, that mapping is surely wrong, so it is refused rather than silently scored."""
    if meta["task"] != "seq-cls" or meta.get("label_names") or not data_labels:
        return
    outputs = model.config.num_labels
    if len(data_labels) != outputs:
        raise UserError(f"'{directory}' does not name its labels and its classifier has {outputs} outputs, but the "
                        f"eval data has {len(data_labels)} distinct labels ({', '.join(map(str, data_labels))}): "
                        f"which id is which label is unknown. Evaluate on data with all {outputs} labels (sorted, "
                        f"they are taken as ids 0..{outputs - 1}), or use the deltafit checkpoint, which records them")


def _with_format(recipe, data_format: Optional[str]):
    """The recipe with --format as its data format (a merged model records none: completion)."""
    if data_format is None:
        return recipe
    if data_format not in CAUSAL_FORMATS + ("classification",):
        raise UserError(f"--format '{data_format}' is not one of {', '.join(CAUSAL_FORMATS + ('classification',))}")
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"format": data_format})})


def _with_data_overrides(recipe, overrides, directory: Path):
    """`--set data.KEY=VALUE`: the eval data's columns and options (a merged model or PEFT adapter
    records none, so a file whose text is not in a 'text' column needs them)."""
    if not overrides:
        return recipe
    from deltafit.recipe import apply_override, recipe_from_dict

    raw = recipe.to_dict()
    for item in overrides:
        if not item.strip().startswith("data."):
            raise UserError(f"--set '{item}': eval takes data.* keys only (e.g. data.text_column=sentence); the "
                            f"model and delta come from the checkpoint")
        apply_override(raw, item)
    return recipe_from_dict(raw, source=f"'{directory}' with --set")


def _predictions_path(results: Path) -> Path:
    """Beside the results JSON: `<checkpoint>-eval-predictions.jsonl` for `<checkpoint>-eval.json`."""
    return results.with_name(f"{results.stem}-predictions.jsonl")


def _eval_data_spec(data_spec, data: Optional[str], split: Optional[str]):
    """The recipe's data section, pointed at --data/--split when given."""
    updates = {}
    if data:
        updates.update(eval=data, eval_split=split, eval_fraction=0.0)
    elif split:
        updates.update(eval_split=split, eval_fraction=0.0)
    spec = data_spec.model_copy(update=updates)
    scored = data or spec.eval or spec.train
    if not isinstance(scored, str):  # a mixture of training sources: its splits are not one dataset's
        raise UserError("the checkpoint trained on a mixture of sources (data.train is a list) and names no data.eval: "
                        "pass --data FILE_OR_DATASET [--split NAME]")
    if split and Path(scored).suffix.lower() in LOCAL_EXTENSIONS:
        raise UserError(f"--split '{split}': '{scored}' is a single file with no named splits; leave --split out "
                        f"(or pass --data another file)")
    if not (spec.eval or spec.eval_split or spec.eval_fraction):
        raise UserError("the checkpoint's recipe names no evaluation data: pass --data FILE_OR_DATASET [--split NAME]")
    return spec


# ----------------------------------------------------------------------------------------------
# eval --generate


@dataclass
class _GenerationPlan:
    request: GenerationRequest
    prompts: list  # [(generate.Row, [references])], one per distinct prompt
    metrics: tuple[str, ...]


def _generation_plan(request: GenerationRequest, tokenizer, spec, seed: int) -> _GenerationPlan:
    """The eval rows the loss is computed on, as prompts rendered as training rendered them with their
    references; and the metrics that score them, with the packages those need."""
    from deltafit.data.splits import _load_splits
    from deltafit.generate import table_rows

    splits = _load_splits(spec, seed, want_train=False)
    rows = [row for row in table_rows(tokenizer, spec, splits.eval, splits.eval_key, splits.eval_source)
            if row.reference is not None]
    if not rows:
        hint = "; completion data needs data.prompt_column" if spec.format == "completion" else ""
        raise UserError(f"--generate: the eval rows have no reference answers to score against (data.format "
                        f"{spec.format}{hint})")
    prompts = group_by_prompt(rows)[: request.max_examples]  # None: all
    metrics = request.metrics or default_metrics([ref for _, refs in prompts for ref in refs])
    require_metric_packages(metrics)
    return _GenerationPlan(request, prompts, metrics)


def group_by_prompt(rows: list) -> list[tuple]:
    """[(first row, every reference)] per distinct prompt, in first-seen order. Data like E2E NLG lists
    an input once per reference: answering it once saves the repeats, and multi-reference BLEU and
    best-of ROUGE-L score the input once against all its references, as its papers report."""
    grouped: dict[str, tuple] = {}
    for row in rows:
        grouped.setdefault("".join(row.pieces), (row, []))[1].append(row.reference)
    return list(grouped.values())


def default_metrics(references: list[str]) -> tuple[str, ...]:
    """exact_match, rouge and bleu; and json when every reference is a JSON object or array."""
    def structured(text: str) -> bool:
        try:
            return isinstance(json.loads(text), (dict, list))
        except json.JSONDecodeError:
            return False

    return ("exact_match", "rouge", "bleu") + (("json",) if all(map(structured, references)) else ())


def require_metric_packages(metrics) -> None:
    """Each metric's package (the `deltafit[metrics]` extra) imports, else one line saying what to install."""
    import importlib

    from deltafit.metric_modules import METRIC_PACKAGES

    for name in metrics:
        package = METRIC_PACKAGES.get(name)
        try:
            if package is not None:
                importlib.import_module(package)
        except ImportError:
            raise UserError(f"--metrics {name} needs the '{package}' package: pip install 'deltafit[metrics]' "
                            f"(exact_match and json need nothing more)") from None


def _generation_scores(plan: _GenerationPlan, built: tuple, spec, batch_size: int, out: Path) -> dict:
    """Greedy answers to the plan's prompts, written to `out` ({prompt, references, prediction} lines),
    and their scores under gen_* keys."""
    from deltafit.generate import Settings, predict, ready_generator, write_jsonl

    model, tokenizer, delta = built
    gen = ready_generator(model, tokenizer, delta, spec, Settings(max_new_tokens=plan.request.max_new_tokens))
    answers = predict(gen, [row for row, _ in plan.prompts], batch_size)
    records = [{"prompt": "".join(row.pieces), "references": refs, "prediction": prediction}
               for (row, prediction), (_, refs) in zip(answers, plan.prompts)]
    write_jsonl(out, records)
    scores = metric_module("generation").compute(predictions=[r["prediction"] for r in records],
                                                 references=[r["references"] for r in records],
                                                 metrics=list(plan.metrics))
    return {**{f"gen_{key}": value for key, value in scores.items()}, "gen_examples": len(records),
            "predictions": str(out)}
