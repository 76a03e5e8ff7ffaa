"""Where training metrics go: a rich progress bar, metrics.jsonl, and Accelerate trackers.

Only the main process writes or prints, so a multi-process run shows one bar and one log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deltafit.allocator import describe

console = Console(stderr=True, soft_wrap=True)


class MetricsLog:
    def __init__(self, output_dir: Path, accelerator, recipe, total_steps: int, start_step: int = 0):
        self.main = accelerator.is_main_process
        self.accelerator = accelerator
        self.every = recipe.train.log_every
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl" if recipe.log.jsonl else None
        self._sum, self._count, self.last_loss = 0.0, 0, 0.0
        self._mark = (time.perf_counter(), 0)
        if self.main and self.path:
            _truncate_after(self.path, start_step)  # a resumed run rewrites nothing twice
        if self.main and recipe.log.trackers:
            accelerator.init_trackers(recipe.name or "deltafit", config=_flat(recipe.to_dict()))
        self.bar = _progress_bar() if self.main and recipe.log.progress else None
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="") if self.bar else None
        if self.bar:
            self.bar.start()

    def announce(self, delta, stats: dict, total_steps: int, resume_from, precision_line: str = "") -> None:
        if not self.main:
            return
        if precision_line:
            console.print(precision_line)
        trainable = sum(p.numel() for p in delta.trainable_parameters().values())
        total = sum(p.numel() for p in delta.model.parameters())
        console.print(f"[bold]{delta.name}[/]: {trainable:,} trainable / {total:,} parameters "
                      f"({100 * trainable / total:.4f}%), {total_steps} steps"
                      + (f" on {self.accelerator.num_processes} processes"
                         if self.accelerator.num_processes > 1 else "")
                      + (f", resuming from {resume_from}" if resume_from else "") + f"; malloc: {describe()}")
        shown = {k: v for k, v in stats.items() if v and not k.startswith("train_padding")}
        console.print("data: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        if stats.get("train_padding") is not None:
            console.print(_packing_line(stats))
        if stats.get("train_truncated"):
            console.print(f"[yellow]{stats['train_truncated']} training examples were truncated to data.max_length[/]")
        if stats.get("train_dropped"):
            console.print(f"[yellow]{stats['train_dropped']} training rows were left out: nothing to learn in them (a "
                          f"blank output, or nothing left after truncation to data.max_length)[/]")

    def micro_batch(self, loss) -> None:
        self._sum += float(loss)  # a NaN here stays NaN in the step's mean, which the trainer checks
        self._count += 1

    def pending_loss(self) -> float:
        """Mean loss of the micro-batches of the step in progress (this process's)."""
        return self._sum / max(self._count, 1)

    def warn(self, message: str) -> None:
        if self.main:
            (self.bar.console if self.bar else console).print(f"[yellow]{message}[/]")

    def step(self, step: int, lr: float, grad_norm: Optional[float], tokens: int, epoch: int,
             skipped: bool = False) -> None:
        loss = self.pending_loss()
        self.last_loss = loss
        self._sum, self._count = 0.0, 0
        if not self.main:
            return
        now = time.perf_counter()
        tokens_per_s = (tokens - self._mark[1]) / max(now - self._mark[0], 1e-9)
        self._mark = (now, tokens)
        if self.bar:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s")
        if step % self.every == 0 or step == self.total_steps or step == 1 or skipped:
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens, "tokens_per_s": tokens_per_s}
            if skipped:
                record["skipped"] = True
            self._write(record)

    def eval(self, step: int, results: dict) -> None:
        if not self.main:
            return
        self._write({"step": step, **{f"eval_{k}": v for k, v in results.items()}})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
        (self.bar.console if self.bar else console).print(f"step {step} eval: {shown}")

    def event(self, message: str, record: dict) -> None:
        """Something that changes the run (early stopping): a line in the terminal and a record in metrics.jsonl."""
        self.warn(message)
        if self.main:
            self._write(record)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        if self.main and self.accelerator.trackers:
            self.accelerator.end_training()

    def done(self, final: Path) -> None:
        if self.main:
            console.print(f"[green]saved[/] {final}\n  evaluate: deltafit eval {final}"
                          f"\n  compare:  deltafit eval {final} --base")

    def _write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def _packing_line(stats: dict) -> str:
    """Examples -> rows and the padding share of batch positions, before and after packing."""
    if stats.get("train_packed_rows") is None:
        why = ""
        if stats.get("train_padding_if_packed") is not None:
            why = f" (packed rows would pad {100 * stats['train_padding_if_packed']:.1f}% of batch positions)"
        return f"packing: off{why}, {stats['train_examples']} examples, {100 * stats['train_padding']:.1f}% padding"
    examples, rows = stats["train_examples"], stats["train_packed_rows"]
    return (f"packing: {examples} examples -> {rows} rows ({examples / rows:.2f} per row), padding "
            f"{100 * stats['train_padding_unpacked']:.1f}% -> {100 * stats['train_padding']:.1f}% of batch positions")


def _progress_bar() -> Progress:
    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=False)


def _truncate_after(path: Path, step: int) -> None:
    """Drop records after `step` (left by a killed run that is now resuming from `step`)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
