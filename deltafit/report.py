"""Rich tables printed by the CLI (kept apart from the logic that computes what they show)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)


def print_results(results: dict, path: Path) -> None:
    table = Table(title=f"{results['model']} on {results['data']}"
                  + (f" [{results['split']}]" if results.get("split") else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if key in ("checkpoint", "model", "data", "split", "predictions"):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"written to {path}")
    if results.get("predictions"):  # eval --generate
        console.print(f"predictions written to {results['predictions']}")


def print_merge(result: dict) -> None:
    console.print(f"merged [bold]{result['method']}[/] into the base weights; merged vs unmerged logits on "
                  f"{result['inputs']} inputs: max abs diff {result['max_abs_logit_diff']:.3g}")
    console.print(f"saved a plain transformers model ({result['dtype']}) to {result['output']}")
    if result.get("note"):
        console.print(result["note"], style="yellow", markup=False)  # markup=False: "[CLS]" is not a tag


def print_plan(plan: dict) -> None:
    table = Table(title="plan", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("model", f"{plan['model']} ({plan['architecture']})"), ("task", plan["task"]),
        ("method", f"{plan['method']} ({'mergeable' if plan['mergeable'] else 'not mergeable'})"),
        *_delta_rows(plan),
        ("delta params", f"{plan['delta_params']:,}" + (" (total)" if plan.get("deltas") else "")),
        ("trainable", f"{plan['trainable']:,} / {plan['total']:,} "
                      f"({100 * plan['trainable'] / max(plan['total'], 1):.4f}%)"),
        ("data", (f"mixture of {len(plan['data']['mixture'])} sources" if plan["data"].get("mixture")
                  else plan["data_format"]) + ": "
                 + ", ".join(f"{k}={v}" for k, v in plan["data"].items()
                             if v is not None and k not in ("columns", "mixture"))),
        *[(f"  {source['key']}", f"{source['source']} ({source['format']}): {source['rows']:,} rows, weight "
                                 f"{source['weight']:g}, share {source['share']:.1%} = {source['drawn']:,} rows"
                                 + (" (upsampled)" if source["drawn"] > source["rows"] else ""))
          for source in plan["data"].get("mixture") or []],
        ("length", f"{plan['steps']} steps" if plan["steps"] else f"{plan['epochs']} epochs"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    console.print("[green]recipe is valid[/]")


def _delta_rows(plan: dict) -> list[tuple[str, str]]:
    """'delta on' for one method; for a composition one row per delta: method, count and modules."""
    if not plan.get("deltas"):
        return [("delta on", _modules(plan["targets"]))]
    return [(f"delta '{d['name']}'", f"{d['method']} ({'mergeable' if d['mergeable'] else 'not mergeable'}), "
                                     f"{d['trainable']:,} params on {_modules(d['targets'])}")
            for d in plan["deltas"]]


def _modules(targets: list[str]) -> str:
    shown = ", ".join(targets[:6]) + (f", ... ({len(targets)} modules)" if len(targets) > 6 else "")
    return shown or "(whole model / embeddings)"


def print_methods() -> None:
    from deltafit import deltas

    table = Table(title="delta methods")
    for column in ("name", "family", "mergeable", "description"):
        table.add_column(column)
    for name, cls in deltas.all_methods().items():
        table.add_row(name, cls.family, "yes" if cls.mergeable else "no", cls.description)
    console.print(table)


# ----------------------------------------------------------------------------------------------
# `deltafit compare` and `deltafit report`

HIDDEN_EVAL = ("examples", "tokens")  # counts, not scores


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _count(n) -> str:
    if n is None:
        return "-"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def compare_columns(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the compare table (terminal and compare.md show the same)."""
    runs = result["runs"]
    done = [r for r in runs if r.get("status") == "done"]
    metrics = sorted({k for r in done for k, v in r.get("eval", {}).items()
                      if k not in HIDDEN_EVAL and isinstance(v, (int, float))},
                     key=lambda k: (k != result.get("metric"), k))
    gpu = any(r.get("peak_gpu_bytes") for r in done)
    header = ["method", "lr", "trainable", "share", *[f"eval {m}" for m in metrics], "final train loss", "time (s)",
              "peak RSS", *(["peak GPU"] if gpu else []), "checkpoint", "status"]
    rows = []
    for r in runs:
        if r.get("status") != "done":
            rows.append([r["method"], *["-"] * (len(header) - 2), "failed (below)"])
            continue
        share = r.get("trainable_share")
        rows.append([
            r["method"], f"{r['lr']:g}", _count(r.get("trainable")),
            f"{100 * share:.3f}%" if share is not None else "-",
            *[_num(r.get("eval", {}).get(m)) for m in metrics], _num(r.get("final_train_loss")),
            _num(r.get("train_seconds"), 1), _size(r.get("peak_rss_bytes")),
            *([_size(r.get("peak_gpu_bytes"))] if gpu else []), _size(r.get("checkpoint_bytes")),
            "reused" if r.get("reused") else ("done (resumed)" if r.get("resumed") else "done"),
        ])
    return header, rows


def compare_markdown(result: dict) -> str:
    header, rows = compare_columns(result)
    lines = [f"# deltafit compare: {result['recipe']}", "",
             f"Task {result['task']}; main metric: {result.get('metric') or 'final train loss'}. "
             "time: wall time of each run's training process (loading, training, final evaluation); "
             "peak RSS: that process's maximum resident memory.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    failed = compare_failures(result)
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {method}: {reason}" for method, reason in failed]
    return "\n".join(lines) + "\n"


def compare_failures(result: dict) -> list[tuple[str, str]]:
    return [(r["method"], str(r.get("reason"))) for r in result["runs"] if r.get("status") != "done"]


def print_compare(result: dict) -> None:
    """The table's main columns (every metric, lr and loss are in compare.md and compare.json)."""
    header, rows = compare_columns(result)
    main = {"method", "trainable", "share", f"eval {result.get('metric')}", "final train loss" if not
            result.get("metric") else "", "time (s)", "peak RSS", "peak GPU", "checkpoint", "status"}
    keep = [i for i, name in enumerate(header) if name in main]
    table = Table(title=f"compare: {result['recipe']}")
    for i in keep:
        table.add_column(header[i], justify="left" if i in (0, len(header) - 1) else "right")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    for method, reason in compare_failures(result):
        console.print(f"[red]{method} failed:[/] {reason}", highlight=False)
    out = Path(result["output"])
    written = [out / "compare.md", out / "compare.json", *map(Path, result.get("plots", []))]
    console.print("written: " + ", ".join(str(p) for p in written))


def load_run_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run directory; a missing or empty one is a user error."""
    from deltafit.compare import read_metrics
    from deltafit.errors import UserError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR '{run_dir}' is not a directory (give a training run's output directory, "
                        f"which holds metrics.jsonl)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"RUN_DIR '{run_dir}' has no metrics.jsonl (is it a run directory? log.jsonl must be on)")
    records = read_metrics(path)
    if not records:
        raise UserError(f"'{path}' holds no metric records (a run that had not logged a step yet?)")
    return records


def summarize_run(records: list[dict]) -> dict:
    """Steps, final/min loss, best eval metrics, mean tokens/s and an estimated training time."""
    import math

    def ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    steps = [r for r in records if ok(r.get("loss"))]
    summary = {"steps": max(r["step"] for r in records)}
    if steps:
        low = min(steps, key=lambda r: r["loss"])
        summary.update(final_loss=steps[-1]["loss"], min_loss=low["loss"], min_loss_step=low["step"])
        rates = [r["tokens_per_s"] for r in steps if ok(r.get("tokens_per_s")) and r["tokens_per_s"] > 0]
        if rates:
            summary["mean_tokens_per_s"] = sum(rates) / len(rates)
        # metrics.jsonl has no timestamps: each record's tokens/s is that step's rate, so the time is
        # estimated as the tokens between logged records over the rate logged at the later one.
        seconds, before = 0.0, 0
        for r in steps:
            if ok(r.get("tokens")) and ok(r.get("tokens_per_s")) and r["tokens_per_s"] > 0:
                seconds += (r["tokens"] - before) / r["tokens_per_s"]
                before = r["tokens"]
        if seconds:
            summary["estimated_seconds"] = seconds
    lower_better = ("loss", "perplexity")
    best = {}
    for r in records:
        for k, v in r.items():
            if not k.startswith("eval_") or k[5:] in HIDDEN_EVAL or not ok(v):
                continue
            name = k[5:]
            if name not in best or (v < best[name][0] if name in lower_better else v > best[name][0]):
                best[name] = (v, r["step"])
    summary["best_eval"] = {k: {"value": v, "step": s} for k, (v, s) in best.items()}
    events = [r for r in records if "early_stopping" in r]
    if events:
        summary["early_stopping_step"] = events[-1]["step"]
    return summary


def print_run_summary(run_dir: Path, summary: dict, charts: list[Path]) -> None:
    table = Table(title=f"run {run_dir}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_row("steps", str(summary["steps"]))
    if "final_loss" in summary:
        table.add_row("final train loss", f"{summary['final_loss']:.4f}")
        table.add_row("min train loss", f"{summary['min_loss']:.4f} (step {summary['min_loss_step']})")
    for name, best in summary["best_eval"].items():
        table.add_row(f"best eval {name}", f"{best['value']:.4f} (step {best['step']})")
    if "mean_tokens_per_s" in summary:
        table.add_row("mean tokens/s", f"{summary['mean_tokens_per_s']:,.0f}")
    if "estimated_seconds" in summary:
        table.add_row("train time (est.)", f"{summary['estimated_seconds']:.1f} s")
    if "early_stopping_step" in summary:
        table.add_row("early stopping", f"step {summary['early_stopping_step']}")
    console.print(table)
    console.print("charts: " + (", ".join(str(p) for p in charts) or "none (no plottable records)"))
