#!/usr/bin/env python
"""AdapterFusion on real data: adapters trained on SST-2 and RTE (stage 1), fused for RTE (stage 2),
against the RTE adapter alone at the same seed, with as many RTE steps as stage 1 + stage 2.

    .venv/bin/python scripts/fusion_report.py --steps 100          # MiniLM, GLUE from ../shared/data or the hub

Runs, each a `deltafit train` of the shipped recipes (recipes/adapter-fusion-stage1.yaml and
recipes/adapter-fusion.yaml) with the step budget set on the command line, then `deltafit eval`:
  1. SST-2 adapter, `--steps` steps;   2. RTE adapter, `--steps` steps;
  3. fusion of 1 and 2 on RTE, `--steps` steps (only the fusion layers and the head train);
  4. RTE adapter alone, 2 x `--steps` steps (the RTE steps 2 + 3 took together).
Prints RTE dev accuracy, trainable parameters and wall time per run, and writes runs/fusion/results.md.
Short runs: they show the method works end to end, not the paper's gains (which fuse 16 tasks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _data import add_data_option, find

ROOT = Path(__file__).resolve().parents[1]
PAIR = ["data.text_column=sentence1", "data.text_pair_column=sentence2", "data.max_length=128"]


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    sst2, rte = find("sst2", args.data), find("rte", args.data)
    print(sst2.line, rte.line, sep="\n", file=sys.stderr)
    common = [f"train.max_steps={args.steps}", "train.eval_every=null", "train.seed=0", "log.progress=false"]
    runs = [
        ("SST-2 adapter (stage 1)", "adapter-fusion-stage1", out / "sst2", [*sst2.sets(), *common], "sst2"),
        ("RTE adapter (stage 1)", "adapter-fusion-stage1", out / "rte", [*rte.sets(), *PAIR, *common], "rte"),
        ("fusion of both, on RTE (stage 2)", "adapter-fusion", out / "fusion",
         [*rte.sets(), *common, f"delta.adapters=[{out / 'sst2' / 'final'}, {out / 'rte' / 'final'}]"], "rte"),
        ("RTE adapter alone, 2x steps", "adapter-fusion-stage1", out / "rte-long",
         [*rte.sets(), *PAIR, *common, f"train.max_steps={2 * args.steps}"], "rte"),
    ]
    rows = [run(label, recipe, where, sets) for label, recipe, where, sets, _ in runs]
    table = ["| run | task | dev accuracy | trainable | train + eval time |",
             "| --- | --- | ---: | ---: | ---: |"]
    table += [f"| {r['label']} | {task} | {r['accuracy']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |"
              for r, (*_, task) in zip(rows, runs)]
    text = "\n".join(table)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(text)


def run(label: str, recipe: str, where: Path, sets: list[str]) -> dict:
    started = time.time()
    args = [str(ROOT / "recipes" / f"{recipe}.yaml"), "--output", str(where), "--overwrite",
            *[a for s in sets for a in ("--set", s)]]
    deltafit("train", *args)
    deltafit("eval", str(where / "final"))
    result = json.loads((where / "final-eval.json").read_text())
    meta = json.loads((where / "final" / "deltafit.json").read_text())
    seconds = round(time.time() - started, 1)
    return {"label": label, "accuracy": result["accuracy"], "trainable": trainable(recipe, sets),
            "method": meta["method"], "seconds": seconds}


def trainable(recipe: str, sets: list[str]) -> int:
    """Trainable parameters as `deltafit validate` counts them (a weightless model)."""
    from deltafit.plan import make_plan
    from deltafit.recipe import load_recipe

    return make_plan(load_recipe(ROOT / "recipes" / f"{recipe}.yaml", sets))["trainable"]


def deltafit(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "deltafit", *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"deltafit {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of each stage (batch 32)")
    p.add_argument("--out", default=str(ROOT / "runs" / "fusion"))
    add_data_option(p)
    return p.parse_args()


if __name__ == "__main__":
    main()
