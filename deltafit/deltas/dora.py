"""DoRA (Liu et al. 2024): weight-decomposed LoRA, W' = m * (W0 + s B A) / ||W0 + s B A||_c.

The adapted weight is split into a direction, W0 + s B A (LoRA's, through the same `LowRankUpdate`),
normalized per output row (the paper's column norm of W^T; PEFT's `weight.norm(p=2, dim=1)` of the
out x in weight), and a trainable magnitude m (one number per output), initialized to the norms of
W0 so a fresh delta is exactly the base (m / ||W0|| is exactly 1). The norm is detached from the
graph (paper section 4.3, as PEFT does): it follows B A but gets no gradient, which saves memory.

Forward, beside the host (`Insertions.parallel`), as PEFT computes it:
  out = W0 x + b + (m / n - 1) * W0 x' + (m / n) * s B A x',  n = ||W0 + s B A|| (detached),
with x' = dropout(x) (x when no dropout). The delta recomputes W0 x' itself: a parallel insertion
sees the host's input, not its output, so targeted layers cost one more matmul with W0 (in the
base's own dtype, keeping no copy of W0 for backward).
Merge writes W' (bias unchanged); PEFT export is a LORA adapter with use_dora: true and the
magnitude as `lora_magnitude_vector`; a PEFT DoRA adapter imports into eval/merge.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import LowRankUpdate, lora_scale, replace_dense_weight
from deltafit.deltas._targets import dense_weight, find_targets, in_features, out_features, shape
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.deltas.lora import LoRA, _split_keys, peft_base_config, refuse_peft_options
from deltafit.errors import UserError

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for m


class DoRAConfig(TargetedConfig):
    method: Literal["dora"] = "dora"
    r: int = Field(8, ge=1, description="Rank of the direction update B A.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: B A is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapted path's input (PEFT's lora_dropout).")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta|| per output row, in fp32, without a graph: the one computation for m's init
    (delta = 0), the forward's n and the merge, so a fresh delta gives m / n == 1 exactly."""
    with torch.no_grad():
        return torch.linalg.norm(weight.float() + delta.to(weight.device), dim=1)


class DoRAUpdate(nn.Module):
    """m and LoRA's B A beside one linear layer; forward gives what PEFT's DoRA adds to the host output."""

    def __init__(self, linear: nn.Module, r: int, scale: float, dropout: float):
        super().__init__()
        device = linear.weight.device
        self.lora = LowRankUpdate(in_features(linear), out_features(linear), r, scale, 0.0, device)
        self.magnitude = nn.Parameter(row_norm(dense_weight(linear), self.lora.delta_weight()))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "host", linear)  # W0 is read from the host, which is not a child (a cycle)

    def ratio(self) -> torch.Tensor:
        """m / ||W0 + s B A||, with the norm detached."""
        return self.magnitude / row_norm(dense_weight(self.host), self.lora.delta_weight().detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        weight = dense_weight(self.host)  # out x in (a view for a Conv1D)
        ratio = self.ratio()
        base = F.linear(x.to(weight.dtype), weight).to(ratio.dtype)  # W0 x', the host's own bias left out
        return (ratio - 1) * base + ratio * self.lora(x)

    def fold(self, linear: nn.Module) -> None:
        """W <- m * (W0 + s B A) / ||W0 + s B A||, in fp32, stored in the weight's dtype and layout."""
        weight = dense_weight(linear)
        full = weight.float() + self.lora.delta_weight().to(weight.device)
        ratio = self.magnitude.to(weight.device) / torch.linalg.norm(full, dim=1)  # = row_norm's n
        replace_dense_weight(linear, (ratio[:, None] * full).to(weight.dtype))


class DoRA(Delta):
    name = "dora"
    family = "reparameterization"
    exclusive_hosts = True  # the magnitude divides by the column norms of W + BA: another delta's update is not in them
    description = "Weight-decomposed LoRA: a trained magnitude per output times the normalized W0 + B A; merges."
    Config = DoRAConfig
    check_fits = LoRA.check_fits  # the same r beside the same targets

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            self.insertions.parallel(name, linear, "dora", DoRAUpdate(linear, c.r, scale, c.dropout))

    def expected_trainable_params(self, model: nn.Module) -> int:
        """LoRA's r (in + out) plus the magnitude, one per output, for each target."""
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r * sum(shape(m)) + out_features(m) for m in targets.values())

    # PEFT: a LORA adapter with use_dora: true; B A under LoRA's keys, m as `<module>.lora_magnitude_vector`.

    @classmethod
    def to_peft(cls, config, state, model_config):
        lora = {k.replace(".dora.lora.", ".lora."): v for k, v in state.items() if ".dora.lora." in k}
        fields, tensors = LoRA.to_peft(config, lora, model_config)
        for key, value in state.items():
            if key.endswith(".dora.magnitude"):
                tensors[f"{key.removesuffix('.dora.magnitude')}.{MAGNITUDE}"] = value
        return {**fields, "use_dora": True}, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        refuse_peft_options(fields, allowed=("use_dora",))
        plain = {k.removesuffix(".weight"): v for k, v in tensors.items()}
        magnitudes = {k.removesuffix(f".{MAGNITUDE}"): v for k, v in plain.items() if k.endswith(f".{MAGNITUDE}")}
        split = _split_keys({k: v for k, v in plain.items() if not k.endswith(f".{MAGNITUDE}")}, ".lora_")
        hosts = {host for host, _ in split}
        if set(magnitudes) != hosts:
            raise UserError(f"PEFT DoRA adapter: modules {sorted(hosts ^ set(magnitudes))[:3]} lack either "
                            f"{MAGNITUDE} or lora_A/lora_B")
        state = {f"{host}.dora.lora.{part}": v for (host, part), v in split.items()}
        state.update({f"{host}.dora.magnitude": v for host, v in magnitudes.items()})
        return peft_base_config(fields, "dora", split), state


DELTA = DoRA
