"""Partial fine-tuning: only chosen transformer blocks (plus the task head) train; optionally
opened one at a time from the top down (gradual unfreezing, Howard & Ruder 2018, ULMFiT).

Which blocks: `layers` (indexes, negative from the end) or `top_k` (the last k; 2 when neither is
set), not both. `modules` narrows every chosen block to some of its parts: the kinds 'attention',
'mlp', 'norm' (a partition of the block: norms by class, attention by an attn/attention module
path, the rest is the MLP) and/or module name suffixes relative to the block (q_proj,
self_attn.o_proj, output.dense...). For a causal LM nothing outside the blocks trains (the task
head is only a new classifier, which `attach` trains anyway).

Gradual unfreezing (`unfreeze_every: N`): steps 1..N train only the top chosen block, steps N+1..2N
the top two, and so on down to the lowest chosen block, which stays open to the end. The chosen
set is the final set and the limit. Blocks not yet open have requires_grad off and never had a
gradient, so AdamW holds no state for them (see `_blocks.BlockSchedule`). The open set is a
function of the optimizer step, which the schedule state saves: resume is exact across an
unfreezing step. A run too short to open every chosen block is refused (`check_run`).

The tensors are the model's own, trained in place: the checkpoint holds the chosen blocks' tensors
(all of them, open yet or not, so the key set never changes); `merge()` keeps the trained values
(nothing to fold); `detach()` restores the starting values kept at attach (a copy of the chosen
blocks only). Not exportable to PEFT (PEFT has no "train these base blocks" adapter type).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._blocks import BlockSchedule, check_modules_exist, chosen_indexes, find_blocks, select_modules
from deltafit.deltas.base import DeltaConfig
from deltafit.errors import UserError

DEFAULT_TOP_K = 2


class PartialConfig(DeltaConfig):
    method: Literal["partial"] = "partial"
    layers: Optional[list[int]] = Field(
        None, description="Blocks that train, by index (negative counts from the end, e.g. [-2, -1]). "
        "Set this or top_k, not both."
    )
    top_k: Optional[int] = Field(
        None, ge=1, description=f"Train the last top_k blocks (default {DEFAULT_TOP_K} when layers is not set)."
    )
    modules: Optional[list[str]] = Field(
        None, description="Only these parts of every chosen block: the kinds attention, mlp, norm, and/or module "
        "name suffixes relative to the block (q_proj, self_attn.o_proj...). Default: the whole block."
    )
    unfreeze_every: Optional[int] = Field(
        None, ge=1, description="Gradual unfreezing (ULMFiT): the top chosen block trains first, one more chosen "
        "block opens every this many optimizer steps going down. Default: every chosen block trains from step 1."
    )

    @model_validator(mode="after")
    def _one_choice(self):
        if self.layers is not None and self.top_k is not None:
            raise ValueError("set 'delta.layers' or 'delta.top_k', not both")
        if self.layers is not None and not self.layers:
            raise ValueError("'delta.layers' must name at least one block")
        if self.modules is not None and not self.modules:
            raise ValueError("'delta.modules' must name at least one part (or be left out: whole blocks)")
        return self


class Partial(BlockSchedule):
    name = "partial"
    description = "Only chosen transformer blocks train (top_k / layers), optionally unfrozen gradually; merges."
    Config = PartialConfig

    def check_fits(self, model: nn.Module) -> None:
        self._choose(model)  # block count, layer indexes and module names, on shapes only

    def _choose(self, model: nn.Module):
        c = self.config
        prefix, blocks = find_blocks(model)
        indexes = chosen_indexes(model, c.layers, c.top_k if c.top_k is not None else DEFAULT_TOP_K)
        check_modules_exist(blocks[indexes[0]], c.modules)
        return {i: select_modules(blocks[i], f"{prefix}.{i}", c.modules) for i in indexes}, {}

    def open_at(self, step: int) -> list[int]:
        top_down = sorted(self.blocks, reverse=True)
        if self.config.unfreeze_every is None:
            return top_down
        return top_down[:1 + step // self.config.unfreeze_every]

    def check_run(self, total_steps: int) -> None:
        c = self.config
        count = len(self.blocks) or (len(set(c.layers)) if c.layers is not None else c.top_k or DEFAULT_TOP_K)
        if c.unfreeze_every is None or count < 2:
            return
        last_opens = (count - 1) * c.unfreeze_every  # completed steps before the lowest block opens
        if last_opens >= total_steps:
            raise UserError(
                f"recipe key 'delta.unfreeze_every': {c.unfreeze_every} steps per block opens the last of the "
                f"{count} chosen blocks only after step {last_opens}, but the run has {total_steps} steps; "
                f"valid: 1..{max(1, (total_steps - 1) // (count - 1))} (or fewer blocks)"
            )

    def describe_targets(self) -> list[str]:
        parts = f" ({', '.join(self.config.modules)})" if self.config.modules else ""
        return [f"{find_blocks(self.model)[0]}.{i}{parts}" for i in sorted(self.blocks)]


DELTA = Partial
