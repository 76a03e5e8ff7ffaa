"""Learned masking (Zhao et al. 2020): the base weights, some of them switched off by a learned binary mask.

Every element of the chosen weights (default 'all-linear': every linear layer but the output head)
gets a real-valued score (laid out out x in, also for a GPT-2 Conv1D, which stores in x out); the
layer computes F.linear(x, W0 * 1[score >= tau], bias) with tau = 0.
The mask has no gradient, so the scores train straight-through: d loss / d score = d loss / d mask
= grad_W * W0, grad_W being the gradient of the masked weight W0 * mask (`_MaskedLinear`, which
keeps only x for backward and rebuilds the mask from the scores there).

Initialization (not settled in public code, so chosen here): scores ~ U(-(1 - init_keep) s,
init_keep s) with s = init_scale, so about init_keep (95%) of the weights start kept and a score
sits within s of the threshold. AdamW moves a score by about the learning rate per step: with
s = 0.01, a learning rate around 1e-4 flips a weight within tens of steps; scale s with the rate.
A fresh delta therefore already drops ~5% of the weights: it is not the base at step 0
(`zero_init_identity = False`); init_keep = 1 starts from the base.

The layer's output is replaced through a forward hook of this method's own (removed in `_detach`):
the masked product cannot be formed from the host's output, and an additive path (out - W0 (1 - m) x)
would only be equal up to rounding. The host's own matmul still runs and is discarded.

Checkpoints: step checkpoints keep the fp32 scores (`<module>.mask.scores`, exact resume); the final
one keeps only the mask, packed 1 bit per weight (`<module>.mask.bits`, uint8, numpy.packbits
order): 1/32 of the scores' size. Loading bits sets each score to +s or -s, which gives back the
same mask. Merge is exact: W = W0 * mask.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import _replace_weight
from deltafit.deltas._sparse import pack_bits, unpack_bits
from deltafit.deltas._targets import dense_weight, find_targets, is_transposed, shape
from deltafit.deltas.base import HEAD_PREFIX, Delta, TargetedConfig

THRESHOLD = 0.0  # tau: a weight is kept where its score >= tau
CHILD = "mask"
BITS = ".bits"  # final-checkpoint key per target: '<module>.mask.bits'


class MaskingConfig(TargetedConfig):
    method: Literal["masking"] = "masking"
    target_modules: Optional[Union[str, list[str]]] = Field(
        "all-linear",
        description="Linear layers whose weights get a learned mask: 'all-linear' (default: every linear layer but "
        "the output head), a list of exact names or name suffixes, or a regex over full module names.",
    )
    init_keep: float = Field(0.95, gt=0, le=1, description="Expected fraction of weights kept at the start (scores "
                             "drawn uniformly, this fraction of them at or above the threshold 0).")
    init_scale: float = Field(0.01, gt=0, description="Width of the initial score interval "
                              "[-(1 - init_keep), init_keep] x init_scale: how far scores start from the threshold, "
                              "to match with the learning rate.")


class _MaskedLinear(torch.autograd.Function):
    """F.linear(x, W0 * 1[scores >= tau], bias) with the straight-through gradient for the scores."""

    @staticmethod
    def forward(ctx, x, weight, bias, scores):
        ctx.save_for_backward(x, weight, bias, scores)
        return F.linear(x, weight * (scores >= THRESHOLD).to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scores = ctx.saved_tensors
        mask = scores >= THRESHOLD  # the scores cannot change between forward and backward (autograd checks)
        grad_x = grad_weight = grad_bias = grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(weight.dtype) @ (weight * mask.to(weight.dtype))).to(x.dtype)
        grad_2d = grad.reshape(-1, grad.shape[-1]).float()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_masked = grad_2d.t() @ x.reshape(-1, x.shape[-1]).float()  # d loss / d (W0 * mask), out x in
            if ctx.needs_input_grad[3]:
                grad_scores = grad_masked * weight.float()  # straight-through: d (W0 * m) / d m = W0
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_masked * mask).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0).to(bias.dtype)
        return grad_x, grad_weight, grad_bias, grad_scores


class WeightMask(nn.Module):
    """The scores of one linear layer (fp32) and the masked forward that replaces the layer's output."""

    def __init__(self, size: tuple[int, int], keep: float, scale: float, device=None):
        super().__init__()
        self.scale = scale
        self.scores = nn.Parameter(torch.empty(size, device=device, dtype=torch.float32))
        if self.scores.device.type != "meta":
            with torch.no_grad():
                self.scores.uniform_(THRESHOLD - (1 - keep) * scale, THRESHOLD + keep * scale)

    def mask(self) -> torch.Tensor:
        return self.scores >= THRESHOLD

    def forward(self, x: torch.Tensor, host: nn.Module) -> torch.Tensor:
        return _MaskedLinear.apply(x, dense_weight(host), host.bias, self.scores)

    def scores_for(self, mask: torch.Tensor) -> torch.Tensor:
        """Scores giving exactly `mask`: +scale where kept, -scale elsewhere (loading a packed mask)."""
        return torch.where(mask, THRESHOLD + self.scale, THRESHOLD - self.scale).to(self.scores.dtype)


class Masking(Delta):
    name = "masking"
    family = "specification"
    exclusive_hosts = True  # the mask multiplies W itself: another delta's update would not be masked
    description = ("Learned binary masks over the base weights (W0 * mask), trained straight-through; 1-bit "
                   "checkpoint; merges.")
    zero_init_identity = False  # ~5% of the weights start masked (init_keep)
    Config = MaskingConfig

    def __init__(self, config: MaskingConfig):
        super().__init__(config)
        self._hooks: list = []

    def check_fits(self, model: nn.Module) -> None:
        find_targets(model, self.config.target_modules, self.config.layers)  # a spec matching nothing is refused

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = WeightMask(shape(linear), c.init_keep, c.init_scale, linear.weight.device)
            self.insertions.holder(name, linear, CHILD, update)
            # The hook's return value replaces the layer's output (see the module doc).
            self._hooks.append(linear.register_forward_hook(lambda m, args, out, u=update: u(args[0], m).to(out.dtype)))

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _merge(self) -> None:
        for host, _, update in self.insertions.hosts.values():
            mask = update.mask().to(host.weight.device, host.weight.dtype)
            _replace_weight(host, host.weight * (mask.t() if is_transposed(host) else mask))

    def _updates(self) -> dict[str, WeightMask]:
        return {key: update for key, (_, _, update) in self.insertions.hosts.items()}

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(m.weight.numel() for m in targets.values())

    def kept_fraction(self) -> float:
        """Fraction of the masked weights currently kept (for logs and tests)."""
        masks = [u.mask() for u in self._updates().values()]
        return sum(int(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks))

    # -- checkpoints -------------------------------------------------------------------------

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The masks only, 1 bit per weight: '<module>.mask.bits' (uint8) per target."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}
        for key, update in self._updates().items():
            state[key + BITS] = pack_bits(update.mask())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Accept scores (step checkpoint) and packed masks (final checkpoint) alike."""
        if not any(k.endswith(CHILD + BITS) for k in state):
            return super().load_state_dict(state)
        dense = dict(state)
        for key, update in self._updates().items():
            if key + BITS in dense:  # a missing one is reported as missing '<key>.scores' by the base class
                mask = unpack_bits(key + BITS, dense.pop(key + BITS), update.scores)
                dense[f"{key}.scores"] = update.scores_for(mask)
        super().load_state_dict(dense)

DELTA = Masking
