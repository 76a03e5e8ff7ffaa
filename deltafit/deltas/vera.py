"""VeRA (Kopiczko et al. 2024): h = W0 x + diag(b) B diag(d) A x, with A and B frozen and random.

One pair of random matrices serves every adapted layer: A (r x in_max) and B (out_max x r), sized
to the largest adapted layer and sliced per layer. They are drawn from `projection_seed` exactly as
PEFT's VeRA draws them from `projection_prng_key` and are regenerated on attach, never stored: a
checkpoint holds only the trained vectors d (r per layer, init d_initial) and b (out per layer,
init 0, so training starts exactly at the base).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import fold_into, seeded_kaiming_uniform
from deltafit.deltas._targets import find_targets
from deltafit.deltas.base import Delta, TargetedConfig

SHARED = "vera_projections"  # where the shared A and B hang, on the model's root


class VeRAConfig(TargetedConfig):
    method: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="Rank of the shared random projections (the paper uses 256-1024); "
                   "each adapted layer trains only r + out_features numbers.")
    d_initial: float = Field(0.1, description="Initial value of every entry of the scaling vector d (b starts at 0).")
    projection_seed: int = Field(0, ge=0, description="Seed of the shared frozen projections A and B (PEFT's "
                                 "projection_prng_key): they are regenerated from it, not stored in checkpoints.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the VeRA path's input.")


class SharedProjections(nn.Module):
    """The frozen A (r x in_max) and B (out_max x r) that every adapted layer slices.

    Non-persistent buffers: they follow `.to()` like the model but never reach a state_dict, since
    the seed regenerates them bit for bit. Drawn on the CPU generator (as PEFT does), so the values
    do not depend on the device the model lives on.
    """

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device=None):
        super().__init__()
        if torch.device(device or "cpu").type == "meta":
            A, B = torch.empty(r, in_max, device="meta"), torch.empty(out_max, r, device="meta")
        else:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            A = seeded_kaiming_uniform((r, in_max), generator)  # A first, then B: PEFT's draw order
            B = seeded_kaiming_uniform((out_max, r), generator)
        self.register_buffer("A", A.to(device), persistent=False)
        self.register_buffer("B", B.to(device), persistent=False)


class VeRAUpdate(nn.Module):
    """x -> diag(b) B[:out] diag(d) A[:, :in] dropout(x): two trainable vectors around shared projections."""

    def __init__(self, shared: SharedProjections, in_features: int, out_features: int, r: int,
                 d_initial: float, dropout: float, device=None):
        super().__init__()
        self._shared = (shared,)  # a reference, not a child: the projections are registered once, on the model
        self.in_features, self.out_features = in_features, out_features
        self.d = nn.Parameter(torch.full((r,), d_initial, device=device, dtype=torch.float32))
        self.b = nn.Parameter(torch.zeros(out_features, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A and B, in the vectors' dtype and device."""
        shared = self._shared[0]
        A = shared.A[:, : self.in_features].to(self.d.device, self.d.dtype)
        B = shared.B[: self.out_features].to(self.d.device, self.d.dtype)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.projections()
        x = self.dropout(x.to(self.d.dtype))
        # b scales B's rows (out x r) rather than the output: backward then keeps r numbers per token
        # for this layer instead of out_features.
        return F.linear(F.linear(x, A) * self.d, self.b[:, None] * B)

    def delta_weight(self) -> torch.Tensor:
        """The dense update diag(b) B diag(d) A, shaped like the host weight (out x in)."""
        A, B = self.projections()
        return (self.b[:, None] * B) @ (self.d[:, None] * A)


class VeRA(Delta):
    name = "vera"
    family = "reparameterization"
    description = "Trainable scaling vectors around frozen random low-rank projections shared by all layers; merges."
    mergeable = True
    Config = VeRAConfig

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        targets = find_targets(model, c.target_modules, c.layers)
        in_max = max(m.in_features for m in targets.values())
        out_max = max(m.out_features for m in targets.values())
        device = next(iter(targets.values())).weight.device
        shared = SharedProjections(c.r, in_max, out_max, c.projection_seed, device)
        self.insertions.holder("", model, SHARED, shared)
        for name, linear in targets.items():
            update = VeRAUpdate(shared, linear.in_features, linear.out_features, c.r, c.d_initial, c.dropout,
                                linear.weight.device)
            self.insertions.parallel(name, linear, "vera", update)

    def _layers(self):
        return [(host, update) for host, _, update in self.insertions.hosts.values() if isinstance(update, VeRAUpdate)]

    def _merge(self) -> None:
        for host, update in self._layers():
            fold_into(host, update.delta_weight())

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r + m.out_features for m in targets.values())

    def describe_targets(self) -> list[str]:
        return [key for key in self.insertions.hosts if key != SHARED]


DELTA = VeRA
