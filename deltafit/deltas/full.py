"""Full fine-tuning: every base parameter trains. The baseline every other method is measured against.

Behaviour of the lifecycle, since full FT has no separate delta:
- `state_dict()` is the whole model (keys = the model's own parameter names): a checkpoint is a
  full copy of the weights.
- `merge()` is a no-op (the weights already are the trained ones) followed by `detach()`.
- `detach()` restores the grad flags only; the weights keep their trained values. Keeping a
  pristine copy to restore would double the model's memory, which defeats the baseline's purpose.
  Without training, detach leaves the model exactly as it was (`detach_restores_weights = False`).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from deltafit.deltas._inplace import InPlaceParams
from deltafit.deltas.base import Delta, DeltaConfig, base_named_parameters


class FullConfig(DeltaConfig):
    method: Literal["full"] = "full"


class FullFineTuning(Delta):
    name = "full"
    family = "baseline"
    description = "Every weight trains (the baseline); checkpoints hold the whole model."
    detach_restores_weights = False
    Config = FullConfig

    def __init__(self, config: FullConfig):
        super().__init__(config)
        self.base_params = InPlaceParams()

    def _attach(self, model: nn.Module) -> None:
        self.base_params.unfreeze(dict(base_named_parameters(model)), keep_originals=False)

    def _detach(self) -> None:
        self.base_params.clear()

    def _merge(self) -> None:
        """Nothing to fold: the trained weights are the model's weights."""

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.base_params.params)

    def describe_targets(self) -> list[str]:
        return list(self.base_params.params)

    def expected_trainable_params(self, model: nn.Module) -> int:
        # named_parameters de-duplicates tied tensors (e.g. tied input/output embeddings).
        return sum(p.numel() for _, p in base_named_parameters(model))


DELTA = FullFineTuning
