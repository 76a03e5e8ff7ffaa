"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A dropout(x), with the rsLoRA scaling option."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import LowRankUpdate, fold_into, lora_scale
from deltafit.deltas._targets import find_targets
from deltafit.deltas.base import Delta, TargetedConfig


class LoRAConfig(TargetedConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update B A.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input.")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")


class LoRA(Delta):
    name = "lora"
    family = "reparameterization"
    description = "Low-rank update B A beside chosen linear layers; merges into the weights."
    mergeable = True
    Config = LoRAConfig

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = LowRankUpdate(linear.in_features, linear.out_features, c.r, scale, c.dropout, linear.weight.device)
            self.insertions.parallel(name, linear, "lora", update)

    def _merge(self) -> None:
        for host, _, update in self.insertions.hosts.values():
            fold_into(host, update.delta_weight())

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r * (m.in_features + m.out_features) for m in targets.values())
DELTA = LoRA
