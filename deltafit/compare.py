"""`deltafit compare`: one recipe, trained once per delta method, in one table.

For each method, the recipe's `delta` section is replaced by `{method: m, **RECOMMENDED[m].delta}`
and `train.lr` by the method's recommended rate; the recipe's *own* method keeps the recipe's delta
section and learning rate as written (that is the setting its author chose). Module names from the
recipe's delta section (`target_modules`...) are not carried to other methods: they are often
method-specific, and every method has per-architecture defaults. Then `--set KEY=VALUE` applies to
every method and `--set METHOD:KEY=VALUE` to that method only (e.g. `--set lora:train.lr=1e-3`).

Each run trains in its own process (`python -m deltafit.compare --child ...`) into OUTPUT/<method>/,
so its peak memory is its own: peak resident memory from `os.wait4`'s rusage of that process, and on
a GPU `torch.cuda.max_memory_allocated`. The time is the wall time of that process (model and data
loading, training, final evaluation). A run is finished when OUTPUT/<method>/compare-run.json says
so for the same per-method recipe (as written: recipe file, table and --set, so a deltafit upgrade
that adds recipe keys with defaults keeps it) and its final checkpoint exists: a second `compare` reuses it. An
interrupted run (Ctrl-C saves a step checkpoint) resumes from its latest step checkpoint; a run
whose recipe changed since is trained afresh. A method the model cannot take (BitFit on a model
without biases) is reported as failed with its one-line reason, and the others go on.

Writes OUTPUT/compare.json, compare.md, metric_vs_trainable.png and loss_curves.png.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from deltafit.errors import Interrupted, UserError, did_you_mean

# Recommended settings per method: delta options and train.lr. Every value is the one in the
# method's own recipe, recipes/<method>.yaml, whose comments cite the paper or reference
# implementation it comes from (see also shared/docs/methods.md). Module names are left out: the
# recipes name Llama modules, and each method picks per-architecture defaults without them.
# Schedules in steps (AdaLoRA's tinit/tfinal, diff pruning's fixed_mask_steps) are the methods'
# defaults: a short comparison may need e.g. --set adalora:delta.tinit=10.
RECOMMENDED: dict[str, dict] = {
    "full": {"lr": 2e-5},                                               # full.yaml (~10x below LoRA)
    "lora": {"delta": {"r": 16, "alpha": 32, "dropout": 0.05}, "lr": 2e-4},  # lora.yaml (Hu et al.)
    "dora": {"delta": {"r": 16, "alpha": 32, "dropout": 0.05}, "lr": 2e-4},  # dora.yaml (LoRA's rates)
    "lora-fa": {"delta": {"r": 16, "alpha": 32, "dropout": 0.05}, "lr": 2e-4},  # lora-fa.yaml
    "qlora": {"delta": {"r": 64, "alpha": 16, "dropout": 0.1}, "lr": 2e-4},  # qlora.yaml (paper: r 64, alpha 16)
    "adalora": {"delta": {"init_r": 12, "target_r": 8, "alpha": 24, "dropout": 0.05}, "lr": 5e-4},  # adalora.yaml
    "vera": {"delta": {"r": 256, "d_initial": 0.1}, "lr": 4e-3},        # vera.yaml (paper: 1e-2 .. 4e-3)
    "adapter": {"delta": {"bottleneck": 64, "variant": "houlsby"}, "lr": 1e-4},  # adapter.yaml (1e-4 .. 1e-3)
    "parallel-adapter": {"delta": {"bottleneck": 256, "scale": 4.0}, "lr": 1e-4},  # parallel-adapter.yaml (He et al.)
    "mam": {"delta": {"bottleneck": 256}, "lr": 1e-4},  # mam.yaml (He et al.; 512 is for 1024-wide models)
    "adapter-fusion": {"lr": 5e-5},  # adapter-fusion.yaml (the paper); needs --set adapter-fusion:delta.adapters=[...]
    "bitfit": {"lr": 1e-3},                                             # bitfit.yaml (paper sweeps 1e-4 .. 1e-3)
    "layernorm": {"lr": 1e-3},                                          # layernorm.yaml (like BitFit)
    "ia3": {"lr": 3e-3},                                                # ia3.yaml (the paper's rate)
    "prefix": {"delta": {"num_virtual_tokens": 20, "hidden": 512}, "lr": 5e-3},  # prefix.yaml (1e-3 .. 1e-2)
    "unipelt": {"delta": {"prefix_tokens": 10, "reduction_factor": 16, "r": 8}, "lr": 5e-4},  # unipelt.yaml
    "ptuning-v2": {"delta": {"num_virtual_tokens": 20}, "lr": 5e-3},    # ptuning-v2.yaml (5e-3 .. 1e-2)
    "ptuning": {"delta": {"num_virtual_tokens": 20}, "lr": 1e-3},       # ptuning.yaml
    "prompt": {"delta": {"num_virtual_tokens": 20}, "lr": 3e-2},        # prompt.yaml (1e-2 .. 3e-1 with AdamW)
    "lisa": {"delta": {"interval": 20, "gamma": 2}, "lr": 2e-5},        # lisa.yaml (full-fine-tuning rate)
    "lamda": {"delta": {"r": 16, "alpha": 32}, "lr": 1e-3},             # lamda.yaml
    "lamda-pp": {"delta": {"r": 16, "alpha": 32}, "lr": 1e-3},          # lamda-pp.yaml
    "said": {"delta": {"dimension": 1000}, "lr": 1e-3},                 # said.yaml
    "aflora": {"delta": {"r": 4}, "lr": 2e-3},                          # aflora.yaml (the paper's rank)
    "diff-pruning": {"delta": {"density": 0.005}, "lr": 5e-5},          # diff-pruning.yaml (paper: 0.5%)
    "masking": {"delta": {"init_keep": 0.95}, "lr": 1e-3},              # masking.yaml
    "partial": {"lr": 1e-4},                                            # partial.yaml
}

RUN_FILE = "compare-run.json"  # OUTPUT/<method>/: the run's outcome, written by the parent
CHILD_FILE = "compare-child.json"  # OUTPUT/<method>/: what the training process measured of itself
RECIPE_FILE = "compare-recipe.yaml"  # OUTPUT/<method>/: the per-method recipe the run trains
LOG_FILE = "train.log"  # OUTPUT/<method>/: the training process's output


@dataclass
class Plan:
    method: str
    recipe: dict  # the per-method recipe, validated (shown in the table)
    raw: dict  # the per-method recipe as written (recipe file + table + --set): what a finished run must match
    out: Path
    counts: Optional[dict] = None  # trainable / total from `deltafit validate`'s plan
    refused: Optional[str] = None  # why the model cannot take the method


@dataclass
class Outcome:
    method: str
    status: str  # done | failed
    reason: Optional[str] = None
    reused: bool = False
    row: dict = field(default_factory=dict)


def parse_methods(text: str) -> list[str]:
    from deltafit.deltas import METHODS

    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise UserError(f"--methods '{text}' names no method; give a comma list, e.g. lora,adapter,bitfit "
                        f"(valid: {', '.join(METHODS)})")
    for name in names:
        if name not in METHODS:
            raise UserError(f"--methods: unknown method '{name}'{did_you_mean(name, METHODS)}; "
                            f"valid: {', '.join(METHODS)}")
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise UserError(f"--methods names '{seen[0]}' twice; give each method once")
    return names


def split_overrides(items: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`KEY=V` for all methods, `METHOD:KEY=V` for one: ([common], {method: [own]})."""
    common, own = [], {m: [] for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        if ":" in key:
            method, _, rest = key.partition(":")
            method = method.strip()
            if method not in own:
                raise UserError(f"--set '{item}': '{method}' is not one of the compared methods "
                                f"({', '.join(methods)}){did_you_mean(method, methods)}")
            own[method].append(f"{rest}{sep}{value}")
        else:
            common.append(item)
    return common, own


def method_recipe(raw: dict, method: str, common: list[str], own: list[str]) -> dict:
    """The recipe dict for one method (see the module docstring for the order of precedence)."""
    import copy

    from deltafit.recipe import apply_override

    raw = copy.deepcopy(raw)
    recipe_delta = raw.get("delta") or {"method": "lora"}
    if not isinstance(recipe_delta, (dict, list)):
        raise UserError(f"recipe key 'delta' must be a mapping with at least 'method' (got {recipe_delta!r})")
    if isinstance(recipe_delta, list) or recipe_delta.get("method", "lora") != method:  # a composition: replaced
        table = RECOMMENDED.get(method, {})
        raw["delta"] = {"method": method, **table.get("delta", {})}
        if "lr" in table:
            raw.setdefault("train", {})
            if not isinstance(raw["train"], dict):
                raise UserError(f"recipe key 'train' must be a mapping (got {raw['train']!r})")
            raw["train"]["lr"] = table["lr"]
    for item in [*common, *own]:
        apply_override(raw, item)
    raw["name"] = f"{raw.get('name') or 'compare'}-{method}"
    raw.pop("output_dir", None)
    return raw


def plan_runs(recipe_path: Path, methods: list[str], overrides: list[str], output: Path) -> list[Plan]:
    """Validate every per-method recipe before anything trains (a bad one: exit 2, naming the method)."""
    from deltafit.recipe import read_recipe_file, recipe_from_dict

    raw = read_recipe_file(Path(recipe_path))
    raw.setdefault("name", Path(recipe_path).stem)
    common, own = split_overrides(overrides, methods)
    plans = []
    checked_data = False
    for method in methods:
        per = method_recipe(raw, method, common, own[method])
        recipe = recipe_from_dict(per, source=f"{recipe_path} [{method}]")
        if not checked_data:  # the data is shared: a problem there is the recipe's, not a method's
            from deltafit.data import describe_data

            describe_data(recipe.data)
            checked_data = True
        plans.append(Plan(method, recipe.to_dict(), raw=per, out=output / method))
    return plans


def check_fits(plan: Plan) -> None:
    """Trainable/total counts as `deltafit validate` shows them; a model that cannot take the method
    (BitFit without biases...) marks the run refused instead of failing the comparison."""
    from deltafit.plan import make_plan
    from deltafit.recipe import recipe_from_dict

    try:
        info = make_plan(recipe_from_dict(json.loads(json.dumps(plan.recipe)), source=plan.method))
    except UserError as e:
        plan.refused = str(e)
        return
    plan.counts = {"trainable": info["trainable"], "total": info["total"]}


def compare(recipe_path: Path, methods_text: str, overrides: list[str], output: Optional[Path]) -> dict:
    """Train, evaluate and tabulate; returns the compare.json content."""
    from deltafit import plots
    from deltafit.report import console

    methods = parse_methods(methods_text)
    output = Path(output) if output else Path("runs") / f"compare-{Path(recipe_path).stem}"
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' is a file; give a directory for the runs and the table")
    plans = plan_runs(recipe_path, methods, overrides or [], output)
    plots.require()  # before hours of training: the charts are part of the result
    todo = [plan for plan in plans if not _finished(plan)]
    for plan in todo:
        check_fits(plan)
    reasons = {plan.refused for plan in todo}
    if len(todo) > 1 and len(reasons) == 1 and None not in reasons:  # the recipe's problem, not the methods'
        raise UserError(reasons.pop())
    output.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for i, plan in enumerate(plans, 1):
        console.print(f"[bold][{i}/{len(plans)}] {plan.method}[/] -> {plan.out}")
        outcome = _run_one(plan)
        if outcome.status == "failed":
            console.print(f"[red]  failed:[/] {outcome.reason}")
        else:
            console.print(f"  {'reused finished run' if outcome.reused else 'done'}: {_short(outcome.row)}")
        outcomes.append(outcome)
    result = _tabulate(recipe_path, output, plans, outcomes)
    result["plots"] = plots.compare_plots(result, output)
    (output / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    from deltafit.report import compare_markdown

    (output / "compare.md").write_text(compare_markdown(result), encoding="utf-8")
    return result


def _finished(plan: Plan) -> Optional[dict]:
    """The row of a finished run of the same per-method recipe, or None."""
    previous = _read_json(plan.out / RUN_FILE)
    if previous and previous.get("status") == "done" and previous.get("recipe") == plan.raw \
            and (plan.out / "final" / "deltafit.json").is_file() and isinstance(previous.get("row"), dict):
        return previous["row"]
    return None


def _run_one(plan: Plan) -> Outcome:
    out = plan.out
    row = _finished(plan)
    if row is not None:
        return Outcome(plan.method, "done", reused=True, row=row)
    if plan.counts is None and plan.refused is None:
        check_fits(plan)
    if plan.refused:
        return _record(plan, Outcome(plan.method, "failed", reason=plan.refused))
    out.mkdir(parents=True, exist_ok=True)
    mode = _start_mode(out, plan.raw)
    (out / RECIPE_FILE).write_text(yaml.safe_dump(plan.raw, sort_keys=False), encoding="utf-8")
    (out / CHILD_FILE).unlink(missing_ok=True)
    code, rusage = _train_process(plan, mode)
    if code != 0:
        reason = _failure_line(out / LOG_FILE, code)
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            saved = "its step checkpoint is saved" if _start_mode(out, plan.raw) == "resume" else "nothing saved"
            raise Interrupted(f"compare interrupted while training '{plan.method}' ({saved}; log: {out / LOG_FILE}); "
                              f"run the same command again to continue: finished runs are reused and "
                              f"'{plan.method}' {'resumes' if saved.startswith('its') else 'starts again'}", code - 128)
        return _record(plan, Outcome(plan.method, "failed", reason=reason))
    child = _read_json(out / CHILD_FILE) or {}
    row = _row(plan, child, rusage, resumed=mode == "resume")
    return _record(plan, Outcome(plan.method, "done", row=row))


def _start_mode(out: Path, recipe: dict) -> str:
    """resume (same recipe, a step checkpoint left), overwrite (something else is there) or fresh."""
    from deltafit import checkpoint

    latest = checkpoint.latest_step_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    before = _read_yaml(out / RECIPE_FILE)
    if latest is not None and before == recipe and not (out / "final" / "deltafit.json").is_file():
        return "resume"
    trained = [p for p in ("final", "checkpoints", "best", "metrics.jsonl") if (out / p).exists()]
    return "overwrite" if trained else "fresh"


def _train_process(plan: Plan, mode: str) -> tuple[int, Optional[object]]:
    """Run the child; (exit code, its rusage). Ctrl-C reaches the child too (same process group): it
    saves a step checkpoint and exits, and this process waits for it before giving up."""
    command = [sys.executable, "-m", "deltafit.compare", "--child", str(plan.out / RECIPE_FILE), str(plan.out), mode]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(plan.out / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"\n# deltafit compare: {mode} run of {plan.method}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        interrupted = False
        while True:
            try:
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            except KeyboardInterrupt:
                interrupted = True  # the child got the signal too: wait for its checkpoint
            except ChildProcessError:
                return proc.wait(), None
        proc.returncode = os.waitstatus_to_exitcode(status)
    code = proc.returncode
    if code < 0:  # killed by a signal
        code = 128 - code
    if interrupted and code == 0:
        code = 128 + signal.SIGINT
    return code, rusage


def _failure_line(log: Path, code: int) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if code == 137 or code == 128 + 9:
        return "killed (out of memory?), see " + str(log)
    return (lines[-1] if lines else f"exit code {code}") + f" (exit code {code}; see {log})"


def _row(plan: Plan, child: dict, rusage, resumed: bool) -> dict:
    records = read_metrics(plan.out / "metrics.jsonl")
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    steps = [r for r in records if "loss" in r]
    final = plan.out / "final"
    counts = plan.counts or {}
    trainable, total = counts.get("trainable"), counts.get("total")
    return {
        "method": plan.method,
        "lr": plan.recipe["train"]["lr"],
        "delta": {k: v for k, v in plan.recipe["delta"].items() if v is not None},
        "trainable": trainable, "total": total,
        "trainable_share": trainable / total if trainable is not None and total else None,
        "eval": {k[len("eval_"):]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "steps": steps[-1]["step"] if steps else None,
        "train_seconds": child.get("seconds"),
        "peak_rss_bytes": rusage.ru_maxrss * 1024 if rusage is not None else None,  # Linux: KiB
        "peak_gpu_bytes": child.get("peak_gpu_bytes"),
        "checkpoint_bytes": sum(p.stat().st_size for p in final.rglob("*") if p.is_file()) if final.is_dir() else None,
        "resumed": resumed,
        "output": str(plan.out),
    }


def _record(plan: Plan, outcome: Outcome) -> Outcome:
    plan.out.mkdir(parents=True, exist_ok=True)
    record = {"status": outcome.status, "reason": outcome.reason, "recipe": plan.raw, "row": outcome.row}
    (plan.out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return outcome


def main_metric(task: str, rows: list[dict]) -> tuple[Optional[str], bool]:
    """(the metric the table sorts and plots by, higher is better)."""
    keys = {k for row in rows for k in row.get("eval", {})}
    for name, higher in (("accuracy", True), ("loss", False)) if task == "seq-cls" else (("loss", False),):
        if name in keys:
            return name, higher
    return None, False


def _tabulate(recipe_path: Path, output: Path, plans: list[Plan], outcomes: list[Outcome]) -> dict:
    task = plans[0].recipe["model"]["task"]
    rows = []
    for outcome in outcomes:
        row = dict(outcome.row) if outcome.status == "done" else {"method": outcome.method}
        row.update(status=outcome.status, reason=outcome.reason, reused=outcome.reused)
        rows.append(row)
    metric, higher = main_metric(task, [r for r in rows if r["status"] == "done"])
    return {"recipe": str(recipe_path), "output": str(output), "task": task, "metric": metric,
            "higher_is_better": higher, "runs": rows}


def _short(row: dict) -> str:
    shown = [f"{k} {v:.4f}" for k, v in row.get("eval", {}).items() if isinstance(v, float)][:3]
    if row.get("train_seconds") is not None:
        shown.append(f"{row['train_seconds']:.0f} s")
    return ", ".join(shown) or "no evaluation data"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a kill is skipped)."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> Optional[dict]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# The training process: `python -m deltafit.compare --child RECIPE OUT MODE`


def _child(recipe_file: str, out: str, mode: str) -> int:
    import resource

    from deltafit.cli import _quiet_import_warnings

    _quiet_import_warnings()
    started = time.perf_counter()
    try:
        import torch

        from deltafit.recipe import load_recipe
        from deltafit.train import fit

        fit(load_recipe(recipe_file), Path(out), "latest" if mode == "resume" else None, overwrite=mode == "overwrite")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    peak_gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    stats = {"seconds": round(time.perf_counter() - started, 2), "peak_gpu_bytes": peak_gpu,
             "peak_rss_bytes_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (Path(out) / CHILD_FILE).write_text(json.dumps(stats) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.exit(_child(*sys.argv[2:]))
    sys.exit("usage: python -m deltafit.compare --child RECIPE OUT MODE (internal: use `deltafit compare`)")
