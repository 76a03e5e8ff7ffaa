#!/usr/bin/env python
"""Every registered delta method, end to end on the two real models: the figures of the closing notes.

    .venv/bin/python scripts/methods_report.py                 # all methods, both models
    .venv/bin/python scripts/methods_report.py --methods lora,lamda --sst2-steps 100

For each method, in its own process:
- SmolLM2-135M, from the method's own recipe (recipes/<method>.yaml) on Alpaca: trainable
  parameters at attach (counted on the real model; scheduled methods shrink later), a short run,
  `eval` (held-out loss) and, where the method merges, `merge` (max abs difference of merged vs
  unmerged logits, fp32).
- MiniLM on GLUE SST-2: recipes/glue-sst2-minilm-lora.yaml with the delta section taken from the
  method's recipe (its targets dropped: the per-architecture default applies on BERT), a short
  run, dev accuracy.

Data (scripts/_data.py; one `data:` line each says which): ../shared/data/alpaca_small and
../shared/data/glue_sst2 when present, else the hub datasets (tatsu-lab/alpaca, first 2,000 rows;
nyu-mll/glue sst2, train + validation). `--data DIR` names another local directory, `--data hub`
forces the hub.

Writes runs/methods/results.json and results.md, and prints the table. Not a benchmark: the runs
are short, so accuracies say "it learns", not how methods compare at convergence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _data import add_data_option, find

ROOT = Path(__file__).resolve().parents[1]
RESULT = "METHOD_RESULT "
DATASETS = {"smollm2": "alpaca", "sst2": "sst2"}  # workload -> scripts/_data.py dataset


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from deltafit.deltas import METHODS

    methods = args.methods or list(METHODS)
    sources = {workload: find(DATASETS[workload], args.data) for workload in args.workloads}
    for source in sources.values():
        print(source.line, file=sys.stderr)
    results = []
    for method in methods:
        for workload in args.workloads:
            started = time.time()
            job = {"method": method, "workload": workload, "out": str(out / f"{method}-{workload}"),
                   "llm_steps": args.llm_steps, "sst2_steps": args.sst2_steps, "sst2_lr": args.sst2_lr,
                   "sets": args.sets, "data": sources[workload].keys, "data_sets": sources[workload].sets()}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True, cwd=ROOT)
            line = next((text for text in reversed(proc.stdout.splitlines()) if text.startswith(RESULT)), None)
            result = json.loads(line[len(RESULT):]) if line else {
                "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
            result.update(method=method, workload=workload, seconds=round(time.time() - started, 1))
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, args)
    (out / "results.md").write_text(table)
    print(table)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", type=lambda s: s.split(","), help="comma list (default: the whole registry)")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["smollm2", "sst2"])
    p.add_argument("--llm-steps", type=int, default=4, help="optimizer steps on SmolLM2 (batch 4, length 128)")
    p.add_argument("--sst2-steps", type=int, default=150, help="optimizer steps on SST-2 (batch 32)")
    p.add_argument("--sst2-lr", type=float, default=None, help="SST-2 learning rate (default: the SST-2 recipe's 1e-3)")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help="recipe override for both workloads, e.g. delta.tinit=1 (AdaLoRA's schedule in short runs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "methods"))
    add_data_option(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Worker: one method on one model, in-process through deltafit's own functions


def worker(job: dict) -> dict:
    from deltafit.recipe import apply_override, load_recipe, recipe_from_dict

    method, out = job["method"], Path(job["out"])
    if job["workload"] == "smollm2":
        recipe = load_recipe(ROOT / "recipes" / f"{method}.yaml", [
            *job["data_sets"], "data.format=alpaca",
            "data.eval_fraction=0.05", "data.max_length=128", f"train.max_steps={job['llm_steps']}",
            "train.epochs=1", "train.batch_size=4", "train.grad_accum=1", "train.eval_every=null",
            "train.save_every=null", "log.progress=false", "data.max_eval_examples=16", *job["sets"]])
        return run(recipe, out, merge=True)
    cls = load_recipe(ROOT / "recipes" / "glue-sst2-minilm-lora.yaml").model_dump(mode="json")
    own = load_recipe(ROOT / "recipes" / f"{method}.yaml").model_dump(mode="json")["delta"]
    own.pop("target_modules", None)
    cls.update(delta={k: v for k, v in own.items() if k != "ranks"}, name=f"sst2-{method}")
    cls["data"].update(job["data"])
    cls["train"].update(max_steps=job["sst2_steps"], eval_every=None, save_every=None, log_every=50)
    if job["sst2_lr"]:
        cls["train"]["lr"] = job["sst2_lr"]
    cls["log"].update(progress=False)
    for item in job["sets"]:
        apply_override(cls, item)
    return run(recipe_from_dict(cls, source=f"sst2-{method}"), out, merge=False)


def run(recipe, out: Path, merge: bool) -> dict:
    import torch

    from deltafit import deltas
    from deltafit.evaluate import evaluate_checkpoint
    from deltafit.merge import merge_checkpoint
    from deltafit.train import fit

    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    final = fit(recipe, output_dir=out)
    result = {"trainable": trainable_at_attach(recipe), "stored_numbers": stored_numbers(final),
              "eval": {k: v for k, v in evaluate_checkpoint(str(final))[0].items() if isinstance(v, float)}}
    if merge and deltas.get(recipe.delta.method).mergeable:
        result["merge_max_abs_logit_diff"] = merge_checkpoint(str(final), str(out / "merged"))["max_abs_logit_diff"]
    return result


def trainable_at_attach(recipe) -> int:
    """Trainable parameters of the delta (and head) right after attach, as `deltafit validate` counts."""
    from deltafit.plan import make_plan

    return make_plan(recipe)["trainable"]


def stored_numbers(final: Path) -> int:
    """Numbers in the final checkpoint's tensors (AdaLoRA trims pruned ranks, VeRA stores no projections)."""
    from safetensors import safe_open

    with safe_open(str(final / "delta.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def markdown(results: list[dict], args) -> str:
    by = {(r["method"], r["workload"]): r for r in results}
    lr = args.sst2_lr or "1e-3"
    lines = [f"SmolLM2-135M: recipe's targets, {args.llm_steps} steps (batch 4, length 128), held-out loss; "
             f"MiniLM SST-2: {args.sst2_steps} steps (batch 32, lr {lr}), dev accuracy (872 sentences). "
             f"Overrides: {args.sets or 'none'}.", "",
             "| method | SmolLM2 trainable | SmolLM2 eval loss | merged vs unmerged (max abs) | SST-2 trainable "
             "| SST-2 dev acc |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in results):
        llm, cls = by.get((method, "smollm2"), {}), by.get((method, "sst2"), {})
        lines.append(f"| `{method}` | {_n(llm.get('trainable'))} | {_f(llm.get('eval', {}).get('loss'), llm)} | "
                     f"{_f(llm.get('merge_max_abs_logit_diff'), llm, '.2e', 'n/a')} | {_n(cls.get('trainable'))} | "
                     f"{_f(cls.get('eval', {}).get('accuracy'), cls)} |")
    return "\n".join(lines) + "\n"


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "-"


def _f(x, result, spec=".4f", missing="-") -> str:
    if "error" in result:
        return "error"
    return format(x, spec) if isinstance(x, float) else missing


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(RESULT + json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))), flush=True)
    else:
        main()
