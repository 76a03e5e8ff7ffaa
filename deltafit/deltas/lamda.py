"""LaMDA: low-dimensional adaptation in the pretrained weight's own spectral basis.

Reference: Azizi, Kundu, Pedram, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", Findings of EMNLP 2024 (arXiv:2406.12832). This file is deltafit's
reference implementation of the paper's version; the authors' public code differs (Kaiming A, zero
B, no SVD, gradient columns of B zeroed on a schedule) and is not followed.

Algorithm, for each adapted linear with frozen weight W0 (out x in), W0 = U diag(s) Vh:

    h = W0 x + (alpha / r) * B S A x

- A  = Vh[:r]     (r x in)   first projection (the paper's PMA): frozen for the whole run.
- S  = 0          (r x r)    the low-dimensional adapter (LDA): trainable; zero at init, so the
                             adapted model starts exactly at the base.
- B  = U[:, :r]   (out x r)  second projection (PMB): trainable at first, frozen column by column
                             early in training, in order of singular value (largest first).

(The paper writes Y = X W + alpha X A S B with row vectors; here the torch layout, out x in.)
alpha/r plays the paper's alpha, as in the authors' PEFT-based code, so a LoRA recipe's alpha
means the same here. Trainable parameters per layer: r^2 + r*out while B trains, r^2 once B is
frozen (`expected_trainable_params` counts the start of the run). Activations kept for backward
on the LaMDA path are r-dimensional: A is frozen, so the layer input x is not saved.

Freezing schedule (deltafit's, the paper gives no formula): with T optimizer steps and
t_i = ceil(freeze_b_by * T), after step t the first min(r, floor(r * t / t_i)) columns of B are
frozen; by t_i all are. Column j pairs with singular value s_j, so the principal directions stop
moving first and the weakest ones adapt longest. Frozen columns are truly frozen (their grad
stays None: no AdamW momentum or weight decay moves them). The count of frozen columns is saved
in step checkpoints (`schedule_state`) so a resumed run continues exactly.

Checkpoints hold S and every column of B (frozen or not, so the key set never changes); A is
rebuilt from W0 by a deterministic float64 SVD with canonical signs. Merge: W0 += (alpha/r) B S A.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import SpectralUpdate, columns_frozen
from deltafit.deltas._targets import check_rank, dense_weight, find_targets, out_features
from deltafit.deltas.base import Delta, TargetedConfig


class LaMDAConfig(TargetedConfig):
    method: Literal["lamda"] = "lamda"
    r: int = Field(16, ge=1, description="Rank r: A projects x to r dimensions, S is r x r (the only part "
                   "trained after B freezes), B projects back.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update B S A is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the r-dimensional code A x (not on x, so "
                           "backward keeps no input-sized mask).")
    freeze_b_by: float = Field(0.1, ge=0, le=1, description="Fraction of the run's optimizer steps by which B "
                               "is completely frozen (the paper's t_i); its columns freeze one by one, largest "
                               "singular value first. 0: B is frozen from the start.")


class LaMDA(Delta):
    name = "lamda"
    family = "reparameterization"
    description = "Trainable r x r core between frozen singular-vector projections of W0; B freezes early."
    trainables_change = True
    Config = LaMDAConfig

    def check_fits(self, model: nn.Module) -> None:
        # A and B are r singular vectors of W0: r cannot exceed its smaller dimension
        check_rank(find_targets(model, self.config.target_modules, self.config.layers), self.config.r)

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = SpectralUpdate(dense_weight(linear), c.r, c.alpha / c.r, c.dropout)
            update.freeze(columns_frozen(0, 1, c.r, c.freeze_b_by))
            self.insertions.parallel(name, linear, "lamda", update)

    def on_step_end(self, step: int, total_steps: int) -> None:
        for _, _, update in self.insertions.hosts.values():
            update.freeze(columns_frozen(step, total_steps, update.rank, self.config.freeze_b_by))

    def schedule_state(self) -> dict[str, Any]:
        return {"frozen_columns": {key: u.frozen for key, (_, _, u) in self.insertions.hosts.items()}}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        for key, count in state.get("frozen_columns", {}).items():
            self.insertions.hosts[key][2].freeze(int(count))

    def expected_trainable_params(self, model: nn.Module) -> int:
        c = self.config
        b_trains = columns_frozen(0, 1, c.r, c.freeze_b_by) < c.r
        targets = find_targets(model, c.target_modules, c.layers)
        return sum(c.r * c.r + (c.r * out_features(m) if b_trains else 0) for m in targets.values())


DELTA = LaMDA
