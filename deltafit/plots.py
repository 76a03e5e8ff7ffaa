"""PNG charts of runs (`deltafit report`) and comparisons (`deltafit compare`), drawn with matplotlib.

matplotlib is the optional `plots` extra (pip install 'deltafit[plots]'): it is imported here
only, lazily, with the non-interactive Agg backend (no display needed), and its absence is a
one-line user error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from deltafit.errors import UserError

MISSING = "{what} needs matplotlib: pip install 'deltafit[plots]'"


def require(what: str = "drawing charts"):
    """matplotlib.pyplot with the Agg backend, or a UserError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(MISSING.format(what=what)) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    require().close(fig)
    return path


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def run_charts(records: list[dict], output: Path, title: str = "") -> list[Path]:
    """loss.png, lr.png, eval.png (when the run evaluated) and tokens_per_s.png of one run's records."""
    plt = require("deltafit report")
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for key, name, label in (("loss", "loss.png", "train loss"), ("lr", "lr.png", "learning rate"),
                             ("tokens_per_s", "tokens_per_s.png", "tokens / s")):
        steps, values = _series(records, key)
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set(xlabel="step", ylabel=label, title=f"{title} {label}".strip())
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        written.append(_save(fig, output / name))
    eval_keys = sorted({k for r in records for k, v in r.items() if k.startswith("eval_") and _finite(v)
                        and k not in ("eval_examples", "eval_tokens")})
    if eval_keys:
        fig, axes = plt.subplots(len(eval_keys), 1, figsize=(7, 2.6 * len(eval_keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], eval_keys):
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="o")
            ax.set(xlabel="step", ylabel=key[len("eval_"):])
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"{title} evaluation".strip())
        written.append(_save(fig, output / "eval.png"))
    return written


def compare_plots(result: dict, output: Path) -> list[str]:
    """metric_vs_trainable.png (eval metric against trainable parameters, log x) and loss_curves.png."""
    from deltafit.compare import read_metrics

    plt = require("deltafit compare")
    done = [r for r in result["runs"] if r.get("status") == "done"]
    written = []
    metric = result.get("metric")
    points = [(r["method"], r["trainable"], _metric_of(r, metric)) for r in done]
    points = [p for p in points if _finite(p[1]) and p[1] > 0 and _finite(p[2])]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, trainable, value in points:
            ax.scatter(trainable, value, s=40)
            ax.annotate(method, (trainable, value), textcoords="offset points", xytext=(5, 4), fontsize=9)
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
        ax.set(xlabel="trainable parameters (log scale)", ylabel=_metric_label(metric),
               title=f"{_metric_label(metric)} vs trainable parameters")
        ax.grid(alpha=0.3, which="both")
        written.append(str(_save(fig, output / "metric_vs_trainable.png")))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for row in done:
        steps, values = _series(read_metrics(Path(row["output"]) / "metrics.jsonl"), "loss")
        if steps:
            ax.plot(steps, values, label=row["method"])
            drawn += 1
    if drawn:
        ax.set(xlabel="step", ylabel="train loss", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        written.append(str(_save(fig, output / "loss_curves.png")))
    else:
        plt.close(fig)
    return written


def _metric_of(row: dict, metric: Optional[str]):
    if metric:
        return row.get("eval", {}).get(metric)
    return row.get("final_train_loss")


def _metric_label(metric: Optional[str]) -> str:
    return f"eval {metric}" if metric else "final train loss"
