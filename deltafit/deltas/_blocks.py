"""Transformer blocks as units of training: what `partial` and `lisa` share.

Block discovery is generic: the blocks are the children of the model's one block `nn.ModuleList`,
recognised by the same names `_targets.block_index` (and so every method's `layers` option) uses:
`model.layers` (Llama), `bert.encoder.layer` (BERT), `transformer.h` (GPT-2)... Models with two
block stacks (encoder-decoder) are refused: "the top block" is not defined there.

`BlockSchedule` is the shared lifecycle of a method whose delta is whole base blocks that open and
close on a schedule. Every tensor that will ever train is unfrozen at attach (so the trainer's
optimizer, built once right after attach, holds them all, and the key set of `state_dict` never
changes); the schedule is applied before the first training forward (`prepare_inputs` while the
model is in train mode), after every optimizer step (`on_step_end`) and on resume
(`load_schedule_state`). A closed block has requires_grad off and no gradient, so AdamW skips it:
no update, no weight decay, and no optimizer state is created for a block that never opened.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Optional

from torch import nn

from deltafit.deltas._inplace import InPlaceParams
from deltafit.deltas._targets import _normalize_layers, block_index, refuse_above
from deltafit.deltas.base import Delta, base_named_modules, base_named_parameters
from deltafit.errors import UserError

KINDS = ("attention", "mlp", "norm")


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(name of the block list, its blocks in order): the outermost ModuleList named like blocks."""
    lists = [n for n, m in base_named_modules(model) if isinstance(m, nn.ModuleList) and len(m) and
             block_index(f"{n}.0") == 0]
    outer = [n for n in lists if not any(n.startswith(other + ".") for other in lists)]
    if len(outer) != 1:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        found = f"several block stacks ({', '.join(outer)})" if outer else "no list of transformer blocks"
        raise UserError(f"methods 'partial' and 'lisa' train whole transformer blocks, but this model ({model_type}) "
                        f"has {found}; use a decoder-only or encoder-only model, or a targeted method (lora...)")
    return outer[0], list(model.get_submodule(outer[0]))


def block_params(model: nn.Module) -> list[dict[str, nn.Parameter]]:
    """Every block's parameters under their full model names, block by block."""
    prefix, blocks = find_blocks(model)
    return [{f"{prefix}.{i}.{n}": p for n, p in base_named_parameters(block)} for i, block in enumerate(blocks)]


def outside_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the blocks: embeddings, final norm, output head (tied tensors listed once)."""
    inside = {id(p) for params in block_params(model) for p in params.values()}
    return {n: p for n, p in base_named_parameters(model) if id(p) not in inside}


def chosen_indexes(model: nn.Module, layers: Optional[list[int]], top_k: int) -> list[int]:
    """Block indexes from `layers` (negative from the end) or the last `top_k`, ascending."""
    total = len(find_blocks(model)[1])
    if layers is not None:
        return sorted(_normalize_layers(model, layers))  # the `layers` rule and message every method uses
    refuse_above("delta.top_k", top_k, total, f"blocks asked for, the model has {total}")
    return list(range(total - top_k, total))


def module_kind(path: str, module: nn.Module) -> str:
    """'norm', 'attention' or 'mlp': a partition of a block's modules (path is relative to the block).
    Norms are recognised by class (BERT's attention.output.LayerNorm is a norm); everything else on an
    attention path is attention, the rest (feed-forward, BERT's intermediate/output) is the MLP."""
    if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
        return "norm"
    return "attention" if re.search(r"attn|attention", path) else "mlp"


def select_modules(block: nn.Module, prefix: str, wanted: Optional[list[str]]) -> dict[str, nn.Parameter]:
    """The block's parameters whose module is of a wanted kind or whose module path (relative to the
    block) equals or ends with '.' + a wanted suffix; all of them when `wanted` is None."""
    selected = {}
    for path, module in base_named_modules(block):
        for name, p in module.named_parameters(recurse=False):
            if wanted is None or _wanted(path, module, wanted):
                selected[f"{prefix}.{path}.{name}" if path else f"{prefix}.{name}"] = p
    return selected


def _wanted(path: str, module: nn.Module, wanted: list[str]) -> bool:
    kind = module_kind(path, module)
    return any(w == kind or path == w or path.endswith("." + w) for w in wanted)


def check_modules_exist(block: nn.Module, wanted: Optional[list[str]]) -> None:
    """Every `delta.modules` entry must select something in a block (a typo must not train nothing)."""
    for entry in wanted or []:
        if not select_modules(block, "", [entry]):
            names = sorted({p.rsplit(".", 1)[-1] for p, m in base_named_modules(block) if p and
                            any(True for _ in m.parameters(recurse=False))})
            raise UserError(f"recipe key 'delta.modules': {entry!r} matches nothing in a transformer block; "
                            f"valid: {', '.join(KINDS)} or a module name suffix ({', '.join(names[:12])})")


class BlockSchedule(Delta):
    """A delta made of whole base blocks (plus, for LISA, everything outside them) that open and close
    on a schedule; subclasses choose the tensors (`_choose`) and the open blocks per step (`open_at`)."""

    family = "specification"
    # Keep the starting values so detach gives back the base (cheap for a few blocks); LISA, whose
    # delta is the whole model, opts out like full fine-tuning.
    keep_originals: ClassVar[bool] = True

    def __init__(self, config):
        super().__init__(config)
        self.base_params = InPlaceParams()
        self.blocks: dict[int, dict[str, nn.Parameter]] = {}  # block index -> its tensors in the delta
        self.step = 0  # optimizer steps completed
        self.open: Optional[list[int]] = None  # blocks training now; None until the schedule first applies

    # -- what subclasses define --------------------------------------------------------------

    def _choose(self, model: nn.Module) -> tuple[dict[int, dict[str, nn.Parameter]], dict[str, nn.Parameter]]:
        """(scheduled tensors per block index, tensors that train all along)."""
        raise NotImplementedError

    def open_at(self, step: int) -> list[int]:
        """Block indexes that train in the optimizer step after `step` completed steps."""
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        self.blocks, always = self._choose(model)
        everything = dict(always)
        for params in self.blocks.values():
            everything.update(params)
        # Everything opens now: the optimizer is built from trainable_parameters() right after attach.
        self.base_params.unfreeze(everything, keep_originals=self.keep_originals)
        self.step, self.open = 0, None

    def _detach(self) -> None:
        self.base_params.restore()
        self.base_params.clear()
        self.blocks, self.open = {}, None

    def _merge(self) -> None:
        # The tensors already hold the trained values; only stop detach from restoring them.
        self.base_params.keep_trained()

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """The delta's tensors that train now (closed blocks are in `_extra_state`)."""
        return {n: p for n, p in self.base_params.params.items() if p.requires_grad}

    def _extra_state(self) -> dict:
        # Closed blocks are saved too: one key set for the whole run, and every tensor that trained.
        return {n: p.detach() for n, p in self.base_params.params.items() if not p.requires_grad}

    def expected_trainable_params(self, model: nn.Module) -> int:
        blocks, always = self._choose(model)
        tensors = {id(p): p for p in always.values()}
        tensors.update({id(p): p for params in blocks.values() for p in params.values()})
        return sum(p.numel() for p in tensors.values())

    # -- the schedule ------------------------------------------------------------------------

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # The first training forward: close what the schedule keeps closed for step 1, before any
        # gradient exists (no hook runs between the optimizer's creation and the first forward).
        if self.open is None and self.model is not None and self.model.training:
            self.apply_schedule()
        return batch

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.step = step
        self.apply_schedule()

    def apply_schedule(self) -> None:
        """Open the blocks `open_at(self.step)` names, close the others (and drop their gradients)."""
        opened = set(self.open_at(self.step))
        for index, params in self.blocks.items():
            for p in params.values():
                p.requires_grad_(index in opened)
                if index not in opened:
                    p.grad = None  # AdamW skips a tensor without a gradient: no update, no decay, no new state
        self.open = sorted(opened)

    def schedule_state(self) -> dict[str, Any]:
        return {"step": self.step, "open": sorted(self.open_at(self.step))}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.apply_schedule()
