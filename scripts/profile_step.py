"""Where a training step's time goes: torch.profiler over a few steps of a recipe, ops grouped by kind.

    python scripts/profile_step.py recipes/quickstart.yaml --set train.mixed_precision=bf16 [--steps 6]

Runs `deltafit train` in-process with hooks that step a `torch.profiler` schedule (2 warm-up steps,
then `--steps` recorded), then prints the top operators by self CPU time and a summary by kind:
matmuls, attention, elementwise/casts, random draws (dropout's masks), the loss, the optimizer,
everything else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

KINDS = [  # first match wins; op names as the profiler reports them (aten::...)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "aten::softmax",
                   "aten::_softmax")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("optimizer", ("_fused_adamw", "_foreach_", "Optimizer.step", "adamw")),
    ("random draws", ("aten::bernoulli", "aten::random_", "aten::uniform_", "aten::normal_")),  # dropout's masks
    ("casts/copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow", "aten::mean", "aten::neg",
                     "aten::cat", "aten::div", "aten::sub", "aten::where", "aten::fill_", "aten::zero_", "aten::sum",
                     "aten::index", "aten::embedding", "aten::threshold", "aten::dropout", "aten::exp",
                     "aten::sigmoid", "aten::sqrt", "aten::_foreach", "aten::native_layer_norm", "aten::gelu")),
]


def kind(name: str) -> str:
    for label, needles in KINDS:
        if any(n in name for n in needles):
            return label
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from deltafit.recipe import apply_override, read_recipe_file, recipe_from_dict
    from deltafit.train import TrainHooks, fit

    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=2, active=args.steps, repeat=1))
    hooks = TrainHooks(before_forward=lambda run, batch: prof.step())
    raw = read_recipe_file(Path(args.recipe))
    for item in args.set + [f"train.max_steps={args.steps + 3}", "log.progress=false"]:
        apply_override(raw, item)
    with tempfile.TemporaryDirectory() as out, prof:
        raw["output_dir"] = out
        fit(recipe_from_dict(raw, source=args.recipe), output_dir=Path(out), hooks=hooks)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    totals: dict[str, float] = {}
    for e in events:
        totals[kind(e.key)] = totals.get(kind(e.key), 0.0) + e.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    print(f"self CPU time by kind over {args.steps} steps ({torch.get_num_threads()} threads):")
    for label, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:13s} {us / 1e6 / args.steps:7.3f} s/step  {100 * us / whole:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
