"""Diff pruning (Guo et al. 2021): theta = theta0 + z * delta, a sparse diff learned through L0 gates.

Every element of the chosen weights (default: every linear layer of the model except the output
head, 'all-linear'; a GPT-2 Conv1D too, its diff laid out out x in like nn.Linear's) gets a diff
`delta` (starts at 0, so training starts exactly at the base) and a hard-concrete gate z with logit
`alpha` (starts at alpha_init = 5: the gate starts open):

    training:  u ~ U(0,1),  s = sigmoid((log u - log(1-u) + alpha) / temperature),
               z = clamp(s (r - l) + l, 0, 1)  with the stretch l = -1.5, r = 1.5
    eval:      z = clamp(sigmoid(alpha) (r - l) + l, 0, 1)  (deterministic)

temperature 1 is the reference code's (it has none; Louizos et al. use 2/3). The expected-L0
penalty l0_lambda * sum sigmoid(alpha - temperature log(-l/r)) (= l0_lambda * sum sigmoid(alpha)
for this symmetric stretch) is added to the loss through `extra_loss`, so the logged loss includes
it: about 1.25e-7 x 0.99 per gated weight at the start, ~13 for SmolLM2's 106M linear weights.

End of the run: the effective diff z * delta (deterministic gate) is magnitude-pruned to `density`
of all gated elements with one global ranking, at step T - fixed_mask_steps (`on_step_end`; the
final checkpoint prunes too if that step never came). The result is stored in the module itself:
delta keeps the kept values, alpha becomes +10 where kept and -10 elsewhere (both gates then give
exactly 1 and 0) and stops training; the last fixed_mask_steps steps train delta under that fixed
mask with no L0 term. Step checkpoints therefore stay dense with one key set (delta, alpha) and
evaluate exactly what the run had; the final checkpoint holds the sparse diff only: flat int32
indices + fp32 values per tensor (8 bytes per kept element), which `load_state_dict` accepts too.
Merge is exact: W = W0 + sparse delta.

Memory: a gated weight trains two fp32 tensors of its size (delta and alpha), plus AdamW's two
moments each: on all linears that is twice the trainable parameters of full fine-tuning, and
every forward builds the dense gated diff. Gates open or close only as fast as the learning rate
lets alpha travel (one learning rate serves delta and alpha; the reference gives alpha its own),
so at full-fine-tuning rates the final density comes from the magnitude pruning. Keep
train.weight_decay at 0: decay on alpha would close gates beyond the L0 term. The reference's
optional per-tensor group gates are not implemented.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import matmul_input
from deltafit.deltas._sparse import from_sparse, to_sparse, top_k_masks
from deltafit.deltas._targets import find_targets, shape
from deltafit.deltas.base import HEAD_PREFIX, Delta, TargetedConfig
from deltafit.errors import UserError

STRETCH_L, STRETCH_R = -1.5, 1.5  # the hard-concrete stretch interval (l, r) of the paper
ALPHA_KEPT, ALPHA_PRUNED = 10.0, -10.0  # gate logits after pruning: z is then exactly 1 / exactly 0
CHILD = "diff"
SPARSE = (".indices", ".values")  # final-checkpoint keys per target: '<module>.diff.indices' / '.values'


class DiffPruningConfig(TargetedConfig):
    method: Literal["diff-pruning"] = "diff-pruning"
    target_modules: Optional[Union[str, list[str]]] = Field(
        "all-linear",
        description="Linear layers whose weights get a gated diff: 'all-linear' (default: every linear layer but "
        "the output head), a list of exact names or name suffixes, or a regex over full module names.",
    )
    density: float = Field(0.005, gt=0, le=1, description="Fraction of the gated weights kept when the diff is "
                           "magnitude-pruned at the end of the run (the paper: 0.005).")
    l0_lambda: float = Field(1.25e-7, ge=0, description="Weight of the expected-L0 penalty added to the loss (the "
                             "paper: 1.25e-7; 0 turns it off).")
    alpha_init: float = Field(5.0, description="Initial logit of every gate (5: open, z = 1 at eval).")
    temperature: float = Field(1.0, gt=0, description="Temperature of the sampled hard-concrete gate (1 as in the "
                               "reference code; Louizos et al. use 2/3).")
    fixed_mask_steps: int = Field(0, ge=0, description="Prune this many steps before the end and train the last "
                                  "steps with the mask fixed and no L0 term (0: prune after the last step).")


class GatedDiff(nn.Module):
    """x -> x (z * delta)^T: the gated diff beside a linear layer (fp32 parameters)."""

    def __init__(self, size: tuple[int, int], alpha_init: float, temperature: float, device=None):
        super().__init__()
        self.temperature = temperature
        self.pruned = False  # after pruning the gate is the fixed 0/1 mask encoded in alpha
        self.delta = nn.Parameter(torch.zeros(size, device=device, dtype=torch.float32))
        self.alpha = nn.Parameter(torch.full(size, alpha_init, device=device, dtype=torch.float32))

    def gate(self) -> torch.Tensor:
        """Sampled while training (before pruning), deterministic otherwise."""
        if self.pruned or not self.training:
            return self.eval_gate()
        u = torch.rand_like(self.alpha).clamp_(1e-6, 1 - 1e-6)
        return _stretch(torch.sigmoid((u.log() - (-u).log1p() + self.alpha) / self.temperature))

    def eval_gate(self) -> torch.Tensor:
        if self.pruned:
            return (self.alpha > 0).to(self.alpha.dtype)
        return _stretch(torch.sigmoid(self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(matmul_input(x, self.delta.dtype), self.gate() * self.delta)

    def delta_weight(self) -> torch.Tensor:
        """The dense diff at eval, z * delta, shaped like the host weight (out x in)."""
        return self.eval_gate() * self.delta

    def expected_l0(self) -> torch.Tensor:
        """sum P(z != 0) = sum sigmoid(alpha - temperature log(-l/r)) (Louizos et al., eq. 12)."""
        return torch.sigmoid(self.alpha - self.temperature * math.log(-STRETCH_L / STRETCH_R)).sum()

    def fix(self, keep: torch.Tensor, values: torch.Tensor) -> None:
        """Hold `values` where `keep`, nothing elsewhere; the gate becomes that fixed mask."""
        with torch.no_grad():
            self.delta.copy_(values * keep)
            self.alpha.copy_(torch.where(keep, ALPHA_KEPT, ALPHA_PRUNED))
        self.alpha.requires_grad_(False)
        self.alpha.grad = None  # AdamW skips a tensor without gradient: no momentum, no decay
        self.pruned = True


def _stretch(s: torch.Tensor) -> torch.Tensor:
    return (s * (STRETCH_R - STRETCH_L) + STRETCH_L).clamp(0, 1)


class DiffPruning(Delta):
    name = "diff-pruning"
    family = "specification"
    description = ("Sparse diff theta0 + z * delta under hard-concrete L0 gates, magnitude-pruned to a density at "
                   "the end; sparse checkpoint; merges.")
    Config = DiffPruningConfig

    def __init__(self, config: DiffPruningConfig):
        super().__init__(config)
        self.pruned = False

    def check_fits(self, model: nn.Module) -> None:
        find_targets(model, self.config.target_modules, self.config.layers)  # a spec matching nothing is refused

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            # out x in, as F.linear takes it, also for a GPT-2 Conv1D (which stores in x out; fold_into knows)
            update = GatedDiff(shape(linear), c.alpha_init, c.temperature, linear.weight.device)
            self.insertions.parallel(name, linear, CHILD, update)

    def _updates(self) -> dict[str, GatedDiff]:
        return {key: update for key, (_, _, update) in self.insertions.hosts.items()}

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return 2 * sum(m.weight.numel() for m in targets.values())  # delta and alpha per element

    # -- training ------------------------------------------------------------------------------

    def extra_loss(self) -> Optional[torch.Tensor]:
        if self.pruned or self.config.l0_lambda == 0:
            return None
        penalties = [u.expected_l0() for u in self._updates().values()]
        return self.config.l0_lambda * sum(p.to(penalties[0].device) for p in penalties)

    def check_run(self, total_steps: int) -> None:
        steps = self.config.fixed_mask_steps
        if steps >= total_steps:
            raise UserError(f"recipe key 'delta.fixed_mask_steps': {steps} leaves no step to learn the gated diff in "
                            f"a {total_steps}-step run; valid: 0..{total_steps - 1}")

    def on_step_end(self, step: int, total_steps: int) -> None:
        if not self.pruned and step >= total_steps - self.config.fixed_mask_steps:
            self.prune()

    def prune(self) -> None:
        """Keep the `density` largest |z * delta| over all targets; fix that mask (see the module doc)."""
        updates = self._updates()
        with torch.no_grad():
            diffs = {key: u.delta_weight() for key, u in updates.items()}
            total = sum(d.numel() for d in diffs.values())
            keep = top_k_masks({key: d.abs() for key, d in diffs.items()}, max(1, round(self.config.density * total)))
            for key, u in updates.items():
                u.fix(keep[key], diffs[key])
        self.pruned = True

    def schedule_state(self) -> dict[str, Any]:
        return {"pruned": self.pruned}  # the mask itself is in alpha (+-10), saved with the tensors

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        if state.get("pruned"):
            self._mark_pruned()

    def _mark_pruned(self) -> None:
        for u in self._updates().values():
            u.fix(u.alpha > 0, u.delta.detach())
        self.pruned = True

    # -- checkpoints -------------------------------------------------------------------------

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The sparse diff: '<module>.diff.indices' (flat, int32) and '.values' (fp32) per target."""
        if not self.pruned:  # a run that never reached its pruning step: prune now, so the model matches
            self.prune()
        state = {k: v for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}
        for key, u in self._updates().items():
            state[key + SPARSE[0]], state[key + SPARSE[1]] = to_sparse(u.delta, u.alpha > 0)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Accept dense (step checkpoint: delta, alpha) and sparse (final: indices, values) tensors alike."""
        if not any(k.endswith(CHILD + SPARSE[0]) for k in state):
            return super().load_state_dict(state)
        dense = dict(state)
        for key, u in self._updates().items():
            index, values = dense.pop(key + SPARSE[0], None), dense.pop(key + SPARSE[1], None)
            if index is None or values is None:
                continue  # reported as missing '<key>.delta' by the base class
            delta, keep = from_sparse(key + SPARSE[0], index, values, u.delta)
            dense[f"{key}.delta"] = delta
            dense[f"{key}.alpha"] = torch.where(keep, ALPHA_KEPT, ALPHA_PRUNED)
        super().load_state_dict(dense)
        self._mark_pruned()


DELTA = DiffPruning
