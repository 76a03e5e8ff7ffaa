#!/usr/bin/env python
"""Every registered delta method, end to end on the two real models: the figures of the closing notes.

    .venv/bin/python scripts/methods_report.py                 # all methods, both models
    .venv/bin/python scripts/methods_report.py --methods lora,lamda --sst2-steps 100

For each method (and each variant in VARIANTS, e.g. LoRA with PiSSA init), in its own process:
- SmolLM2-135M, from the method's own recipe (recipes/<method>.yaml) on Alpaca: trainable
  parameters at attach (counted on the real model; scheduled methods shrink later), a short run,
  `eval` (held-out loss), where the method merges `merge` (max abs difference of merged vs
  unmerged logits, fp32), and where it has a PEFT format `export`, loaded back with
  `peft.PeftModel.from_pretrained` (max abs difference of PEFT's logits vs deltafit's, fp32).
  A method whose recipe is for BERT (layernorm, bitfit) runs on LoRA's SmolLM2 recipe with its
  own delta section, or is reported n/a with the reason where the model cannot take it.
- MiniLM on GLUE SST-2: recipes/glue-sst2-minilm-lora.yaml with the delta section taken from the
  method's recipe (its module names dropped: the per-architecture defaults apply on BERT), a
  short run, dev accuracy.
Methods with a step schedule (gradual unfreezing, LISA's interval, diff pruning's fixed-mask
phase) get it scaled to the short run (SCHEDULES). Every run reports the final checkpoint's size on
disk; diff pruning also its density (kept / gated weights).

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
# Report rows that are a registered method with other options: name -> (method, overrides for both
# workloads). PiSSA/OLoRA start B A at the top of W0, so they train at ~1/10 of LoRA's rate (the
# PiSSA paper uses 2e-5 where LoRA uses 2e-4) and without dropout (it would drop part of W0's
# principal component; PEFT's PiSSA example sets lora_dropout=0 too).
_RESIDUAL = ["delta.dropout=0", "train.lr_scale=0.1"]
VARIANTS = {
    "lora+pissa": ("lora", ["delta.init=pissa", *_RESIDUAL]),
    "lora+pissa-fast": ("lora", ["delta.init=pissa", "delta.svd_niter=4", *_RESIDUAL]),
    "lora+olora": ("lora", ["delta.init=olora", *_RESIDUAL]),
}
# Compositions (`delta:` as a list): name -> the methods whose recipes' delta sections are combined.
COMBINATIONS = {"lora+bitfit": ["lora", "bitfit"], "lora+ia3": ["lora", "ia3"]}
DEFAULT_METHODS = ["bitfit", "partial", "layernorm", "lisa", "diff-pruning", "masking", "ptuning", "ptuning-v2",
                   "ia3", "dora", "lora", *VARIANTS]
# Schedule keys in steps, set to a fifth of a short run so the schedule happens inside it.
SCHEDULES = {"partial": "delta.unfreeze_every", "lisa": "delta.interval", "diff-pruning": "delta.fixed_mask_steps"}
# Delta keys naming a model's modules: a Llama recipe's names mean nothing on BERT.
MODULE_KEYS = ("target_modules", "feedforward_modules", "modules", "ranks")


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.render:  # the table again from a results.json (e.g. after a change to this script's table)
        print(markdown(json.loads(Path(args.render).read_text()), args))
        return
    out.mkdir(parents=True, exist_ok=True)
    from deltafit.deltas import METHODS

    methods = args.methods or (list(METHODS) + list(VARIANTS) + list(COMBINATIONS) if args.all else DEFAULT_METHODS)
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
    p.add_argument("--methods", type=lambda s: s.split(","),
                   help=f"comma list of methods, variants ({', '.join(VARIANTS)}) or combinations "
                   f"({', '.join(COMBINATIONS)}); "
                   f"default: {','.join(DEFAULT_METHODS)}")
    p.add_argument("--all", action="store_true", help="every registered method and variant")
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["smollm2", "sst2"])
    p.add_argument("--llm-steps", type=int, default=4, help="optimizer steps on SmolLM2 (batch 4, length 128)")
    p.add_argument("--sst2-steps", type=int, default=150, help="optimizer steps on SST-2 (batch 32)")
    p.add_argument("--sst2-lr", type=float, default=None, help="SST-2 learning rate (default: the SST-2 recipe's 1e-3)")
    p.add_argument("--set", action="append", default=[], dest="sets",
                   help="recipe override for both workloads, e.g. delta.tinit=1 (AdaLoRA's schedule in short runs)")
    p.add_argument("--out", default=str(ROOT / "runs" / "methods"))
    p.add_argument("--render", metavar="RESULTS_JSON", help="only print the table of an earlier run's results.json")
    add_data_option(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Worker: one method on one model, in-process through deltafit's own functions


def worker(job: dict) -> dict:
    from deltafit.errors import UserError
    from deltafit.recipe import apply_override, load_recipe, recipe_from_dict

    method, variant = VARIANTS.get(job["method"], (job["method"], []))
    steps = job["llm_steps"] if job["workload"] == "smollm2" else job["sst2_steps"]
    sets = [*variant, *_schedule(method, steps), *job["sets"]]
    lr_scale = _pop_lr_scale(sets)
    own = _own_recipe(method)
    if job["workload"] == "smollm2":
        raw = own
        if own["model"]["task"] != "causal-lm":  # a BERT recipe (layernorm, bitfit): LoRA's SmolLM2 recipe, its delta
            raw = load_recipe(ROOT / "recipes" / "lora.yaml").model_dump(mode="json")
            raw.update(delta=_portable(own["delta"]))
        for item in [*job["data_sets"], "data.format=alpaca", "data.eval_fraction=0.05", "data.max_length=128",
                     f"train.max_steps={steps}", "train.epochs=1", "train.batch_size=4", "train.grad_accum=1",
                     "train.eval_every=null", "train.save_every=null", "log.progress=false",
                     "data.max_eval_examples=16"]:
            apply_override(raw, item)
    else:
        raw = load_recipe(ROOT / "recipes" / "glue-sst2-minilm-lora.yaml").model_dump(mode="json")
        raw.update(delta=_portable(own["delta"]))
        raw["data"].update(job["data"])
        raw["train"].update(max_steps=steps, eval_every=None, save_every=None, log_every=50)
        raw["train"]["lr"] = job["sst2_lr"] or raw["train"]["lr"]
        raw["log"].update(progress=False)
    raw.update(name=f"{job['workload']}-{job['method']}")
    raw["train"]["lr"] *= lr_scale
    for item in sets:
        apply_override(raw, item)
    recipe = recipe_from_dict(raw, source=raw["name"])
    try:
        check_method_fits(recipe)
    except UserError as e:  # e.g. BitFit on Llama, which has no biases: a fact to report, not a failure
        return {"skipped": str(e)}
    return run(recipe, Path(job["out"]), check_peft=job["workload"] == "smollm2")


def _own_recipe(method: str) -> dict:
    """The method's recipe as a dict; a combination is LoRA's recipe with every part's delta section."""
    from deltafit.recipe import load_recipe

    if method not in COMBINATIONS:
        return load_recipe(ROOT / "recipes" / f"{method}.yaml").to_dict()
    raw = load_recipe(ROOT / "recipes" / "lora.yaml").to_dict()
    raw["delta"] = [load_recipe(ROOT / "recipes" / f"{part}.yaml").to_dict()["delta"] for part in COMBINATIONS[method]]
    return raw


def _portable(delta):
    """A delta section without module names (a Llama recipe's names mean nothing on BERT), each part's
    for a composition."""
    if isinstance(delta, list):
        return [_portable(part) for part in delta]
    return {k: v for k, v in delta.items() if k not in MODULE_KEYS}


def check_method_fits(recipe) -> None:
    """Refuse (UserError) a method the model cannot take, before any training: `deltafit validate`'s check."""
    from deltafit.plan import make_plan

    make_plan(recipe)


def _schedule(method: str, steps: int) -> list[str]:
    return [f"{SCHEDULES[method]}={max(1, steps // 5)}"] if method in SCHEDULES else []


def _pop_lr_scale(sets: list[str]) -> float:
    """`train.lr_scale=F` (a report-only key): the workload's learning rate times F."""
    scale = [float(item.split("=", 1)[1]) for item in sets if item.startswith("train.lr_scale=")]
    sets[:] = [item for item in sets if not item.startswith("train.lr_scale=")]
    return scale[-1] if scale else 1.0


def run(recipe, out: Path, check_peft: bool) -> dict:
    import torch

    from deltafit import deltas
    from deltafit.evaluate import evaluate_checkpoint
    from deltafit.merge import merge_checkpoint
    from deltafit.plan import make_plan
    from deltafit.train import fit

    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    plan = make_plan(recipe)  # counts as `deltafit validate` shows them, right after attach
    started = time.time()
    final = fit(recipe, output_dir=out)
    method = deltas.build(recipe.delta)  # its facts as configured (a composition merges if all its parts do)
    result = {"trainable": plan["trainable"], "train_seconds": round(time.time() - started, 1),
              "stored_numbers": stored_numbers(final), "checkpoint_bytes": (final / "delta.safetensors").stat().st_size,
              "eval": {k: v for k, v in evaluate_checkpoint(str(final))[0].items() if isinstance(v, float)}}
    if method.name == "diff-pruning":  # kept entries over gated weights (the plan counts delta + gate logit each)
        result["density"] = stored_values(final) / (plan["delta_params"] / 2)
    if check_peft and method.mergeable:
        result["merge_max_abs_logit_diff"] = merge_checkpoint(str(final), str(out / "merged"))["max_abs_logit_diff"]
    if check_peft and method.peft_type:
        result["peft_max_abs_logit_diff"] = peft_roundtrip(final, out / "peft")
    return result


def peft_roundtrip(final: Path, adapter: Path) -> float:
    """Export the checkpoint to PEFT's format, load it with peft on a fresh base, and compare logits
    with deltafit's own model on a few Alpaca-style prompts (fp32, no padding)."""
    import torch
    from peft import PeftModel

    from deltafit.loading import attach_from_checkpoint, load_checkpoint, source_recipe
    from deltafit.model import build_model
    from deltafit.peft_io import export_checkpoint

    export_checkpoint(str(final), str(adapter))
    directory, meta, tensors = load_checkpoint(str(final))
    recipe = source_recipe(directory, meta)
    ours, tokenizer, _ = build_model(recipe.model)
    delta = attach_from_checkpoint(ours.eval(), meta, tensors)
    theirs = PeftModel.from_pretrained(build_model(recipe.model)[0], str(adapter)).eval()
    batch = tokenizer(["### Instruction:\nName three colors.\n\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        a = ours(**delta.prepare_inputs(dict(batch))).logits[:, -batch["input_ids"].shape[1]:]
        b = theirs(**batch).logits[:, -batch["input_ids"].shape[1]:]
    return (a - b).abs().max().item()


def stored_values(final: Path) -> int:
    """Entries of a sparse checkpoint: the numbers in its '*.values' tensors."""
    from safetensors import safe_open

    with safe_open(str(final / "delta.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".values"))


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
             f"Variants: {'; '.join(f'{k} = {m} ' + ' '.join(v) for k, (m, v) in VARIANTS.items())}. "
             f"Schedules scaled to a fifth of the run: {', '.join(SCHEDULES.values())}. "
             f"Overrides: {args.sets or 'none'}. Time: the whole job (load, train, eval, merge, export).", "",
             "| method | SmolLM2 trainable | SmolLM2 eval loss | merged vs unmerged | PEFT vs deltafit "
             "| checkpoint | time | SST-2 trainable | SST-2 dev acc | SST-2 checkpoint | time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in results):
        llm, cls = by.get((method, "smollm2"), {}), by.get((method, "sst2"), {})
        density = next((f" ({r['density']:.2%} dense)" for r in (llm, cls) if "density" in r), "")
        lines.append(f"| `{method}`{density} | {_n(llm.get('trainable'))} | {_f(llm.get('eval', {}).get('loss'), llm)} "
                     f"| {_f(llm.get('merge_max_abs_logit_diff'), llm, '.1e', 'n/a')} "
                     f"| {_f(llm.get('peft_max_abs_logit_diff'), llm, '.1e', 'n/a')} | {_size(llm)} | {_s(llm)} "
                     f"| {_n(cls.get('trainable'))} | {_f(cls.get('eval', {}).get('accuracy'), cls)} "
                     f"| {_size(cls)} | {_s(cls)} |")
    return "\n".join(lines) + "\n"


def _size(result) -> str:
    size = result.get("checkpoint_bytes")
    return "-" if size is None else f"{size / 2**20:.2f} MiB" if size >= 2**17 else f"{size / 2**10:.0f} KiB"


def _s(result) -> str:
    return f"{result['seconds']:.0f} s" if "seconds" in result else "-"


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "-"


def _f(x, result, spec=".4f", missing="-") -> str:
    if "skipped" in result:
        return "n/a"
    if "error" in result:
        return "error"
    return format(x, spec) if isinstance(x, float) else missing


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(RESULT + json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))), flush=True)
    else:
        main()
