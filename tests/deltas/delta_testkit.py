"""Helpers shared by the delta tests: tiny models, fixed batches, snapshots."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

PAD = 2  # "<pad>" in the conftest tokenizer (also present in the Llama one, which just has no pad_token set)
CAUSAL = ("llama", "gpt2")  # archs loaded as causal LMs (the others are BERT-style sequence classifiers)


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@dataclass
class Arch:
    """A tiny model for one task: how to load it, its task head, and a batch for it."""

    name: str
    pristine: nn.Module
    head: list[str] = field(default_factory=list)
    directory: Optional[Path] = None  # the model directory it was loaded from
    files: Optional[Path] = None  # where files made for this model go (FILE_OPTIONS), a temporary directory
    _made: dict = field(default_factory=dict, repr=False)

    @property
    def task(self) -> str:
        return "causal-lm" if self.name in CAUSAL else "seq-cls"

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.pristine)

    def batch(self) -> dict[str, torch.Tensor]:
        return make_batch(self.name)

    def file_options(self, method: str) -> dict:
        """The options of `method` that name files made for this model (FILE_OPTIONS; {} for most
        methods), made on first use and reused by every test of the module."""
        if method not in FILE_OPTIONS:
            return {}
        if method not in self._made:
            assert self.files is not None, f"load_arch(..., files=a temporary directory): '{method}' needs files"
            self._made[method] = FILE_OPTIONS[method](self, self.files / method)
        return self._made[method]


def load_arch(name: str, directory, files: Optional[Path] = None) -> Arch:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    torch.manual_seed(0)
    if name in CAUSAL:  # causal LM
        model, head = AutoModelForCausalLM.from_pretrained(directory), []
    else:  # BERT seq-cls: the pooler and classifier are missing from the checkpoint, so they are the head
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
        head = ["classifier", "bert.pooler"]
    return Arch(name, model.eval(), head, directory=Path(directory), files=files)


def make_batch(arch: str, size: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """Fixed token ids; row 1 right-padded, row 2 left-padded (both layouts must work)."""
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(5, 250, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    if arch in CAUSAL:
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1][:size])}


def forward(model: nn.Module, delta, batch: dict) -> torch.Tensor:
    """Logits of one forward pass, the way the trainer runs it (through prepare_inputs)."""
    with torch.no_grad():
        inputs = delta.prepare_inputs(batch) if delta is not None else batch
        return model(**inputs).logits


def perturb(delta, scale: float = 0.05, seed: int = 7) -> None:
    """Make every delta tensor non-trivial (LoRA's B and the adapters' W_up start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def train_step(model: nn.Module, delta, batch: dict) -> set[int]:
    """One AdamW step (lr 1e-2, no weight decay, so a tensor moves only if it got a gradient).

    Returns the ids of the parameters that got a non-zero gradient.
    """
    model.train()
    optimizer = torch.optim.AdamW(list(delta.trainable_parameters().values()), lr=1e-2, weight_decay=0.0)
    loss = model(**delta.prepare_inputs(batch)).loss
    loss.backward()
    got_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    return got_grad


def snapshot(model: nn.Module) -> dict:
    """Everything detach must give back: tensors, module tree, hooks, grad flags."""
    return {
        "tensors": {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
        "modules": [n for n, _ in model.named_modules()],
        "hooks": hook_count(model),
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def numel(params) -> int:
    return sum(p.numel() for p in params)


def trainer_parts(delta, total: int, weight_decay: float = 0.0):
    """The trainer's own AdamW and a constant schedule for `total` steps (weight decay would move a leaked tensor)."""
    from deltafit.recipe import TrainSpec
    from deltafit.train import build_optimizer, build_scheduler

    t = TrainSpec(lr=1e-2, weight_decay=weight_decay, max_steps=total, scheduler="constant")
    optimizer = build_optimizer(delta, t)
    return optimizer, build_scheduler(optimizer, t, total)


def deeper_llama(directory, blocks: int) -> nn.Module:
    """The tiny Llama of `directory` rebuilt with `blocks` blocks (random init, seed 0, eval mode)."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(directory)
    config.num_hidden_layers = blocks
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def block_of(name: str):
    """The block index in a parameter name (`...layers.3...` / `...layer.3...`), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def saved_checkpoint(directory, model_dir, delta: dict, task: str = "causal-lm", data_format: str = "alpaca",
                     scale: float = 0.2, train: dict | None = None, seed: int = 7):
    """(checkpoint dir, model, delta): a deltafit checkpoint of a freshly attached delta, perturbed by
    `scale` (noise drawn with `seed`) so that it changes the output, as `deltafit train` would write it."""
    from deltafit import checkpoint, deltas
    from deltafit.model import build_model
    from deltafit.recipe import recipe_from_dict

    quiet_transformers()
    data = {"train": "unused.json", "format": "classification" if task == "seq-cls" else data_format}
    recipe = recipe_from_dict({"model": {"name": str(model_dir), "task": task}, "data": data, "delta": delta,
                               "train": train or {}})
    model, _, head = build_model(recipe.model, num_labels=2 if task == "seq-cls" else None)
    torch.manual_seed(0)
    attached = deltas.build(recipe.delta)
    attached.attach(model, head=head)
    perturb(attached, scale=scale, seed=seed)
    meta = checkpoint.metadata(recipe, attached, None, step=1, epoch=0.0)
    return checkpoint.save(directory, meta, attached.state_dict(), recipe.to_dict()), model.eval(), attached


def fusion_sources(directory, model_dir, task: str, seeds: tuple[int, ...] = (7, 8)) -> list[str]:
    """Stage-1 checkpoints for AdapterFusion, one per seed: small adapters (bottleneck 8, base norms)
    perturbed away from zero and from each other (identical sources would give the attention nothing
    to choose between), saved as `deltafit train` saves them."""
    stage1 = {"method": "adapter", "bottleneck": 8, "train_layernorms": False}
    return [str(saved_checkpoint(Path(directory) / f"adapter-{seed}", model_dir, stage1, task=task, seed=seed)[0])
            for seed in seeds]


# Methods whose options name files that must first be made for the model at hand: method ->
# maker(arch, directory) -> options. AdapterFusion fuses stage-1 adapter checkpoints trained on that
# model. `Arch.file_options` runs each maker once per arch (the files go under `Arch.files`).
FILE_OPTIONS: dict[str, Callable[[Arch, Path], dict]] = {
    "adapter-fusion": lambda arch, where: {"adapters": fusion_sources(where, arch.directory, arch.task)},
}
