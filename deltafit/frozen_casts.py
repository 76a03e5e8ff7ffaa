"""Frozen linear weights cast to the autocast dtype once, not at every call.

Under bf16 (or fp16) autocast every `F.linear` casts its fp32 weight to bf16 first. Autocast's own
cache keeps only casts of leaf tensors that require grad, and only until the autocast region ends,
so a frozen weight, which is nearly every weight in delta tuning, is read and written again at each
call: SmolLM2's 100M frozen linear weights every forward, and its tied LM head (28M) twice per loss
chunk, since the chunked loss recomputes each chunk in backward (loss.py). On a CPU that is gigabytes
of memory traffic per step that no matmul needs.

Here each frozen `nn.Linear` keeps its cast and reuses it while the weight is unchanged. The copy is
made by the same `.to(dtype)` autocast would call, so every result is bit for bit what autocast gives;
it is made again when the weight changes (its version counter moves, as any in-place write under
torch does, or its storage is replaced, as a fold does), and is not used at all while the weight
requires grad (a block LISA unfroze). Without gradient checkpointing autocast's copies are saved
for backward and alive at the step's peak anyway; with it they are not, so the caller then keeps
only the input sharing below.

The same goes for the activations: q, k and v (and a low-rank delta on each) all take the same
normed hidden state, which autocast casts to bf16 once per consumer; gate and up likewise. While
the cache is on, the cast of the last input is kept and handed to every consumer of that tensor
(`shared_input`), each through its own autograd node whose backward casts that consumer's gradient
back to fp32, as autocast's cast would, so the gradients still sum in fp32 in the same order.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CACHE = "_deltafit_cast"  # instance attribute: (weight alias, weight version, cast); not a buffer, never saved
_last_input: list = []  # [(input, its version, its cast)] while a cache is on: the one input being shared
_on: list[bool] = []  # one entry per model with the cache on


def cache_frozen_casts(model: nn.Module, weights: bool = True) -> Callable[[], None]:
    """Give every plain `nn.Linear` of `model` the caching forward; returns the undo. `weights=False`
    shares input casts only (no weight copy outlives its call: for gradient checkpointing)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]  # subclasses (quantized bases) keep theirs
    for linear in linears:
        linear.forward = types.MethodType(_forward if weights else _forward_sharing_inputs, linear)
    _on.append(True)

    def undo() -> None:
        for linear in linears:
            linear.__dict__.pop("forward", None)
            linear.__dict__.pop(CACHE, None)
        _on.pop()
        _last_input.clear()

    return undo


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, device = self.weight, x.device.type
    if weight.requires_grad or not torch.is_autocast_enabled(device):
        return F.linear(x, weight, self.bias)
    dtype = torch.get_autocast_dtype(device)
    if weight.dtype == dtype or not weight.is_floating_point() or weight.is_inference():  # no version counter
        return F.linear(x, weight, self.bias)
    # autocast finds x and the weight already cast, and casts only the bias
    return F.linear(shared_input(x), _cast(self, weight, dtype), self.bias)


def _forward_sharing_inputs(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return F.linear(shared_input(x), self.weight, self.bias)  # shared_input: x itself outside autocast


def _cast(linear: nn.Linear, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cached = linear.__dict__.get(CACHE)
    # The alias keeps the old storage alive, so an equal data_ptr really is the same storage.
    if (cached is None or cached[1] != weight._version or cached[0].data_ptr() != weight.data_ptr()
            or cached[2].dtype != dtype or cached[2].device != weight.device):
        with torch.no_grad():
            cached = (weight.detach(), weight._version, weight.detach().to(dtype))
        linear.__dict__[CACHE] = cached
    return cached[2]


def shared_input(x: torch.Tensor) -> torch.Tensor:
    """x cast to the autocast dtype once for all its consumers, for a consumer that feeds it straight
    into a matmul (where autocast would cast it); x itself when the cache is off or nothing to cast."""
    device = x.device.type
    if not _on or not torch.is_autocast_enabled(device):
        return x
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype or x.dtype not in (torch.float32, torch.float64) or x.is_inference():
        return x
    if not (_last_input and _last_input[0][0] is x and _last_input[0][1] == x._version
            and _last_input[0][2].dtype == dtype):
        with torch.no_grad():
            _last_input[:] = [(x, x._version, x.detach().to(dtype))]
    cast = _last_input[0][2]
    return _SharedCast.apply(x, cast) if x.requires_grad and torch.is_grad_enabled() else cast


class _SharedCast(torch.autograd.Function):
    """x -> the shared cast of x (an alias per consumer); backward: this consumer's gradient cast
    back to x's dtype, exactly autocast's `_to_copy` backward."""

    @staticmethod
    def forward(ctx, x, cast):
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None
