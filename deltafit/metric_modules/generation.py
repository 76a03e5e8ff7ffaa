"""Generation scores as an `evaluate` metric that ships with deltafit (loads by path, offline).

Each prediction comes with one or more references (E2E NLG gives several per input):
- exact_match: share of predictions equal to one of their references, whitespace stripped at both ends;
- rouge: ROUGE-L F-measure (`rouge_score`, stemmed), the best over a prediction's references, averaged;
- bleu: corpus BLEU on sacreBLEU's 0-100 scale (`sacrebleu.corpus_bleu`), every reference counted;
- json: json_valid (share of predictions that parse as JSON), json_exact (parsed prediction equals a
  parsed reference), json_fields (share of a reference object's top-level fields the prediction gives
  the same value, best reference, averaged; a non-object reference counts as one field).

`rouge_score` and `sacrebleu` (the `deltafit[metrics]` extra) are imported inside `_compute` only:
`evaluate` checks a module's top-level imports when loading it, and exact_match / json need neither.
"""

import json

import datasets
import evaluate

from deltafit.metric_modules import GENERATION_METRICS as METRICS

_DESCRIPTION = "Exact match, ROUGE-L, corpus BLEU (sacreBLEU) and JSON validity / record and field matches."


class Generation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions: strings; references: a list of reference strings per prediction",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, metrics=METRICS):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
        scores = {}
        for name in metrics:
            scores.update(_SCORERS[name](list(predictions), [list(r) for r in references]))
        return scores


def _exact_match(predictions, references) -> dict:
    hits = [p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references)]
    return {"exact_match": _mean(hits)}


def _rouge(predictions, references) -> dict:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max((scorer.score(r, p)["rougeL"].fmeasure for r in refs), default=0.0)
            for p, refs in zip(predictions, references)]
    return {"rougeL": _mean(best)}


def _bleu(predictions, references) -> dict:
    import sacrebleu

    # sacreBLEU wants one stream per reference position; predictions with fewer references than the
    # most any has are padded with None, which corpus_bleu skips for that sentence.
    width = max((len(refs) for refs in references), default=0)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return {"bleu": float(sacrebleu.corpus_bleu(predictions, streams).score) if width else 0.0}


def _json(predictions, references) -> dict:
    parsed = [_parse(p) for p in predictions]
    valid = [value is not _INVALID for value in parsed]
    expected = [[_parse(r) for r in refs] for refs in references]
    exact = [ok and any(value == ref for ref in refs) for ok, value, refs in zip(valid, parsed, expected)]
    fields = [max((_field_share(value, ref) for ref in refs if ref is not _INVALID), default=0.0) if ok else 0.0
              for ok, value, refs in zip(valid, parsed, expected)]
    return {"json_valid": _mean(valid), "json_exact": _mean(exact), "json_fields": _mean(fields)}


_INVALID = object()  # what `_parse` returns for text that is not JSON (None is JSON's null)


def _parse(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return _INVALID


def _field_share(value, reference) -> float:
    if not isinstance(reference, dict):
        return float(value == reference)
    if not reference:
        return float(value == reference)
    given = value if isinstance(value, dict) else {}
    return sum(key in given and given[key] == wanted for key, wanted in reference.items()) / len(reference)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


_SCORERS = {"exact_match": _exact_match, "rouge": _rouge, "bleu": _bleu, "json": _json}
