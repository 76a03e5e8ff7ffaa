"""The training loop: recipe in, delta-only checkpoint out.

Reads top to bottom like the run itself. Accelerate owns device placement, mixed precision,
gradient accumulation and multi-process launch; the delta method is reached only through the
Delta interface (attach, trainable_parameters, prepare_inputs, extra_loss, on_step_end), so
nothing here knows which method runs. `fit` builds one `Run` (everything the loop works with)
and every function after it takes that run.

Hooks, for benchmarks and tests (`TrainHooks`, every callback optional, each gets the `Run`):

    before_forward(run, batch)        each micro-batch, before its forward pass
    after_forward(run, batch, loss)   each micro-batch, after it (the loss tensor backward will use)
    during_save(run, tmp_dir)         each checkpoint (step, best and final), while it is written: every
                                      file is in the temporary directory `tmp_dir`, the metadata
                                      that marks it complete is not yet

Pass them to one run with `fit(recipe, hooks=TrainHooks(...))`, or to every run started inside a
block with `with use_hooks(TrainHooks(...)):` (e.g. `deltafit.cli.main([...])` in-process).
scripts/bench.py times steps with before/after_forward; tests/test_resume.py slows steps and kills
a run in the middle of a checkpoint write. An exception raised by a hook ends the run like one
raised by the loop (an OSError from during_save is a failed checkpoint write).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from deltafit import checkpoint, deltas, precision, sharding
from deltafit.bernoulli import faster_bernoulli
from deltafit.data import batch_tokens, make_collator, prepare_data, resolve_packing, use_packed_attention
from deltafit.errors import Interrupted, UserError
from deltafit.evaluate import evaluate_loop
from deltafit.fsutil import check_outside_checkpoints
from deltafit.limits import check_recipe_fits
from deltafit.metrics import MetricsLog
from deltafit.model import build_model, load_config, load_tokenizer, meta_model
from deltafit.recipe import EVAL_METRICS
from deltafit.recompute import RecomputedActivations

NO_DECAY = ("bias", "norm", "ln_", "layernorm")


@dataclass
class Progress:
    """Where the run is; saved in step checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    # Micro-batches of the current epoch already consumed, by all processes together, so a run
    # resumed with another number of processes skips the right amount of data.
    batches_in_epoch: int = 0
    tokens: int = 0
    skipped_steps: int = 0


@dataclass
class Watch:
    """One evaluated metric followed across the run: its best value, that value's step, and how many
    evaluations since have not beaten it by more than `min_delta`."""

    metric: str  # as metrics.jsonl names it (eval_loss...)
    mode: str  # 'min' or 'max'
    min_delta: float = 0.0
    patience: Optional[int] = None  # early stopping: stop after this many evaluations without improvement
    best: Optional[float] = None
    best_step: int = 0
    stale: int = 0

    def update(self, value: float, step: int) -> bool:
        """Count one evaluation; True when it is the new best. A NaN never is (nothing would beat it)."""
        if self.best is None:
            gain = math.inf
        else:
            gain = self.best - value if self.mode == "min" else value - self.best
        if math.isfinite(value) and gain > self.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "stale": self.stale}

    def restore(self, state: Optional[dict]) -> bool:
        """Take the saved state; False (starting afresh) for a watch of another metric (the recipe
        changed on resume): its values do not compare."""
        if not state or state.get("metric") != self.metric:
            return False
        self.best, self.best_step, self.stale = state["best"], state["best_step"], state["stale"]
        return True


@dataclass
class Selection:
    """What periodic evaluation decides: early stopping (train.early_stopping) and the best delta
    (train.keep_best). Saved in step checkpoints, the best delta's tensors included, so a resumed run
    decides exactly as an uninterrupted one, whatever the best/ directory holds by then."""

    stopping: Optional[Watch] = None
    keeping: Optional[Watch] = None
    best_tensors: Optional[dict] = None  # CPU copy of the delta at keeping.best_step
    best_epoch: int = 0

    @property
    def exhausted(self) -> bool:
        """Early stopping's patience ran out: training ends at this step."""
        return self.stopping is not None and self.stopping.exhausted

    def state(self) -> dict:
        return {"stopping": self.stopping and self.stopping.state(), "keeping": self.keeping and self.keeping.state(),
                "best_tensors": self.best_tensors, "best_epoch": self.best_epoch}

    def restore(self, state: Optional[dict]) -> None:
        state = state or {}
        if self.stopping:
            self.stopping.restore(state.get("stopping"))
        if self.keeping and self.keeping.restore(state.get("keeping")):
            self.best_tensors, self.best_epoch = state.get("best_tensors"), state.get("best_epoch", 0)


def _nothing(*args) -> None:
    return None


@dataclass
class TrainHooks:
    """Callbacks into the training loop (see the module docstring); the defaults do nothing."""

    before_forward: Callable[..., None] = _nothing  # (run, batch)
    after_forward: Callable[..., None] = _nothing  # (run, batch, loss)
    during_save: Callable[..., None] = _nothing  # (run, tmp_dir)


_installed_hooks: list[TrainHooks] = []


@contextmanager
def use_hooks(hooks: TrainHooks) -> Iterator[TrainHooks]:
    """`hooks` for every `fit` called inside the block without hooks of its own (the innermost block wins)."""
    _installed_hooks.append(hooks)
    try:
        yield hooks
    finally:
        _installed_hooks.remove(hooks)


@dataclass
class Run:
    """Everything one training run works with: built once by `fit`, handed to every step after it."""

    recipe: Any
    accelerator: Any
    model: Any  # as prepared by Accelerate (possibly wrapped)
    delta: Any
    optimizer: Any
    scheduler: Any
    train_rows: list
    collate: Callable
    eval_loader: Optional[DataLoader]
    progress: Progress
    total_steps: int
    log: MetricsLog
    output_dir: Path
    label_names: Optional[list[str]]
    hooks: TrainHooks = field(default_factory=TrainHooks)
    selection: Selection = field(default_factory=Selection)
    train_digest: str = ""  # Prepared.train_digest: step checkpoints record it for --resume's check


def fit(recipe, output_dir: Optional[Path] = None, resume: Optional[str] = None,
        hooks: Optional[TrainHooks] = None, overwrite: bool = False, allow_changes: bool = False) -> Path:
    """Train the recipe's delta and return the final checkpoint directory.

    `resume`: None, 'latest' (the newest step checkpoint in output_dir) or a step checkpoint's path.
    `hooks`: callbacks into the loop (module docstring); default: those of an enclosing `use_hooks`.
    `overwrite`: start afresh in an output directory that holds an earlier run's checkpoints (they
    are replaced as the new run writes its own); without it such a directory is refused.
    `allow_changes`: resume although the recipe changed keys that shape the delta or the data order.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = Path(output_dir or recipe.resolved_output_dir())
    t = recipe.train
    _check_trackers(recipe.log.trackers)
    selection = _selection(recipe)  # before any data or weights load
    # 1. Accelerate: precision, accumulation and (when launched so) several processes.
    _forget_single_process_state()
    # auto (the default) is bf16 where the hardware has native bf16 matmuls, else fp32: precision.py
    mixed_precision, precision_why = precision.resolve(t.mixed_precision)
    probe = deltas.build(recipe.delta)  # an unattached delta: its facts now, its fit on a weightless model below
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              kwargs_handlers=_ddp_kwargs(probe),
                              # Without a GPU, Accelerate only goes multi-process (gloo) when told cpu=True.
                              cpu=not torch.accelerator.is_available(),
                              log_with=recipe.log.trackers or None, project_dir=str(output_dir),
                              # total_steps counts optimizer steps whatever the number of processes:
                              # one scheduler step per optimizer step (Accelerate would take one per process).
                              step_scheduler_with_optimizer=False)
    if t.compile:
        _check_compiler(accelerator.device)  # before any data or weights load
    resume_from = _resume_checkpoint(output_dir, resume)
    _check_output_dir(output_dir, resume_from, overwrite)
    if overwrite and resume_from is None and accelerator.is_main_process:
        # The earlier run's step checkpoints would outnumber and outlive this run's (pruning and
        # --resume go by step number), and its best/ would pass for this run's; its final checkpoint
        # stays until this run's replaces it.
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(output_dir / BEST, ignore_errors=True)
    if resume_from is not None and not allow_changes:
        _check_unchanged(resume_from, recipe)
    if _sharded(accelerator) and (resume_from or t.save_every):
        raise UserError("train.save_every / --resume: step checkpoints with optimizer state are not supported under "
                        "Accelerate's FSDP or DeepSpeed (the final delta is gathered and saved); launch without that "
                        "Accelerate config and set train.fsdp: true (deltafit's own FSDP2, resumable), use DDP, or "
                        "set train.save_every: null")
    if accelerator.is_main_process:
        _check_writable(output_dir)
    set_seed(t.seed)
    # 2. Data first: classification labels decide the size of the model's head.
    tokenizer = load_tokenizer(recipe.model)
    # Causal-LM rows are packed when it saves compute, unless the recipe or the method says otherwise.
    probe.tokenizer = tokenizer
    packing = resolve_packing(recipe.data, recipe.model.task, probe)
    data = prepare_data(recipe.data.model_copy(update={"packing": packing}), tokenizer, recipe.model.task, t.seed,
                        label_names=_saved_labels(resume_from), batch_size=t.batch_size)
    if not data.train:
        dropped = data.stats.get("train_dropped")
        why = (f" ({dropped} dropped: nothing to learn in them, a blank output or nothing left after truncation "
               f"to data.max_length={recipe.data.max_length} tokens; fill in the outputs or raise data.max_length)"
               ) if dropped else ""
        raise UserError(f"data.train: '{recipe.data.train}' gave no training examples{why}")
    if (t.early_stopping or t.keep_best) and not data.eval:
        raise UserError(f"recipe key '{_selection_key(t)}': the evaluation data gave no examples to evaluate on")
    train_digest = data.train_digest()  # hashed once: the resume check and step checkpoints use it
    if resume_from is not None and not allow_changes:
        _check_same_rows(resume_from, train_digest)
    check_recipe_fits(recipe, load_config(recipe.model), data.label_names)  # before any weights load
    # The delta's sizes, and the conflicts between the deltas of a composition, on a weightless model.
    probe.check_fits(meta_model(recipe.model, num_labels=len(data.label_names or []) or None))
    # 3. Base model + delta; everything but the delta (and a fresh task head) is frozen.
    model, tokenizer, head = build_model(recipe.model, label_names=data.label_names, tokenizer=tokenizer)
    if t.gradient_checkpointing:
        _enable_checkpointing(model)
        model.enable_input_require_grads()
    delta = deltas.build(recipe.delta)
    delta.tokenizer = tokenizer
    delta.attach(model, head=head, restoring=resume_from is not None)
    if resume_from is not None:  # into whole tensors, before any sharding; _restore does the rest
        delta.load_state_dict(checkpoint.load(resume_from)[1])
    if data.packed:
        use_packed_attention(model)
    if accelerator.is_main_process:
        _check_space(output_dir, delta, t)
    # train.fsdp: deltafit shards the model itself (FSDP2), before the optimizer is built on its parameters.
    own_fsdp = t.fsdp and accelerator.num_processes > 1
    if own_fsdp:
        model = sharding.shard_model(model, accelerator, delta)
    if t.compile:  # after sharding, as FSDP2 wants; the state dict's names stay as they are
        _compile_blocks(model)
    # 4. Optimizer, schedule and loaders, then hand them all to Accelerate.
    collate = make_collator(tokenizer.pad_token_id, recipe.model.task)
    batches_per_process = math.ceil(math.ceil(len(data.train) / t.batch_size) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    delta.check_run(total_steps)  # a schedule that cannot fit is refused before the first step
    optimizer = build_optimizer(delta, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    eval_loader = None
    if data.eval:  # its own generator: creating an iterator must not draw from the global RNG (exact resume)
        eval_loader = DataLoader(data.eval, batch_size=t.batch_size, collate_fn=collate, generator=torch.Generator())
    if own_fsdp:  # already sharded: Accelerate must not wrap it in DDP
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = Progress()
    if resume_from is not None:
        progress = _restore(resume_from, delta, optimizer, scheduler, accelerator, selection)
    log = MetricsLog(output_dir, accelerator, recipe, total_steps, start_step=progress.step)
    log.announce(delta, data.stats, total_steps, resume_from, precision.line(mixed_precision, precision_why))
    hooks = hooks or (_installed_hooks[-1] if _installed_hooks else TrainHooks())
    run = Run(recipe, accelerator, model, delta, optimizer, scheduler, data.train, collate, eval_loader, progress,
              total_steps, log, output_dir, data.label_names, hooks, selection, train_digest)
    undo_casts = _cache_frozen_casts(model, mixed_precision, t, sharded=own_fsdp or _sharded(accelerator))
    # 5. The loop, then the final delta-only checkpoint (written once, by the main process) before
    # the final evaluation: whatever that evaluation meets (an unwritable cache...), the delta is saved.
    # A run stopped early evaluated its last step already. With keep_best, final/ then becomes the best.
    try:
        with faster_bernoulli():  # dropout's draws at the generator's bulk rate (bernoulli.py)
            _loop(run)
        final = _save(run, output_dir / "final", with_state=False)
        if not selection.exhausted:
            _maybe_eval(run)
        if selection.keeping:
            final = _final_best(run, final)
    finally:
        undo_casts()
        log.close()
    log.done(final)
    return final


def _cache_frozen_casts(model, mixed_precision: str, t, sharded: bool):
    """Under autocast, cast frozen linear weights and shared inputs once, not at every call
    (frozen_casts.py). With gradient checkpointing the inputs only (weight copies would outlive each
    block's recompute: memory it was asked to save); nothing under train.compile (its graphs cast
    inside) or sharding (each process holds only a shard)."""
    if mixed_precision == "no" or t.compile or sharded:
        return lambda: None
    from deltafit.frozen_casts import cache_frozen_casts

    return cache_frozen_casts(model, weights=not t.gradient_checkpointing)


def _enable_checkpointing(model) -> None:
    """Gradient checkpointing, non-reentrant. transformers 5.x renamed the switch
    (`activation_checkpointing_enable`; the old name warns and goes in v6): the new one where it exists."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _ddp_kwargs(delta) -> list:
    """DDP stops when a parameter it registered as trainable gets no gradient in a step. A delta whose
    trainable set changes during the run (Delta.trainables_change) has such steps by design, so DDP
    looks for them each step; their gradients stay None, as on one process (DDP leaves the gradient
    of a parameter no process used untouched), so AdamW skips them alike."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)] if delta.trainables_change else []


def _check_compiler(device) -> None:
    """train.compile on a CPU: inductor builds C++ kernels at the first step, so a missing compiler is
    said now, in one line, not as a traceback after the weights have loaded."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "c++", "clang++")))):
        raise UserError("recipe key 'train.compile': torch.compile on a CPU builds C++ kernels, and no C++ compiler "
                        "was found (g++, c++ or clang++ on PATH, or CXX); install one or set train.compile: false")


def _compile_blocks(model) -> None:
    """train.compile: torch.compile each transformer block in place. The blocks are alike, so dynamo
    compiles one graph and reuses it for all (regional compilation: seconds per block, not minutes
    for the whole model); dynamic shapes, because batch lengths vary from step to step."""
    from deltafit.deltas._blocks import find_blocks

    try:
        _, blocks = find_blocks(model)
    except UserError:  # no single stack of blocks (an encoder-decoder...): the whole model, one graph
        blocks = [model]
    for block in blocks:
        block.compile(dynamic=True)


def _loop(run: Run) -> None:
    t, accelerator, model, delta, progress = run.recipe.train, run.accelerator, run.model, run.delta, run.progress
    # Activation outputs are recomputed in backward from inputs kept anyway (same values, less memory).
    recomputed = RecomputedActivations().attach(model)
    model.train()
    with GracefulStop() as stop:
        # A run resumed from the checkpoint of the step early stopping ended at trains no further.
        while progress.step < run.total_steps and not run.selection.exhausted:
            for batch in _epoch_loader(run):
                with accelerator.accumulate(model):
                    run.hooks.before_forward(run, batch)
                    with recomputed.active():
                        loss = _forward(model, delta, batch)
                    run.hooks.after_forward(run, batch, loss)
                    accelerator.backward(loss)
                    run.log.micro_batch(loss.detach())
                    progress.batches_in_epoch += accelerator.num_processes
                    progress.tokens += batch_tokens(batch) * accelerator.num_processes
                    if not accelerator.sync_gradients:
                        continue
                    # The last micro-batch of an optimizer step: gradients are complete.
                    grad_norm = _clip(accelerator, delta, t.max_grad_norm)
                    nonfinite = _nonfinite(run.log.pending_loss(), grad_norm, accelerator.mixed_precision)
                    bad, stop_requested = _agree(accelerator, nonfinite, stop.requested)
                    if bad:
                        _on_nonfinite(run, grad_norm)
                    else:
                        delta.before_optimizer_step(progress.step + 1)
                        run.optimizer.step()
                    run.scheduler.step()  # also on a skipped step, so the lr stays a function of the step
                    run.optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                delta.on_step_end(progress.step, run.total_steps)
                run.log.step(progress.step, run.scheduler.get_last_lr()[0], grad_norm, progress.tokens, progress.epoch,
                             skipped=bool(bad))
                if progress.step >= run.total_steps:
                    return  # the last evaluation follows the final checkpoint (fit)
                _maybe_eval(run)
                if run.selection.exhausted:
                    _stopped_early(run)  # logged before the step checkpoint that records the decision
                if t.save_every and progress.step % t.save_every == 0:
                    _save_step(run)
                if run.selection.exhausted:
                    return
                if stop_requested:
                    raise _interrupted(run, stop.signum)
            progress.epoch += 1
            progress.batches_in_epoch = 0


def _forward(model, delta, batch) -> torch.Tensor:
    from deltafit.loss import causal_lm_loss  # imported here: edit kept in _forward

    # Causal LMs: chunked loss, never the full fp32 logits (same value; other models: their own loss).
    sharding.unshard(model)  # train.fsdp: prepare_inputs may use the input embeddings
    loss = causal_lm_loss(model, delta.prepare_inputs(dict(batch)))
    extra = delta.extra_loss()
    return loss if extra is None else loss + extra


def _epoch_loader(run: Run):
    """This epoch's batches in a seeded order, skipping those a resumed run already consumed."""
    t, progress, accelerator, rows = run.recipe.train, run.progress, run.accelerator, run.train_rows
    generator = torch.Generator().manual_seed(t.seed + progress.epoch)
    order = torch.randperm(len(rows), generator=generator).tolist()
    # A DataLoader without a generator draws a seed from the global RNG each time an iterator starts,
    # which a resumed run would do at a different point than the original: dropout would then differ.
    loader = DataLoader([rows[i] for i in order], batch_size=t.batch_size, collate_fn=run.collate, shuffle=False,
                        generator=generator)
    loader = accelerator.prepare(loader)
    if progress.batches_in_epoch:
        loader = accelerator.skip_first_batches(loader, progress.batches_in_epoch // accelerator.num_processes)
    return loader


def _clip(accelerator, delta, max_norm) -> Optional[float]:
    if not accelerator.sync_gradients:
        return None
    params = list(delta.trainable_parameters().values())
    if max_norm is None:  # under train.fsdp a shard's norm is partial: `full` reduces it over the processes
        norms = [sharding.full(p.grad.detach().norm()) for p in params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0
    return float(sharding.full(accelerator.clip_grad_norm_(params, max_norm)))


def _nonfinite(loss: float, grad_norm: Optional[float], mixed_precision: str) -> bool:
    """A NaN/inf loss, or gradient norm. Under fp16 the grad scaler skips inf gradients itself (that
    is how it calibrates its scale), so there only the loss counts."""
    grads_count = mixed_precision != "fp16" and grad_norm is not None
    return not math.isfinite(loss) or (grads_count and not math.isfinite(grad_norm))


def _agree(accelerator, bad: bool, stop_requested: bool) -> tuple[bool, bool]:
    """Every process must take the same decision, or a collective would hang: any one decides."""
    if accelerator.num_processes == 1:
        return bad, stop_requested
    flags = accelerator.reduce(torch.tensor([float(bad), float(stop_requested)], device=accelerator.device), "max")
    return bool(flags[0]), bool(flags[1])


def _on_nonfinite(run: Run, grad_norm: Optional[float]) -> None:
    progress = run.progress
    step = progress.step + 1
    what = f"loss {run.log.pending_loss()}, gradient norm {grad_norm}"
    if run.recipe.train.on_nonfinite == "skip":
        progress.skipped_steps += 1
        run.log.warn(f"step {step} skipped: non-finite {what} (train.on_nonfinite=skip; "
                     f"{progress.skipped_steps} skipped so far)")
        return
    last = checkpoint.latest_step_checkpoint(Path(run.output_dir) / "checkpoints")
    kept = f"the last good checkpoint {last} is intact" if last else "no step checkpoint was written (train.save_every)"
    raise UserError(f"training stopped at step {step}: non-finite {what}; {kept}. Lower train.lr, set "
                    f"train.max_grad_norm, prefer mixed_precision=bf16 over fp16, or set train.on_nonfinite=skip")


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to finish the current step, checkpoint and exit; a second
    SIGINT quits at once (without a new checkpoint: the last complete one still stands)."""

    def __init__(self):
        self.requested, self.signum, self._previous = False, 0, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.requested and signum == 2:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        from deltafit.metrics import console

        console.print("[yellow]stopping after this step and saving a checkpoint (Ctrl-C again quits without saving)[/]")


def _interrupted(run: Run, signum: int) -> Interrupted:
    directory = _save_step(run)
    return Interrupted(f"interrupted at step {run.progress.step}: saved {directory}.", signum,
                       ("--output", str(run.output_dir), "--resume"))


def _maybe_eval(run: Run) -> None:
    every, step = run.recipe.train.eval_every, run.progress.step
    if run.eval_loader is None or not (step == run.total_steps or (every and step % every == 0)):
        return
    run.model.eval()
    sharding.unshard(run.model)
    results = evaluate_loop(run.model, run.delta, run.eval_loader, run.recipe.model.task, run.accelerator)
    sharding.reshard(run.model)  # train.fsdp: no backward frees the root's gathered parameters
    run.model.train()
    run.log.eval(step, results)
    _select(run, results)


# ----------------------------------------------------------------------------------------------
# Early stopping and the best delta (train.early_stopping, train.keep_best)

BEST = "best"  # <output>/best: the best delta so far, while a keep_best run trains


def _selection(recipe) -> Selection:
    """The watches train.early_stopping and train.keep_best ask for. The recipe checked that periodic
    evaluation is on; here the data must hold evaluation rows and the metric be one this task logs."""
    t, task, data = recipe.train, recipe.model.task, recipe.data
    if not (t.early_stopping or t.keep_best):
        return Selection()
    if not (data.eval or data.eval_split or data.eval_fraction):
        raise UserError(f"recipe key '{_selection_key(t)}' needs evaluation data: set data.eval, data.eval_split or "
                        f"data.eval_fraction")
    stopping = keeping = None
    if t.early_stopping:
        es = t.early_stopping
        stopping = _watch(task, es.metric, es.mode, "train.early_stopping.metric", min_delta=es.min_delta,
                          patience=es.patience)
    if t.keep_best:
        metric = t.best_metric or (stopping.metric if stopping else None)
        keeping = _watch(task, metric, None, "train.best_metric (for train.keep_best)")
    return Selection(stopping, keeping)


def _selection_key(t) -> str:
    return "train.early_stopping" if t.early_stopping else "train.keep_best"


def _watch(task: str, metric: Optional[str], mode: Optional[str], key: str, **options) -> Watch:
    valid = EVAL_METRICS[task]
    metric = metric or next(iter(valid))
    if metric not in valid:
        raise UserError(f"recipe key '{key}': {metric} is not evaluated for model.task {task}; valid: "
                        f"{', '.join(valid)}")
    if mode not in (None, valid[metric]):
        raise UserError(f"recipe key 'train.early_stopping.mode': {metric} is better when it is "
                        f"{'lower' if valid[metric] == 'min' else 'higher'} (mode {valid[metric]}), not {mode}; "
                        f"leave mode out")
    return Watch(metric, valid[metric], **options)


def _select(run: Run, results: dict) -> None:
    """Count one evaluation for early stopping and keep_best. Every process sees the same (reduced)
    results, so all take the same decisions (copying the best delta is a collective under FSDP)."""
    selection, step = run.selection, run.progress.step
    value = lambda watch: float(results[watch.metric.removeprefix("eval_")])
    if selection.stopping:
        selection.stopping.update(value(selection.stopping), step)
    if selection.keeping and selection.keeping.update(value(selection.keeping), step):
        tensors = _delta_tensors(run.accelerator, run.model, run.delta, final=True)
        # A copy: state_dict tensors are views of parameters that go on training.
        selection.best_tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        selection.best_epoch = run.progress.epoch
        # On disk too: a run killed before its end leaves its best delta in best/.
        _write_checkpoint(run, run.output_dir / BEST, selection.best_tensors, _best_meta(run))


def _best_meta(run: Run) -> dict:
    """Metadata of the best delta: its own step and epoch, and what made it the best."""
    selection, watch = run.selection, run.selection.keeping
    meta = checkpoint.metadata(run.recipe, run.delta, run.label_names, watch.best_step, selection.best_epoch)
    return {**meta, "best": {"metric": watch.metric, "value": watch.best, "mode": watch.mode, "step": watch.best_step,
                             "trained_steps": run.progress.step}}


def _final_best(run: Run, last: Path) -> Path:
    """final/ becomes the best evaluated delta (it held the last); best/ is then redundant."""
    selection, watch = run.selection, run.selection.keeping
    if selection.best_tensors is None:  # every evaluation was NaN
        run.log.warn(f"train.keep_best: no finite {watch.metric} was evaluated; {last} holds the last delta")
        return last
    final = _write_checkpoint(run, last, selection.best_tensors, _best_meta(run))
    run.log.warn(f"train.keep_best: {final} holds the best delta, {watch.metric} {watch.best:.6g} at step "
                 f"{watch.best_step} (of {run.progress.step})")
    if run.accelerator.is_main_process:
        shutil.rmtree(run.output_dir / BEST, ignore_errors=True)
    return final


def _stopped_early(run: Run) -> None:
    """Say why training ends here, in the terminal and in metrics.jsonl."""
    watch, step = run.selection.stopping, run.progress.step
    best = "none finite" if watch.best is None else f"best {watch.best:.6g} at step {watch.best_step}"
    run.log.event(f"early stopping at step {step} of {run.total_steps}: {watch.metric} did not improve by more than "
                  f"{watch.min_delta:g} in {watch.stale} evaluations ({best}; train.early_stopping.patience="
                  f"{watch.patience})",
                  {"step": step, "early_stopping": "stopped", "metric": watch.metric, "best": watch.best,
                   "best_step": watch.best_step, "evaluations_without_improvement": watch.stale,
                   "patience": watch.patience})


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(delta, t) -> torch.optim.Optimizer:
    """AdamW with weight decay only on matrices: never on biases, norms or 1-d vectors. Each of the
    delta's groups (one per delta of a composition) has its own lr and weight decay, default train's."""
    groups = []
    for params, lr, weight_decay in delta.optimizer_groups():
        decay, no_decay = [], []
        for name, p in params.items():
            (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
        lr = t.lr if lr is None else lr
        weight_decay = t.weight_decay if weight_decay is None else weight_decay
        groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)


def build_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume


def _save_step(run: Run) -> Path:
    directory = _save(run, checkpoint.step_dir(run.output_dir, run.progress.step), with_state=True)
    if run.accelerator.is_main_process:
        checkpoint.prune(run.output_dir, run.recipe.train.keep_last)
    return directory


def _save(run: Run, directory: Path, with_state: bool) -> Path:
    """A checkpoint of the delta (+ trainer state for a step checkpoint); every process calls this.
    Under train.fsdp every process writes its slices of the optimizer state beside the checkpoint
    (sharding.py); the main process moves them in before the checkpoint is marked complete."""
    accelerator, delta, progress = run.accelerator, run.delta, run.progress
    tensors = _delta_tensors(accelerator, run.model, delta, final=not with_state)  # every process takes part
    meta = checkpoint.metadata(run.recipe, delta, run.label_names, progress.step, progress.epoch)
    if with_state:
        meta[TRAIN_DIGEST] = run.train_digest
    state, shards = None, ()
    if with_state and not _sharded(accelerator):
        optimizer, slices, layout = sharding.split_shards(run.optimizer.state_dict(), accelerator.process_index)
        if _agree(accelerator, bool(slices), False)[0]:
            shards = sharding.shard_files(sharding.staging_dir(directory), accelerator.num_processes)
            try:
                sharding.write_shards(shards[0].parent, accelerator.process_index, slices, layout)
            except OSError:
                pass  # the main process finds this shard missing: the checkpoint fails on every process
        state = {"optimizer": optimizer, "scheduler": run.scheduler.state_dict(), "progress": progress.__dict__,
                 "method": delta.schedule_state(), "selection": run.selection.state()}
    return _write_checkpoint(run, directory, tensors, meta, state if accelerator.is_main_process else None, shards)


def _write_checkpoint(run: Run, directory: Path, tensors: dict, meta: dict, state: Optional[dict] = None,
                      shards: tuple[Path, ...] = ()) -> Path:
    """Write a checkpoint from the main process; every process calls this and learns whether it failed."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    failure = None
    if accelerator.is_main_process:
        try:
            checkpoint.save(directory, meta, tensors, run.recipe.to_dict(), state,
                            before_metadata=lambda tmp: run.hooks.during_save(run, tmp), shard_files=shards)
        except UserError as e:
            failure = e
        finally:
            if shards:
                shutil.rmtree(shards[0].parent, ignore_errors=True)
    # If the main process failed (disk full), every process must stop, not wait for it forever.
    if _agree(accelerator, failure is not None, False)[0]:
        raise failure or UserError(f"the main process could not write checkpoint '{directory}'")
    return directory


def _sharded(accelerator) -> bool:
    """FSDP and DeepSpeed split parameters (and optimizer state) across processes."""
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def _delta_tensors(accelerator, model, delta, final: bool) -> dict:
    """The delta's full tensors. Under FSDP/DeepSpeed each process holds only a shard of every
    parameter, so they are gathered first (a collective: all processes call this)."""
    own = sharding.full_tensors(delta.final_state_dict() if final else delta.state_dict())  # train.fsdp's shards
    if not _sharded(accelerator):
        return own
    from deltafit.deltas.base import HEAD_PREFIX

    full = accelerator.get_state_dict(model)  # the prepared (wrapped) model
    model_key = lambda k: k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX) else k
    # Buffers the model does not list (regenerated projections) are the same on every process.
    return {k: full.get(model_key(k), v) for k, v in own.items()} if accelerator.is_main_process else {}


def _resume_checkpoint(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """None, or the step checkpoint to continue from (`--resume` alone = 'latest' in output_dir)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint.latest_step_checkpoint(output_dir / "checkpoints")
        if found is None:
            raise UserError(f"--resume: no complete step checkpoint under '{output_dir / 'checkpoints'}' "
                            f"(set train.save_every to write them)")
        return found
    directory = checkpoint.find_checkpoint(resume)
    if not (directory / checkpoint.TRAINER).is_dir():
        raise UserError(f"--resume '{resume}': '{directory}' holds no trainer state "
                        f"(only step checkpoints can be resumed)")
    return directory


def _saved_labels(resume_from: Optional[Path]):
    return checkpoint.read_meta(resume_from).get("label_names") if resume_from else None


def _restore(directory: Path, delta, optimizer, scheduler, accelerator, selection: Selection) -> Progress:
    """Trainer state from a step checkpoint (fit loaded the delta's tensors, before any sharding)."""
    state = checkpoint.load_trainer_state(directory)
    optimizer.load_state_dict(state["optimizer"])  # whole tensors, whatever the checkpoint's number of processes
    sharding.reshard_optimizer_state(optimizer)  # train.fsdp: each process keeps its slice
    scheduler.load_state_dict(state["scheduler"])
    delta.load_schedule_state(state["method"])
    selection.restore(state["selection"])
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


def _check_space(output_dir: Path, delta, t) -> None:
    """Refuse to start a run whose checkpoints cannot fit: better now than after hours of training.
    Counts the final checkpoint plus keep_last step checkpoints (+1 being written), with 10% slack;
    keep_best adds best/ and a copy of the best delta in each step checkpoint."""

    tensors = delta.state_dict()
    steps = (t.keep_last + 1) if t.save_every else 0
    one = checkpoint.estimated_bytes(tensors, False)
    per_step = checkpoint.estimated_bytes(tensors, True) + (one if t.keep_best else 0)
    needed = int(1.1 * (one * (2 if t.keep_best else 1) + steps * per_step))
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f"--output '{output_dir}': {free / 2**20:.0f} MiB free, the checkpoints need about "
                        f"{needed / 2**20:.0f} MiB (lower train.keep_last, or choose another --output)")


def _check_output_dir(output_dir: Path, resume_from: Optional[Path], overwrite: bool) -> None:
    """A new run must not silently replace an earlier run's checkpoints, nor write into a checkpoint."""
    check_outside_checkpoints(output_dir)
    if resume_from is not None or overwrite:
        return
    earlier = [p for p in (output_dir / "final", checkpoint.latest_step_checkpoint(output_dir / "checkpoints"),
                           output_dir / BEST)
               if p is not None and (p / checkpoint.META).is_file()]
    if earlier:
        raise UserError(f"--output '{output_dir}' already holds a trained run ({earlier[0]}); continue it with "
                        f"--resume, choose another --output, or pass --overwrite to train afresh and replace it")


# Recipe keys a resumed run must share with the checkpoint it continues: they shape the delta, its
# math or the data order (the saved position counts micro-batches of batch_size). lr, max_steps,
# epochs, eval and logging may change (e.g. training longer), and so may grad_accum: resuming on
# another number of processes changes it to keep the examples per optimizer step.
RESUME_KEYS = ("delta", "model", "data.train", "data.config", "data.split", "data.eval_fraction",
               "data.max_train_examples", "data.train_on_inputs", "data.columns", "data.delimiter",
               "data.prompt_template", "data.format", "data.text_column", "data.text_pair_column",
               "data.label_column", "data.prompt_column", "data.messages_column", "data.instruction_column",
               "data.input_column", "data.output_column", "data.max_length", "data.packing",
               "train.seed", "train.batch_size", "train.mixed_precision")
# Beyond the keys, a step checkpoint records a hash of the training rows (Prepared.train_digest):
# the same recipe over a data file rewritten in place is no longer the run being resumed.
TRAIN_DIGEST = "train_rows_sha256"


def _check_same_rows(resume_from: Path, digest: str) -> None:
    saved = checkpoint.read_meta(resume_from).get(TRAIN_DIGEST)
    if saved is not None and saved != digest:  # None: a checkpoint from before the hash was recorded
        raise UserError(f"--resume: the training rows differ from those the checkpoint {resume_from} was trained "
                        f"on (data.train's file changed, or a key that shapes the rows); resuming would not continue "
                        f"that run. Restore the data, start a new run with another --output, or pass --allow-changes "
                        f"to resume anyway")


def _check_unchanged(resume_from: Path, recipe) -> None:
    # Both with absolute paths: the checkpoint records them so, and the recipe may name them relatively.
    saved = checkpoint.absolute_paths(checkpoint.read_recipe_dict(resume_from))
    now = checkpoint.absolute_paths(recipe.to_dict())
    for key in RESUME_KEYS:
        before, after = _at(saved, key), _at(now, key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            pairs = [(f"{key}.{k}", before.get(k), after.get(k)) for k in changed]
        else:
            pairs = [(key, before, after)] if _comparable(key, before) != _comparable(key, after) else []
        if pairs:
            name, was, is_now = pairs[0]
            raise UserError(f"--resume: recipe key '{name}' is {is_now!r} but the checkpoint {resume_from} was "
                            f"trained with {was!r}; resuming would not continue that run. Restore it, start a new "
                            f"run with another --output, or pass --allow-changes to resume anyway")


def _comparable(key: str, value):
    """A resume key's value as training used it: a precision is what it resolves to on this machine
    (a run saved with "no" resumes under `auto` where auto means fp32, and not where it means bf16)."""
    if key == "train.mixed_precision" and isinstance(value, str):
        return precision.resolve(value)[0]
    return value


def _at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output '{output_dir}' is not writable ({e.strerror})") from None
