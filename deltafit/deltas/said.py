"""SAID, structure-aware intrinsic dimension (Aghajanyan et al. 2021).

theta_i = theta0_i + lambda_i * P_i(theta_d): one shared trainable vector theta_d (d numbers, init 0,
so training starts exactly at the base), a fixed random Fastfood projection P_i per adapted tensor
and one trainable scale lambda_i per tensor (init 1), as in the authors' code. Trainable numbers:
d + the number of tensors.

Which tensors: the weight matrices of the targeted linear layers (the per-architecture default,
e.g. q/v projections, or any `target_modules`). The paper reparameterizes every tensor, but each
adapted tensor costs O(D) memory for its projection and an O(D log D) transform per forward pass,
so the default stays as light as LoRA's; `target_modules: all-linear` adapts every linear weight.

The projections are regenerated from `projection_seed` on attach and never stored (non-persistent
buffers); no dense D x d matrix is ever built.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import matmul_input
from deltafit.deltas._targets import find_targets, refuse_above, shape
from deltafit.deltas.base import Delta, TargetedConfig

SHARED = "said"  # where theta_d hangs, on the model's root


class SAIDConfig(TargetedConfig):
    method: Literal["said"] = "said"
    dimension: int = Field(1000, ge=1, description="d: size of the one shared trainable vector theta_d "
                           "(the paper finds 90%-of-full-quality dimensions of a few hundred to a few thousand).")
    projection_seed: int = Field(0, ge=0, description="Seed of the fixed random Fastfood projections: they are "
                                 "regenerated from it, not stored in checkpoints.")


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of the last dimension (a power of two), Sylvester order.

    H_n = H_(n/b) kron H_b: one matmul with a dense H_b (b <= 256) mixes the low index bits, then
    butterfly passes (a+b, a-b) over ever longer contiguous halves mix the rest. O(n log n) with
    no n x n matrix; the matmul replaces the short-stride passes that are slow on CPUs.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    b = min(n, 256)
    x = x.reshape(-1, b) @ _sylvester(b, x.dtype, x.device)
    h = b
    while h < n:
        pairs = x.reshape(-1, 2, h)
        out = torch.empty_like(pairs)
        torch.add(pairs[:, 0], pairs[:, 1], out=out[:, 0])
        torch.sub(pairs[:, 0], pairs[:, 1], out=out[:, 1])
        x = out
        h *= 2
    return x.reshape(*lead, n)


@functools.lru_cache(maxsize=None)
def _sylvester(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


class _Hadamard(torch.autograd.Function):
    """H x with H symmetric, so the backward pass is H g: nothing of the log2(n) passes is kept."""

    @staticmethod
    def forward(ctx, x):
        return hadamard(x)

    @staticmethod
    def backward(ctx, grad):
        return hadamard(grad)


class Fastfood(nn.Module):
    """A fixed random map R^d -> R^D: V x = (H G Pi H B pad(x))[:D] * scale (Le et al. 2013).

    As in the intrinsic-dimension reference code: x is zero-padded to L = 2^k >= max(D, d); B is a
    random +-1 diagonal, Pi a random permutation, G a Gaussian diagonal, H the Walsh-Hadamard
    matrix; the output is cut to D and scaled by 1/sqrt(D * sum(G^2)), which keeps |V x| ~ |x|.
    Memory is O(L) (int8 signs, int32 permutation, fp32 Gaussians); time O(L log L).
    """

    def __init__(self, d: int, D: int, generator: torch.Generator, device=None):
        super().__init__()
        self.d, self.D = d, D
        self.L = 1 << (max(D, d) - 1).bit_length()
        if torch.device(device or "cpu").type == "meta":
            signs, perm, gauss = (
                torch.empty(self.L, dtype=t, device="meta") for t in (torch.int8, torch.int32, torch.float32)
            )
            self.scale = 1.0
        else:
            signs = (torch.randint(0, 2, (self.L,), generator=generator) * 2 - 1).to(torch.int8)
            perm = torch.randperm(self.L, generator=generator).to(torch.int32)
            gauss = torch.randn(self.L, generator=generator)
            self.scale = 1.0 / math.sqrt(D * float(gauss.double().pow(2).sum()))
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # a fixed fp32 map, whatever the run's precision
            return self._project(x.float())

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.L - self.d)) * self.signs
        x = _Hadamard.apply(x)
        x = x.index_select(-1, self.perm) * self.gauss.float()
        x = _Hadamard.apply(x)
        return x[..., : self.D] * self.scale


class SharedVector(nn.Module):
    """theta_d, the one vector every adapted tensor projects from."""

    def __init__(self, d: int, device=None):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, device=device, dtype=torch.float32))


class SAIDUpdate(nn.Module):
    """x -> (lambda * P(theta_d)).view(out, in) x: the reparameterized change of one linear's weight."""

    def __init__(self, shared: SharedVector, projection: Fastfood, shape: tuple[int, int], device=None):
        super().__init__()
        self._shared = (shared,)  # a reference, not a child: theta_d is registered once, on the model
        self.projection = projection
        self.shape = shape
        self.scale = nn.Parameter(torch.ones((), device=device, dtype=torch.float32))  # lambda_i

    def delta_weight(self) -> torch.Tensor:
        theta = self._shared[0].theta.to(self.scale.device)
        return (self.scale * self.projection(theta)).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(matmul_input(x, self.scale.dtype), self.delta_weight())


class SAID(Delta):
    name = "said"
    family = "reparameterization"
    description = "One shared d-dim vector through fixed random Fastfood projections, one scale per tensor; merges."
    Config = SAIDConfig

    def check_fits(self, model: nn.Module) -> None:
        # theta_d reaches the model only through the adapted weights: a d above their count adds no
        # expressiveness, only O(d) projection memory per weight (and stays below the base's own size).
        targets = find_targets(model, self.config.target_modules, self.config.layers).values()
        total = sum(out * in_ for out, in_ in map(shape, targets))
        refuse_above("delta.dimension", self.config.dimension, total,
                     f"is more than the {total:,} numbers of the {len(targets)} adapted weights it reparameterizes "
                     f"(a larger d adds no expressiveness, only projection memory)")

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        targets = find_targets(model, c.target_modules, c.layers)
        shared = SharedVector(c.dimension, next(iter(targets.values())).weight.device)
        self.insertions.holder("", model, SHARED, shared)
        # One generator, tensors in model order: the same model and config give the same projections.
        generator = torch.Generator(device="cpu").manual_seed(c.projection_seed)
        for name, linear in targets.items():
            device = linear.weight.device
            projection = Fastfood(c.dimension, linear.weight.numel(), generator, device)
            update = SAIDUpdate(shared, projection, shape(linear), device)  # out x in, even for a Conv1D
            self.insertions.parallel(name, linear, "said", update)

    def _layers(self):
        return [(host, update) for host, _, update in self.insertions.hosts.values() if isinstance(update, SAIDUpdate)]

    def expected_trainable_params(self, model: nn.Module) -> int:
        return self.config.dimension + len(find_targets(model, self.config.target_modules, self.config.layers))

    def describe_targets(self) -> list[str]:
        return [key for key in self.insertions.hosts if key != SHARED]


DELTA = SAID
