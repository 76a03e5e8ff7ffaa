"""LISA, layerwise importance sampling (Pan et al. 2024): every `interval` optimizer steps all
transformer blocks close and `gamma` of them, sampled uniformly without replacement, open.
Everything outside the blocks (embeddings, final norm, LM head or pooler + classifier) trains all
along, as in the paper.

Sampling: interval j (optimizer steps j*interval+1 .. (j+1)*interval) opens the blocks drawn by a
generator seeded from (seed, j), so the whole schedule is a function of the seed and the step. The
seed is the `seed` option, or else torch's initial seed when the delta attaches, which the trainer
sets from train.seed (the run decides it). Seed and step are the schedule state: resume is exact.

Optimizer state of a re-closed block is KEPT, not updated: the trainer builds AdamW once, over
every tensor; a closed block has requires_grad off and no gradient, so AdamW skips it (no update,
no weight decay) and its moments wait unchanged until the block is sampled again. A block never
sampled yet has no state at all. The delta cannot drop state (it never sees the optimizer), so
over a long run the optimizer state grows towards that of full fine-tuning: LISA here saves the
gradients and optimizer updates of the closed blocks, and their state only until first sampled.

Checkpoints: every tensor that may train, i.e. the whole model (all blocks, sampled or not, one key
set for the run, plus embeddings and head): a LISA checkpoint is the size of a full fine-tuning
one. `merge()` is a no-op (the weights are the trained ones). As in full fine-tuning, detach keeps
the trained weights and only restores grad flags (a pristine copy would double the memory).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas._blocks import BlockSchedule, block_params, outside_params
from deltafit.deltas._targets import refuse_above
from deltafit.deltas.base import DeltaConfig


class LISAConfig(DeltaConfig):
    method: Literal["lisa"] = "lisa"
    interval: int = Field(20, ge=1, description="Optimizer steps between two samplings of the open blocks (K).")
    gamma: int = Field(2, ge=1, description="Transformer blocks open at a time, sampled uniformly. Embeddings, "
                       "final norm and head train all along; checkpoints hold the whole model.")
    seed: Optional[int] = Field(None, ge=0, description="Seed of the block sampling. Default: taken from the run "
                                "(train.seed); saved with step checkpoints, so a resumed run samples the same.")


class LISA(BlockSchedule):
    name = "lisa"
    description = "Every K steps gamma sampled blocks train (+ embeddings, head); checkpoint = whole model; merges."
    detach_restores_weights = False
    keep_originals = False
    trainables_change = True
    Config = LISAConfig

    def __init__(self, config: LISAConfig):
        super().__init__(config)
        self.seed = config.seed

    def check_fits(self, model: nn.Module) -> None:
        total = len(block_params(model))
        refuse_above("delta.gamma", self.config.gamma, total, f"blocks asked for, the model has {total}")

    def _choose(self, model: nn.Module):
        return dict(enumerate(block_params(model))), outside_params(model)

    def _attach(self, model: nn.Module) -> None:
        super()._attach(model)
        if self.config.seed is None:
            self.seed = torch.initial_seed()  # set by the trainer from train.seed; draws nothing

    def open_at(self, step: int) -> list[int]:
        return sample_blocks(self.seed, step // self.config.interval, len(self.blocks), self.config.gamma)

    def schedule_state(self) -> dict[str, Any]:
        return {**super().schedule_state(), "seed": self.seed}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        super().load_schedule_state(state)

    def describe_targets(self) -> list[str]:
        blocks = f"{len(self.blocks)} blocks ({self.config.gamma} open at a time)"
        return [blocks] + sorted({n.rsplit(".", 1)[0] for n in outside_params(self.model)})


def sample_blocks(seed: int, interval_index: int, total: int, gamma: int) -> list[int]:
    """The blocks interval `interval_index` opens: gamma of `total`, uniformly without replacement,
    from a generator of its own (a pure function of the seed and the interval, so resume is exact)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + interval_index) % 2**63)
    return sorted(torch.randperm(total, generator=generator)[:gamma].tolist())


DELTA = LISA
