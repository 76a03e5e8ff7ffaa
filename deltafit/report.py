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
        if key in ("checkpoint", "model", "data", "split"):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"written to {path}")


def print_merge(result: dict) -> None:
    console.print(f"merged [bold]{result['method']}[/] into the base weights; merged vs unmerged logits on "
                  f"{result['inputs']} inputs: max abs diff {result['max_abs_logit_diff']:.3g}")
    console.print(f"saved a plain transformers model ({result['dtype']}) to {result['output']}")


def print_plan(plan: dict) -> None:
    table = Table(title="plan", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    targets = plan["targets"]
    shown = ", ".join(targets[:6]) + (f", ... ({len(targets)} modules)" if len(targets) > 6 else "")
    rows = [
        ("model", f"{plan['model']} ({plan['architecture']})"), ("task", plan["task"]),
        ("method", f"{plan['method']} ({'mergeable' if plan['mergeable'] else 'not mergeable'})"),
        ("delta on", shown or "(whole model / embeddings)"),
        ("delta params", f"{plan['delta_params']:,}"),
        ("trainable", f"{plan['trainable']:,} / {plan['total']:,} "
                      f"({100 * plan['trainable'] / max(plan['total'], 1):.4f}%)"),
        ("data", f"{plan['data_format']}: "
                 + ", ".join(f"{k}={v}" for k, v in plan["data"].items() if v is not None and k != "columns")),
        ("length", f"{plan['steps']} steps" if plan["steps"] else f"{plan['epochs']} epochs"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    console.print("[green]recipe is valid[/]")


def print_methods() -> None:
    from deltafit import deltas

    table = Table(title="delta methods")
    for column in ("name", "family", "mergeable", "description"):
        table.add_column(column)
    for name, cls in deltas.all_methods().items():
        table.add_row(name, cls.family, "yes" if cls.mergeable else "no", cls.description)
    console.print(table)
