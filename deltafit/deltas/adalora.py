"""AdaLoRA (Zhang et al. 2023): an SVD-shaped update whose rank budget moves to where it matters.

Each target gets h = W0 x + scale * P diag(E) Q x, with Q = lora_A (r x in, rows ~ right singular
vectors), E = lora_E (r x 1, singular values, start at 0 so training starts at the base), P = lora_B
(out x r); P and Q ~ N(0, 0.02). scale = alpha / init_r for the whole run (PEFT divides by its
`ranknum`, which stays init_r; with the same +1e-5 so exported adapters give the same numbers).

The schedule runs inside the trainer through the Delta hooks, never in user code:
- `before_optimizer_step` keeps this step's gradients; `on_step_end` (after the optimizer step)
  scores every element with the sensitivity I = |p * grad|, smoothed into Ibar (beta1) and its
  uncertainty Ubar (beta2), as PEFT and the authors' code do (the weights after the step).
- A triplet i of a matrix scores S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ibar * Ubar.
- Budget (total kept triplets over all matrices): init_r per matrix up to step tinit, then a cubic
  decay to target_r per matrix at step T - tfinal, T = the run's total steps. Every deltaT steps
  in between, and at T - tfinal, the triplets outside the `budget` best are masked (their E set
  to 0; a masked triplet can come back at a later allocation, as in the paper). From T - tfinal
  on, the final pattern is reapplied after every step.
- `extra_loss` adds orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F) over all matrices.

Differences from PEFT, on purpose: exactly `budget` triplets are kept (PEFT masks every score <=
the k-th one, which keeps fewer on ties, e.g. all-zero scores), and a run whose tinit/tfinal leave
no budget phase fails with a message at its first step (PEFT needs total_step in the config).

Checkpoints: step checkpoints store full-size tensors (masked E entries are zero) plus the
importance averages and kept masks in the trainer state; the final checkpoint stores each matrix
trimmed to its kept triplets (`final_state_dict`), which `load_state_dict` accepts by resizing.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._lowrank import ImportanceEMA, cubic_schedule, matmul_input, orthogonality_penalty
from deltafit.deltas._targets import check_rank, find_targets, in_features, out_features, shape
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoRAConfig(TargetedConfig):
    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="Rank every target starts with (PEFT's init_r).")
    target_r: int = Field(8, ge=0, description="Average rank per target once the budget has shrunk (PEFT's target_r); "
                                               "the total budget is target_r x number of targets.")
    alpha: float = Field(8.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/init_r "
                                                "(PEFT's lora_alpha; the divisor stays init_r as ranks shrink).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the AdaLoRA path's input.")
    tinit: int = Field(0, ge=0, description="Steps of warmup at the full init_r budget before ranks start shrinking.")
    tfinal: int = Field(0, ge=0, description="Final steps trained with the rank pattern fixed at the target budget.")
    deltaT: int = Field(1, ge=1, description="Steps between two budget allocations (masking rounds).")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the smoothed sensitivity Ibar.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty Ubar.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty on P and Q (0: off).")

    @model_validator(mode="after")
    def _shrinks(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): "
                             "the budget only shrinks")
        return self


class SVDUpdate(nn.Module):
    """x -> scale * ((dropout(x) Q^T) * E^T) P^T, i.e. scale * P diag(E) Q x. fp32 parameters."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.resize(r, device)
        if self.lora_A.device.type != "meta":
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def resize(self, r: int, device=None) -> None:
        """Fresh zero tensors of rank r (loading a trimmed checkpoint fills them)."""
        if device is None and "lora_A" in self._parameters:
            device = self.lora_A.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))

    @property
    def rank(self) -> int:
        return self.lora_E.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = matmul_input(x, self.lora_A.dtype, self.dropout)
        return (x @ (self.lora_A * self.lora_E).T) @ self.lora_B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale


class AdaLoRA(Delta):
    name = "adalora"
    family = "reparameterization"
    description = "SVD-shaped low-rank update whose rank budget is pruned by importance during training; merges."
    Config = AdaLoRAConfig

    def __init__(self, config: AdaLoRAConfig):
        super().__init__(config)
        self.ema = ImportanceEMA(config.beta1, config.beta2)
        self.kept: dict[str, torch.Tensor] = {}  # host key -> bool mask of kept triplets (the rank pattern)
        self._grads: tuple[int, dict[str, torch.Tensor]] = (0, {})  # (step, gradients kept for on_step_end)

    def check_fits(self, model: nn.Module) -> None:
        # target_r <= init_r (validated with the config), so init_r is the one rank to check
        check_rank(find_targets(model, self.config.target_modules, self.config.layers), self.config.init_r,
                   key="delta.init_r")

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = c.alpha / (c.init_r + 1e-5)  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = SVDUpdate(in_features(linear), out_features(linear), c.init_r, scale, c.dropout,
                               linear.weight.device)
            self.insertions.parallel(name, linear, "adalora", update)
        self.kept = {key: self._all_kept(update) for key, update in self._updates().items()}

    def _updates(self) -> dict[str, SVDUpdate]:
        return {key: update for key, (_, _, update) in self.insertions.hosts.items()}

    @staticmethod
    def _all_kept(update: SVDUpdate) -> torch.Tensor:
        return torch.ones(update.rank, dtype=torch.bool, device="cpu")

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.init_r * (sum(shape(m)) + 1) for m in targets.values())

    # -- the schedule ------------------------------------------------------------------------

    def extra_loss(self):
        if self.config.orth_reg_weight == 0 or not self.insertions.hosts:
            return None
        terms = []
        for update in self._updates().values():
            terms += [orthogonality_penalty(update.lora_A), orthogonality_penalty(update.lora_B.T)]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def before_optimizer_step(self, step: int) -> None:
        # Importance uses the weights after the optimizer step (as PEFT does), so keep the gradients
        # until on_step_end; tagged with the step, so a skipped step never reuses stale ones.
        grads = {}
        for key, update in self._updates().items():
            for part in PARTS:
                p = getattr(update, part)
                grads[f"{key}.{part}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        self._grads = (step, grads)

    def check_run(self, total_steps: int) -> None:
        c = self.config
        if c.tinit >= total_steps - c.tfinal:
            raise UserError(f"recipe keys 'delta.tinit' ({c.tinit}) and 'delta.tfinal' ({c.tfinal}) leave no steps to "
                            f"shrink ranks in a {total_steps}-step run: need tinit < total steps - tfinal")

    def on_step_end(self, step: int, total_steps: int) -> None:
        c = self.config
        self.check_run(total_steps)
        final_start = total_steps - c.tfinal
        grad_step, grads = self._grads
        self._grads = (0, {})
        if step < final_start:
            if grad_step == step:
                self._update_importance(grads)
            if step > c.tinit and step % c.deltaT == 0:
                self._mask_to_budget(self.budget(step, total_steps))
        elif step == final_start:  # last allocation: fix the pattern at the target budget
            self._mask_to_budget(self.budget(step, total_steps))
            self.ema.reset()
        else:
            self._apply_kept()

    def budget(self, step: int, total_steps: int) -> int:
        """Total triplets kept over all matrices at `step` (PEFT's budget_schedule)."""
        n = len(self.insertions.hosts)
        return cubic_schedule(step, self.config.tinit, total_steps - self.config.tfinal,
                              self.config.init_r * n, self.config.target_r * n)

    def ranks(self) -> dict[str, int]:
        """Kept triplets per target: the current rank pattern."""
        return {key: int(mask.sum()) for key, mask in self.kept.items()}

    def _update_importance(self, grads: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, update in self._updates().items():
                for part in PARTS:
                    name = f"{key}.{part}"
                    self.ema.update(name, (getattr(update, part) * grads[name]).abs())

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for key, update in self._updates().items():
            score_a = self.ema.score(f"{key}.lora_A", update.lora_A).mean(dim=1)
            score_e = self.ema.score(f"{key}.lora_E", update.lora_E).view(-1)
            score_b = self.ema.score(f"{key}.lora_B", update.lora_B).mean(dim=0)
            scores[key] = score_e + score_a + score_b
        return scores

    def _mask_to_budget(self, budget: int) -> None:
        """Keep exactly the `budget` best triplets over all matrices; zero the others' E."""
        scores = self._triplet_scores()
        keys = list(scores)
        flat = torch.cat([scores[k].float().cpu() for k in keys])
        order = torch.sort(flat, descending=True, stable=True).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:budget]] = True
        for key, mask in zip(keys, torch.split(keep, [scores[k].numel() for k in keys])):
            self.kept[key] = mask.clone()
        self._apply_kept()

    def _apply_kept(self) -> None:
        with torch.no_grad():
            for key, update in self._updates().items():
                mask = self.kept[key].to(update.lora_E.device)
                update.lora_E.masked_fill_(~mask.view(-1, 1), 0.0)

    def schedule_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state(), "kept": dict(self.kept)}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        device = next(iter(self._updates().values())).lora_E.device if self.insertions.hosts else None
        self.ema.load(state.get("ema", {}), device)
        for key, mask in state.get("kept", {}).items():
            if key not in self.kept or mask.numel() != self.kept[key].numel():
                raise UserError(f"checkpoint schedule state does not fit this AdaLoRA model (target '{key}')")
            self.kept[key] = mask.to(torch.bool).cpu()

    # -- trimmed final tensors ---------------------------------------------------------------

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """Each matrix cut down to its kept triplets: what the schedule decided, at its real size."""
        state = self.state_dict()
        for key, update in self._updates().items():
            index = self.kept[key].nonzero().view(-1).to(update.lora_E.device)
            state[f"{key}.lora_A"] = update.lora_A.detach()[index]
            state[f"{key}.lora_E"] = update.lora_E.detach()[index]
            state[f"{key}.lora_B"] = update.lora_B.detach()[:, index]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Accept full-size (step checkpoint) and trimmed (final checkpoint) tensors alike."""
        for key, update in self._updates().items():
            saved = state.get(f"{key}.lora_E")
            if saved is not None and saved.ndim == 2 and saved.shape[0] != update.rank:
                update.resize(saved.shape[0])
                self.kept[key] = self._all_kept(update)
        super().load_state_dict(state)

    # -- PEFT interoperability ---------------------------------------------------------------
    # PEFT: `<module>.lora_A` (r x in), `lora_E` (r x 1), `lora_B` (out x r), saved trimmed to the
    # kept triplets, with `rank_pattern` {"<module>.lora_E": init_r booleans} telling from_pretrained
    # which rank to resize each layer to; its divisor `ranknum` stays init_r, like this scale. The
    # final checkpoint no longer records which of the init_r slots were kept, only how many: the
    # pattern marks the first k, which loads the same tensors (PEFT only sums it on load).

    @classmethod
    def to_peft(cls, config, state, model_config):
        parts = _split_parts(state, ".adalora.")
        hosts = sorted({host for host, _ in parts})
        ranks = {host: parts[(host, "lora_E")].shape[0] for host in hosts}
        pattern = {f"{host}.lora_E": [i < ranks[host] for i in range(config.init_r)] for host in hosts}
        fields = {"init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha,
                  "lora_dropout": config.dropout, "tinit": config.tinit, "tfinal": config.tfinal,
                  "deltaT": config.deltaT,
                  "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
                  "total_step": None,  # the run's length: export fills it from the checkpoint
                  "rank_pattern": pattern, "target_modules": hosts, "bias": "none", "fan_in_fan_out": False,
                  "init_lora_weights": True, "use_dora": False}
        return fields, {f"{host}.{part}": v for (host, part), v in parts.items()}

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        from deltafit.deltas.lora import PEFT_UNSUPPORTED

        for option, neutral in PEFT_UNSUPPORTED.items():
            if option != "rank_pattern" and fields.get(option) not in (neutral, None):
                raise UserError(f"PEFT AdaLoRA option {option}={fields[option]!r} has no deltafit equivalent; only "
                                f"plain AdaLoRA adapters on linear layers can be imported")
        parts = _split_parts(tensors, ".")
        init_r = int(fields.get("init_r") or 12)
        alpha = float(fields.get("lora_alpha") or 0) or float(init_r)  # PEFT: lora_alpha, or r when it is 0
        names = ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
        config = {"method": "adalora", "init_r": init_r, "alpha": alpha,
                  "dropout": float(fields.get("lora_dropout") or 0.0),
                  **{k: fields[k] for k in names if fields.get(k) is not None},
                  "target_modules": sorted({host for host, _ in parts})}
        return config, {f"{host}.adalora.{part}": v for (host, part), v in parts.items()}


def _split_parts(state: dict, marker: str) -> dict:
    """{(host module, 'lora_A' | 'lora_E' | 'lora_B'): tensor} from keys '<host><marker><part>'."""
    split = {}
    for key, value in state.items():
        host, _, part = key.rpartition(marker)
        if not host or part not in PARTS:
            raise UserError(f"tensor '{key}' is not an AdaLoRA lora_A/lora_E/lora_B matrix (embedding AdaLoRA "
                            f"cannot be imported)")
        split[(host, part)] = value
    return split


DELTA = AdaLoRA
