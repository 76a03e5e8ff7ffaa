"""AFLoRA (Liu et al. 2024): a low-rank path whose projections freeze, one by one, as training goes on.

Each target gets h = W0 x + diag(b) B diag(d) A x: a VeRA-style path whose down-projection
A = lora_A (r x in) and up-projection B = lora_B (out x r) train too, each followed by a feature
transformation vector, d = lambda_d (r) and b = lambda_b (out). A and B are Kaiming-uniform, d
starts at d_init (the reference code's 1.0), b at 0, so a fresh model computes exactly the base.
The vectors train for the whole run; the projections are what the schedule freezes.

Freezing score (through the Delta hooks): `before_optimizer_step` adds |grad| of every still
trainable A/B tensor to a window; every deltaT steps the window's mean I updates Ibar (beta1=0.85)
and Ubar = EMA(beta2=0.95) of |I - Ibar|; a tensor's score is mean(Ibar * Ubar) — gradient
magnitudes, not AdaLoRA's |p * grad|: the question is whether a matrix still needs to move.

Schedule (`on_step_end`, T = the run's total steps): nothing freezes up to freeze_start*T; then the
number of projections still trainable follows the cubic schedule N (1 - progress)^3 down to 0 at
freeze_end*T (N = 2 x targets), checked every deltaT steps; each check freezes the lowest-scoring
trainable projections until the count fits, and everything is frozen from freeze_end*T on.
Freezing is final: requires_grad off and grad dropped, so AdamW gives the tensor neither momentum
nor weight decay again (the trainer zeroes gradients with set_to_none). The reference code
freezes by a quadratic threshold over element scores; the paper and our notes say cubic, and a
count of tensors makes the schedule exact and testable.

Checkpoints keep every tensor (frozen or not, stable keys); the frozen set, the window and the
averages are schedule state, restored on resume. Mergeable: W0 + diag(b) B diag(d) A.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._lowrank import ImportanceEMA, cubic_schedule, matmul_input
from deltafit.deltas._targets import check_rank, find_targets, in_features, out_features, shape
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

PROJECTIONS = ("lora_A", "lora_B")


class AFLoRAConfig(TargetedConfig):
    method: Literal["aflora"] = "aflora"
    r: int = Field(4, ge=1, description="Rank of the low-rank path B A.")
    d_init: float = Field(1.0, description="Initial value of the vector d after the down-projection A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the path's input.")
    freeze_start: float = Field(0.3, ge=0, le=1, description="Fraction of the run's steps before any projection "
                                                               "freezes (the reference code's initial_warmup).")
    freeze_end: float = Field(0.7, ge=0, le=1, description="Fraction of the run's steps by which every projection "
                                                             "is frozen (1 - the reference code's final_warmup).")
    deltaT: int = Field(10, ge=1, description="Steps per gradient window, and between two freezing rounds.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the smoothed gradient magnitude Ibar.")
    beta2: float = Field(0.95, gt=0, lt=1, description="EMA factor of the uncertainty Ubar.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.freeze_start > self.freeze_end:
            raise ValueError(f"freeze_start ({self.freeze_start}) must not come after freeze_end ({self.freeze_end})")
        return self


class ScaledLowRankUpdate(nn.Module):
    """x -> b * (B (d * (A dropout(x)))), fp32 parameters."""

    def __init__(self, in_features: int, out_features: int, r: int, d_init: float, dropout: float, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device))
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_init), device=device))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, device=device))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = matmul_input(x, self.lora_A.dtype, self.dropout)
        return ((x @ self.lora_A.T) * self.lambda_d) @ self.lora_B.T * self.lambda_b

    def delta_weight(self) -> torch.Tensor:
        return (self.lambda_b[:, None] * self.lora_B) @ (self.lambda_d[:, None] * self.lora_A)


class AFLoRA(Delta):
    name = "aflora"
    family = "reparameterization"
    description = "Low-rank path with trainable vectors whose projections freeze by gradient score; merges."
    trainables_change = True
    Config = AFLoRAConfig

    def __init__(self, config: AFLoRAConfig):
        super().__init__(config)
        self.ema = ImportanceEMA(config.beta1, config.beta2)
        self.window: dict[str, torch.Tensor] = {}  # name -> sum of |grad| over the open window
        self.window_steps = 0
        self.frozen: set[str] = set()

    def check_fits(self, model: nn.Module) -> None:
        check_rank(find_targets(model, self.config.target_modules, self.config.layers), self.config.r)

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = ScaledLowRankUpdate(in_features(linear), out_features(linear), c.r, c.d_init, c.dropout,
                                         linear.weight.device)
            self.insertions.parallel(name, linear, "aflora", update)

    def expected_trainable_params(self, model: nn.Module) -> int:
        r = self.config.r
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(r * sum(shape(m)) + r + out_features(m) for m in targets.values())

    def projections(self) -> dict[str, nn.Parameter]:
        """Every A and B tensor, frozen or not, keyed like the state dict."""
        return {f"{key}.{part}": getattr(update, part)
                for key, (_, _, update) in self.insertions.hosts.items() for part in PROJECTIONS}

    # -- the schedule ------------------------------------------------------------------------

    def before_optimizer_step(self, step: int) -> None:
        with torch.no_grad():
            for name, p in self.projections().items():
                if name not in self.frozen and p.grad is not None:
                    magnitude = p.grad.detach().abs()
                    self.window[name] = self.window[name] + magnitude if name in self.window else magnitude.clone()
        self.window_steps += 1
        if step % self.config.deltaT == 0:
            for name, total in self.window.items():
                self.ema.update(name, total / self.window_steps)
            self.window, self.window_steps = {}, 0

    def on_step_end(self, step: int, total_steps: int) -> None:
        start, end = self.freeze_window(total_steps)
        if step <= start or (step < end and step % self.config.deltaT != 0):
            return
        excess = len(self.projections()) - self.trainable_target(step, total_steps) - len(self.frozen)
        if excess > 0:
            self._freeze(self._lowest_scores(excess))

    def freeze_window(self, total_steps: int) -> tuple[int, int]:
        """(step after which freezing starts, step by which everything is frozen)."""
        return round(self.config.freeze_start * total_steps), round(self.config.freeze_end * total_steps)

    def trainable_target(self, step: int, total_steps: int) -> int:
        """How many projections the schedule lets train after `step` (a freezing round)."""
        start, end = self.freeze_window(total_steps)
        return cubic_schedule(step, start, end, len(self.projections()), 0)

    def _lowest_scores(self, count: int) -> list[str]:
        params = self.projections()
        candidates = [n for n in params if n not in self.frozen]
        scores = [float(self.ema.score(n, params[n]).mean()) for n in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
        return [candidates[i] for i in order[:count]]

    def _freeze(self, names) -> None:
        params = self.projections()
        for name in names:
            params[name].requires_grad_(False)
            params[name].grad = None  # AdamW skips a parameter without a gradient: no momentum, no decay
            self.window.pop(name, None)
            self.frozen.add(name)

    def schedule_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state(), "window": dict(self.window), "window_steps": self.window_steps,
                "frozen": sorted(self.frozen)}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        params = self.projections()
        unknown = [n for n in state.get("frozen", []) if n not in params]
        if unknown:
            raise UserError(f"checkpoint schedule state names projections this AFLoRA model lacks: {unknown[:3]}")
        device = next(iter(params.values())).device if params else None
        self.ema.load(state.get("ema", {}), device)
        self.window = {k: v.to(device) for k, v in state.get("window", {}).items()}
        self.window_steps = int(state.get("window_steps", 0))
        self._freeze(state.get("frozen", []))


DELTA = AFLoRA
