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

from deltafit.deltas._lowrank import matmul_input, seeded_kaiming_uniform
from deltafit.deltas._targets import check_within_base, find_targets, in_features, linear_kinds, out_features, shape
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

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
        x = matmul_input(x, self.d.dtype, self.dropout)
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
    Config = VeRAConfig

    def check_fits(self, model: nn.Module) -> None:
        # r may exceed every layer's dimensions (the paper: 256-1024), so the bound is the shared A and B
        # (r x in_max + out_max x r) outgrowing the whole base model.
        targets = find_targets(model, self.config.target_modules, self.config.layers).values()
        in_max, out_max = max(shape(m)[1] for m in targets), max(shape(m)[0] for m in targets)
        check_within_base(model, "delta.r", self.config.r, in_max + out_max,
                          f"the frozen shared projections (r x {in_max} + {out_max} x r)")

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        targets = find_targets(model, c.target_modules, c.layers)
        in_max = max(in_features(m) for m in targets.values())
        out_max = max(out_features(m) for m in targets.values())
        device = next(iter(targets.values())).weight.device
        shared = SharedProjections(c.r, in_max, out_max, c.projection_seed, device)
        self.insertions.holder("", model, SHARED, shared)
        for name, linear in targets.items():
            update = VeRAUpdate(shared, in_features(linear), out_features(linear), c.r, c.d_initial, c.dropout,
                                linear.weight.device)
            self.insertions.parallel(name, linear, "vera", update)

    def _layers(self):
        return [(host, update) for host, _, update in self.insertions.hosts.values() if isinstance(update, VeRAUpdate)]

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r + out_features(m) for m in targets.values())

    def describe_targets(self) -> list[str]:
        return [key for key in self.insertions.hosts if key != SHARED]

    # PEFT: `<module>.vera_lambda_d` (r) and `vera_lambda_b` (out) per layer, and one shared
    # `base_model.vera_A` (r x in_max) / `base_model.vera_B` (out_max x r) sliced per layer, drawn
    # from projection_prng_key with the same init and order as here. Export stores the projections
    # (save_projection=True), so PEFT loads exactly these values whatever its platform's generator.

    @classmethod
    def to_peft(cls, config, state, model_config):
        layers = _split_vectors(state, ".vera.", ("d", "b"))
        hosts = sorted({host for host, _ in layers})
        in_max = max(_in_features(model_config(), hosts).values())
        out_max = max(layers[(host, "b")].shape[0] for host in hosts)
        A, B = _projections(config.r, in_max, out_max, config.projection_seed)
        tensors = {f"{host}.vera_lambda_{part}": v for (host, part), v in layers.items()}
        tensors.update({f"{PEFT_ROOT}vera_A": A, f"{PEFT_ROOT}vera_B": B})
        fields = {"r": config.r, "target_modules": hosts, "projection_prng_key": config.projection_seed,
                  "save_projection": True, "vera_dropout": config.dropout, "d_initial": config.d_initial,
                  "fan_in_fan_out": False, "bias": "none", "init_weights": True}
        return fields, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        # fan_in_fan_out only says the target stores its weight (in, out) (GPT-2's Conv1D): the vectors
        # and projections are the same either way, so it is no obstacle.
        if fields.get("bias") not in ("none", None):
            raise UserError(f"PEFT VeRA option bias={fields['bias']!r} has no deltafit equivalent; only VeRA "
                            f"adapters on linear layers without bias training can be imported")
        shared = {k: tensors[f"{PEFT_ROOT}vera_{k}"] for k in ("A", "B") if f"{PEFT_ROOT}vera_{k}" in tensors}
        layers = _split_vectors({k: v for k, v in tensors.items() if not k.startswith(PEFT_ROOT)}, ".vera_lambda_",
                                ("d", "b"))
        r, seed = int(fields["r"]), int(fields.get("projection_prng_key") or 0)
        if len(shared) == 2:  # deltafit regenerates them from the seed: they must be those
            A, B = _projections(r, shared["A"].shape[1], shared["B"].shape[0], seed)
            if not (torch.equal(A, shared["A"].float()) and torch.equal(B, shared["B"].float())):
                raise UserError(f"PEFT VeRA adapter: its stored vera_A/vera_B are not the projections drawn from "
                                f"projection_prng_key={seed}; deltafit regenerates them from the seed "
                                "and cannot use them")
        config = {"method": "vera", "r": r, "projection_seed": seed,
                  "d_initial": float(fields.get("d_initial", 0.1)),
                  "dropout": float(fields.get("vera_dropout") or 0.0), "target_modules": sorted({h for h, _ in layers})}
        return config, {f"{host}.vera.{part}": v for (host, part), v in layers.items()}


PEFT_ROOT = "base_model."  # PEFT keys the shared projections on its tuner, not on a module of the model


def _projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A and B exactly as SharedProjections draws them on the CPU."""
    shared = SharedProjections(r, in_max, out_max, seed, "cpu")
    return shared.A, shared.B


def _split_vectors(state: dict, marker: str, parts: tuple[str, ...]) -> dict:
    """{(host module, part): tensor} from keys '<host><marker><part>'; anything else is refused."""
    split = {}
    for key, value in state.items():
        host, _, part = key.rpartition(marker)
        if not host or part not in parts:
            raise UserError(f"tensor '{key}' is not a VeRA scaling vector ({marker}{'/'.join(parts)})")
        split[(host, part)] = value
    return split


def _in_features(config, hosts: list[str]) -> dict[str, int]:
    """in_features of each adapted module, read off a weightless copy of the base (the shared A's
    width is the largest of them, and nothing in a checkpoint records it)."""
    from transformers import AutoModel

    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
    linears = {n: in_features(m) for n, m in backbone.named_modules() if isinstance(m, linear_kinds())}
    found = {}
    for host in hosts:  # the backbone's names lack the task model's prefix ("model.", "bert.")
        names = [n for n in linears if n and (host == n or host.endswith("." + n))]
        if not names:
            raise UserError(f"VeRA target '{host}' is not a linear layer of the base model's backbone; "
                            f"cannot size the shared projections for PEFT")
        found[host] = linears[max(names, key=len)]
    return found


DELTA = VeRA
