"""The training loop: recipe in, delta-only checkpoint out.

Reads top to bottom like the run itself. Accelerate owns device placement, mixed precision,
gradient accumulation and multi-process launch; the delta method is reached only through the
Delta interface (attach, trainable_parameters, prepare_inputs, extra_loss, on_step_end), so
nothing here knows which method runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from deltafit import checkpoint, deltas
from deltafit.data import make_collator, prepare_data
from deltafit.errors import UserError
from deltafit.evaluate import evaluate_loop
from deltafit.metrics import MetricsLog
from deltafit.model import build_model, load_tokenizer

NO_DECAY = ("bias", "norm", "ln_", "layernorm")


@dataclass
class Progress:
    """Where the run is; saved in step checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0


def fit(recipe, output_dir: Optional[Path] = None, resume: Optional[str] = None) -> Path:
    """Train the recipe's delta and return the final checkpoint directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = Path(output_dir or recipe.resolved_output_dir())
    t = recipe.train
    _check_trackers(recipe.log.trackers)
    # 1. Accelerate: precision, accumulation and (when launched so) several processes.
    _forget_single_process_state()
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              log_with=recipe.log.trackers or None, project_dir=str(output_dir))
    resume_from = _resume_checkpoint(output_dir, resume)
    if accelerator.is_main_process:
        _check_writable(output_dir)
    set_seed(t.seed)
    # 2. Data first: classification labels decide the size of the model's head.
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.model.task, t.seed, label_names=_saved_labels(resume_from))
    if not data.train:
        dropped = data.stats.get("train_dropped")
        why = f" ({dropped} dropped: nothing left to learn after truncation, raise data.max_length)" if dropped else ""
        raise UserError(f"data.train: '{recipe.data.train}' gave no training examples{why}")
    # 3. Base model + delta; everything but the delta (and a fresh task head) is frozen.
    model, tokenizer, head = build_model(recipe.model, label_names=data.label_names, tokenizer=tokenizer)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    delta = deltas.build(recipe.delta)
    delta.tokenizer = tokenizer
    delta.attach(model, head=head)
    # 4. Optimizer, schedule and loaders, then hand them all to Accelerate.
    collate = make_collator(tokenizer.pad_token_id, recipe.model.task)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / t.batch_size) / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = build_optimizer(delta, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    eval_loader = DataLoader(data.eval, batch_size=t.batch_size, collate_fn=collate) if data.eval else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = Progress()
    if resume_from is not None:
        progress = _restore(resume_from, delta, optimizer, scheduler, accelerator)
    log = MetricsLog(output_dir, accelerator, recipe, total_steps, start_step=progress.step)
    log.announce(delta, data.stats, total_steps, resume_from)
    # 5. The loop.
    try:
        _loop(recipe, accelerator, model, delta, optimizer, scheduler, data.train, collate, eval_loader,
              progress, total_steps, log, output_dir, data.label_names)
    finally:
        log.close()
    # 6. Final delta-only checkpoint, written once, by the main process.
    final = _save(recipe, delta, accelerator, data.label_names, progress, output_dir / "final", with_state=False)
    log.done(final)
    return final


def _loop(recipe, accelerator, model, delta, optimizer, scheduler, train_rows, collate, eval_loader,
          progress, total_steps, log, output_dir, label_names):
    t = recipe.train
    model.train()
    while progress.step < total_steps:
        loader = _epoch_loader(train_rows, collate, t, progress, accelerator)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = _forward(model, delta, batch)
                accelerator.backward(loss)
                grad_norm = _clip(accelerator, delta, t.max_grad_norm)
                if accelerator.sync_gradients:
                    delta.before_optimizer_step(progress.step + 1)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_in_epoch += 1
            progress.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            log.micro_batch(loss.detach())
            if not accelerator.sync_gradients:
                continue
            # One optimizer step has completed.
            progress.step += 1
            _check_finite(log, progress.step)
            delta.on_step_end(progress.step, total_steps)
            log.step(progress.step, scheduler.get_last_lr()[0], grad_norm, progress.tokens, progress.epoch)
            _maybe_eval(recipe, accelerator, model, delta, eval_loader, progress, total_steps, log)
            if t.save_every and progress.step % t.save_every == 0 and progress.step < total_steps:
                _save(recipe, delta, accelerator, label_names, progress, checkpoint.step_dir(output_dir, progress.step),
                      with_state=True, optimizer=optimizer, scheduler=scheduler)
                if accelerator.is_main_process:
                    checkpoint.prune(output_dir, t.keep_last)
            if progress.step >= total_steps:
                return
        progress.epoch += 1
        progress.batches_in_epoch = 0


def _forward(model, delta, batch) -> torch.Tensor:
    outputs = model(**delta.prepare_inputs(dict(batch)))
    extra = delta.extra_loss()
    return outputs.loss if extra is None else outputs.loss + extra


def _epoch_loader(rows, collate, t, progress, accelerator):
    """This epoch's batches in a seeded order, skipping those a resumed run already consumed."""
    generator = torch.Generator().manual_seed(t.seed + progress.epoch)
    order = torch.randperm(len(rows), generator=generator).tolist()
    loader = DataLoader([rows[i] for i in order], batch_size=t.batch_size, collate_fn=collate, shuffle=False)
    loader = accelerator.prepare(loader)
    if progress.batches_in_epoch:
        loader = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
    return loader


def _clip(accelerator, delta, max_norm) -> Optional[float]:
    if not accelerator.sync_gradients:
        return None
    params = list(delta.trainable_parameters().values())
    if max_norm is None:
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0
    return float(accelerator.clip_grad_norm_(params, max_norm))


def _check_finite(log, step: int) -> None:
    if not math.isfinite(log.last_loss):
        raise UserError(f"training diverged: the loss at step {step} is {log.last_loss} "
                        f"(lower train.lr, set train.max_grad_norm, or use mixed_precision=bf16 instead of fp16)")


def _maybe_eval(recipe, accelerator, model, delta, eval_loader, progress, total_steps, log) -> None:
    every = recipe.train.eval_every
    if eval_loader is None or not (progress.step == total_steps or (every and progress.step % every == 0)):
        return
    model.eval()
    results = evaluate_loop(model, delta, eval_loader, recipe.model.task, accelerator)
    model.train()
    log.eval(progress.step, results)


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(delta, t) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices: never on biases, norms or 1-d vectors."""
    decay, no_decay = [], []
    for name, p in delta.trainable_parameters().items():
        (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)


def build_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume


def _save(recipe, delta, accelerator, label_names, progress, directory, with_state, optimizer=None, scheduler=None):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = checkpoint.metadata(recipe, delta, label_names, progress.step, progress.epoch)
        state = None
        if with_state:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "progress": progress.__dict__, "method": delta.schedule_state()}
        tensors = delta.state_dict() if with_state else delta.final_state_dict()
        checkpoint.save(directory, meta, tensors, recipe.to_dict(), state)
    accelerator.wait_for_everyone()
    return directory


def _resume_checkpoint(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """None, or the step checkpoint to continue from (`--resume` alone = latest in output_dir)."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = checkpoint.latest_step_checkpoint(output_dir / "checkpoints")
        if found is None:
            raise UserError(f"--resume: no complete step checkpoint under '{output_dir / 'checkpoints'}' "
                            f"(set train.save_every to write them)")
        return found
    directory = checkpoint.find_checkpoint(resume)
    if not (directory / checkpoint.TRAINER).is_dir():
        raise UserError(f"--resume '{resume}': '{directory}' holds no trainer state (only step checkpoints can be resumed)")
    return directory


def _saved_labels(resume_from: Optional[Path]):
    return checkpoint.read_meta(resume_from).get("label_names") if resume_from else None


def _restore(directory: Path, delta, optimizer, scheduler, accelerator) -> Progress:
    _, tensors = checkpoint.load(directory)
    delta.load_state_dict(tensors)
    state = checkpoint.load_trainer_state(directory)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    delta.load_schedule_state(state["method"])
    accelerator.print(f"resumed from {directory} at step {state['progress']['step']}")
    return Progress(**state["progress"])


def _forget_single_process_state() -> None:
    """Let a second `fit` in the same Python process choose its own precision.

    Accelerate keeps its state process-wide and refuses a different mixed_precision once set. In a
    plain (non-launched) process nothing is shared with other ranks, so dropping it is safe; under a
    distributed launch the state is left alone.
    """
    from accelerate.state import AcceleratorState, DistributedType, GradientState

    if AcceleratorState._shared_state and AcceleratorState().distributed_type == DistributedType.NO:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _check_trackers(trackers) -> None:
    """Accelerate silently drops trackers whose package is missing; the user asked for it, so say so."""
    from importlib.util import find_spec

    for name in trackers:
        if not any(find_spec(module) for module in TRACKER_PACKAGES[name]):
            raise UserError(f"recipe key 'log.trackers': '{name}' needs the {TRACKER_PACKAGES[name][0]} package "
                            f"(pip install {TRACKER_PACKAGES[name][0]}), or remove it from log.trackers")


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output '{output_dir}' is not writable ({e.strerror})") from None
