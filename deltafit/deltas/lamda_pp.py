"""LaMDA++: LaMDA with per-layer ranks allocated once, before training, from each weight's spectrum.

Reference: Azizi, Kundu, Pedram, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", Findings of EMNLP 2024 (arXiv:2406.12832), the "LaMDA++" variant.
The paper describes a "lite-weight" static allocation from a normalized spectrum analysis of the
pretrained weights: layers that lose little from rank reduction get more rank, layers that lose
much get less. The exact formula is not public; deltafit defines it as follows.

Score. For adapted layer l with singular values s_1 >= s_2 >= ... of its frozen W0 and the uniform
rank r, the normalized energy score is the share of spectral energy a rank-r truncation keeps:

    e_l = (s_1^2 + ... + s_r^2) / (s_1^2 + s_2^2 + ...)          in (0, 1]

Budget. The same as uniform LaMDA: R = r * L ranks over the L adapted layers. Every layer gets 1;
the other R - L are shared in proportion to the scores (largest-remainder rounding):

    q_l = (R - L) * e_l / sum_k e_k,   r_l = 1 + floor(q_l) + [l among the (R - L - sum floor q)
                                                                largest fractional parts]

so sum r_l = R, r_l >= 1, and a layer with a higher score never gets a lower rank (ties in the
fractional part go to the higher score, then the earlier layer). A rank is capped at the layer's
smaller dimension; what a capped layer cannot take is shared again among the others by the same
rule. On a weightless (meta) model, where no spectrum exists, every layer gets r.

Everything else is LaMDA (see deltafit/deltas/lamda.py): per layer, h = W0 x + (alpha / r_l) B S A x
with A = Vh[:r_l] frozen, S (r_l x r_l) zero-init and trainable, B = U[:, :r_l] frozen column by
column by step ceil(freeze_b_by * T). The chosen ranks are written into the method's config
(`ranks`), which every checkpoint stores, so eval and merge rebuild exactly the same shapes.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import SpectralUpdate, columns_frozen, singular_values
from deltafit.deltas._targets import check_rank, dense_weight, find_targets, out_features, refuse_above, shape
from deltafit.deltas.base import Delta
from deltafit.deltas.lamda import LaMDA, LaMDAConfig
from deltafit.errors import UserError


class LaMDAPPConfig(LaMDAConfig):
    method: Literal["lamda-pp"] = "lamda-pp"
    r: int = Field(16, ge=1, description="Average rank: the layers share r x (number of adapted layers) ranks, "
                   "each scaled by alpha/r_l with its own rank r_l.")
    ranks: Optional[dict[str, int]] = Field(
        None, description="Per-module ranks {module name: rank}. Normally left unset: allocated from the pretrained "
        "spectra at attach and written here, so checkpoints rebuild the same shapes.")


class LaMDAPlusPlus(Delta):
    name = "lamda-pp"
    family = "reparameterization"
    description = "LaMDA with per-layer ranks from each weight's spectral energy, same total rank budget."
    trainables_change = True
    Config = LaMDAPPConfig

    def check_fits(self, model: nn.Module) -> None:
        self._check_ranks(find_targets(model, self.config.target_modules, self.config.layers))

    def _check_ranks(self, targets: dict[str, nn.Module]) -> None:
        """Given ranks (a checkpoint's) each fit their module; else r x layers fits the layers together."""
        c = self.config
        if c.ranks is None:
            check_budget(targets, c.r)
            return
        for name in sorted(set(c.ranks) & set(targets)):  # naming other modules is refused by `_ranks`
            check_rank({name: targets[name]}, c.ranks[name], key=f"delta.ranks.{name}")

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        targets = find_targets(model, c.target_modules, c.layers)
        ranks = self._ranks(targets)
        self.config = c.model_copy(update={"ranks": ranks})  # saved with every checkpoint
        for name, linear in targets.items():
            r = ranks[name]
            update = SpectralUpdate(dense_weight(linear), r, c.alpha / r, c.dropout)
            update.freeze(columns_frozen(0, 1, r, c.freeze_b_by))
            self.insertions.parallel(name, linear, "lamda", update)

    def _ranks(self, targets: dict[str, nn.Module]) -> dict[str, int]:
        """The config's ranks when given (a checkpoint's), else allocated from the spectra."""
        c = self.config
        if c.ranks is None:
            return spectral_ranks(targets, c.r)
        if set(c.ranks) != set(targets):
            odd = sorted(set(c.ranks) ^ set(targets))
            raise UserError(f"recipe key 'delta.ranks': must name exactly the adapted modules; differs at {odd[:3]}")
        self._check_ranks(targets)
        return dict(c.ranks)

    # The B-freezing schedule and its saved state are LaMDA's (the fold is the base class's): only the ranks differ.
    on_step_end = LaMDA.on_step_end
    schedule_state = LaMDA.schedule_state
    load_schedule_state = LaMDA.load_schedule_state

    def expected_trainable_params(self, model: nn.Module) -> int:
        c = self.config
        targets = find_targets(model, c.target_modules, c.layers)
        ranks = self._ranks(targets)
        b_trains = c.freeze_b_by > 0
        return sum(ranks[n] ** 2 + (ranks[n] * out_features(m) if b_trains else 0) for n, m in targets.items())

    def describe_targets(self) -> list[str]:
        hosts = self.insertions.hosts
        if any(host.weight.device.type == "meta" for host, _, _ in hosts.values()):
            return list(hosts)  # planning without weights: the ranks are decided when training starts
        return [f"{name} (r={update.rank})" for name, (_, _, update) in hosts.items()]


def energy_score(weight, r: int) -> float:
    """Share of W's spectral energy (sum of squared singular values) that a rank-r truncation keeps."""
    energy = singular_values(weight) ** 2
    total = float(energy.sum())
    return float(energy[:r].sum()) / total if total > 0 else 0.0


def spectral_ranks(targets: dict[str, nn.Module], r: int) -> dict[str, int]:
    """Per-module ranks summing to r * len(targets), from the normalized energy scores."""
    names = list(targets)
    check_budget(targets, r)
    caps = [min(shape(targets[n])) for n in names]
    if any(targets[n].weight.device.type == "meta" for n in names):  # no weights, no spectrum
        scores = [1.0] * len(names)
    else:
        scores = [energy_score(targets[n].weight, r) for n in names]
    return dict(zip(names, allocate_ranks(scores, r * len(names), caps)))


def check_budget(targets: dict[str, nn.Module], r: int) -> None:
    """The layers share r x layers ranks, each at most its module's smaller dimension: refuse an r whose
    budget they cannot hold together (one layer above its own dimensions is fine: others take the rest)."""
    total = sum(min(shape(m)) for m in targets.values())
    refuse_above("delta.r", r, total // max(1, len(targets)), f"per layer is more than these {len(targets)} layers "
                 f"can hold together ({total} singular vectors in all)")


def allocate_ranks(scores: list[float], budget: int, caps: list[int]) -> list[int]:
    """1 per layer, the rest of `budget` in proportion to `scores` (largest remainders), each rank at
    most its cap; what capped layers cannot take is shared again among the others."""
    ranks = [1] * len(scores)
    free = budget - len(scores)
    open_ = [i for i, cap in enumerate(caps) if cap > 1]
    while free > 0 and open_:
        extra = _proportional_shares([scores[i] for i in open_], free)
        for i, more in zip(open_, extra):
            more = min(more, caps[i] - ranks[i])
            ranks[i] += more
            free -= more
        open_ = [i for i in open_ if ranks[i] < caps[i]]
    return ranks


def _proportional_shares(scores: list[float], amount: int) -> list[int]:
    """Integers summing to `amount`, proportional to `scores`, monotone in them (Hamilton's method)."""
    total = sum(scores)
    quotas = [amount * s / total if total > 0 else amount / len(scores) for s in scores]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(len(scores)), key=lambda i: (-(quotas[i] - shares[i]), -scores[i], i))
    for i in order[: amount - sum(shares)]:
        shares[i] += 1
    return shares


DELTA = LaMDAPlusPlus
