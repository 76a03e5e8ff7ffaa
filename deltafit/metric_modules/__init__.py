"""`evaluate` metric modules that ship with deltafit, loaded by path (offline) by `deltafit.evaluate.metric_module`.

The generation metrics' names live here, importable without `evaluate`, so the CLI checks `--metrics`
before anything heavy loads.
"""

GENERATION_METRICS = ("exact_match", "rouge", "bleu", "json")
# The package each metric computes with (the `deltafit[metrics]` extra); absent: nothing beyond deltafit.
METRIC_PACKAGES = {"rouge": "rouge_score", "bleu": "sacrebleu"}
