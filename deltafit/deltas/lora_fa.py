"""LoRA-FA (Zhang et al. 2023): LoRA whose A stays frozen at its random init; only B trains.

h = W0 x + (alpha/r) B A dropout(x). With A frozen, backward needs only A x (r numbers per token)
instead of the layer input x, which is what saves activation memory; autograd keeps exactly that
on its own because nothing asks for A's gradient. The frozen A is part of the checkpoint (the
Delta state_dict keeps inserted parameters that do not train), so a reload is exact whatever the
RNG. Optionally B's gradient is projected as PEFT's LoRA-FA optimizer does.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import LowRankUpdate, lora_scale
from deltafit.deltas._targets import find_targets, in_features, out_features
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.deltas.lora import LoRA


class LoRAFAConfig(TargetedConfig):
    method: Literal["lora-fa"] = "lora-fa"
    r: int = Field(
        8, ge=1, description="Rank of the update B A (A is frozen: only out_features * r numbers train per layer)."
    )
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA-FA path's input.")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")
    project_grad: bool = Field(
        False,
        description="Before each optimizer step replace B's gradient g by g (A A^T)^+ / scale^2, as PEFT's "
        "create_lorafa_optimizer does (the full-LoRA gradient's best approximation with A fixed). "
        "false: plain frozen-A LoRA, the original paper.",
    )


class LoRAFA(Delta):
    name = "lora-fa"
    family = "reparameterization"
    description = "LoRA with A frozen at its random init and only B trained (less activation memory); merges."
    Config = LoRAFAConfig
    check_fits = LoRA.check_fits  # the same r beside the same targets

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = LowRankUpdate(in_features(linear), out_features(linear), c.r, scale, c.dropout,
                                   linear.weight.device)
            update.A.requires_grad_(False)
            self.insertions.parallel(name, linear, "lora", update)

    def before_optimizer_step(self, step: int) -> None:
        if not self.config.project_grad:
            return
        for _, _, update in self.insertions.hosts.values():
            if update.B.grad is not None:
                update.B.grad.copy_(projected_grad(update))

    # PEFT has no LoRA-FA type and needs none: the trained result is a plain LoRA (B A), stored
    # under LoRA's keys, so it exports as a LORA adapter (import of a LORA adapter gives `lora`).
    to_peft = LoRA.to_peft

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r * out_features(m) for m in targets.values())


def projected_grad(update: LowRankUpdate) -> torch.Tensor:
    """g_B (A A^T + 1e-8 I)^+ / scale^2: PEFT's LoRA-FA gradient for B, in fp32 (an r x r pinv)."""
    A = update.A.detach().float()
    gram = A @ A.T + 1e-8 * torch.eye(A.shape[0], device=A.device)
    return (update.B.grad.float() @ torch.linalg.pinv(gram)) / update.scale**2


DELTA = LoRAFA
