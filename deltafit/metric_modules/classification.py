"""Accuracy, F1 and Matthews correlation as an `evaluate` metric that ships with deltafit.

`evaluate.load("accuracy")` fetches a script from the hub; this module loads by path, offline.
F1 is binary for two classes (positive class 1, as GLUE reports it) and macro-averaged otherwise.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy, F1 (binary for 2 classes, macro otherwise) and Matthews correlation."


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None):
        pred, ref = np.asarray(predictions), np.asarray(references)
        k = int(num_labels or max(pred.max(initial=0), ref.max(initial=0)) + 1)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (ref, pred), 1)
        return {"accuracy": float((pred == ref).mean()) if len(ref) else 0.0,
                "f1": _f1(confusion), "matthews_correlation": _mcc(confusion)}


def _f1(confusion):
    tp = np.diag(confusion).astype(float)
    precision_den, recall_den = confusion.sum(0), confusion.sum(1)
    denom = precision_den + recall_den
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[1]) if len(f1) == 2 else float(f1.mean())


def _mcc(confusion):
    # Multiclass Matthews correlation (Gorodkin 2004); equals the binary formula for k = 2.
    c = confusion.astype(float)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_tp = np.trace(c) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov_tp / denom) if denom > 0 else 0.0
