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
requires grad (a block LISA unfroze). The caller skips it where the copies would cost memory:
without gradient checkpointing autocast's copies are saved for backward and alive at the step's
peak anyway, with it they are not.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CACHE = "_deltafit_cast"  # instance attribute: (weight alias, weight version, cast); not a buffer, never saved


def cache_frozen_casts(model: nn.Module) -> Callable[[], None]:
    """Give every plain `nn.Linear` of `model` the caching forward; returns the undo."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]  # subclasses (quantized bases) keep theirs
    for linear in linears:
        linear.forward = types.MethodType(_forward, linear)

    def undo() -> None:
        for linear in linears:
            linear.__dict__.pop("forward", None)
            linear.__dict__.pop(CACHE, None)

    return undo


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, device = self.weight, x.device.type
    if weight.requires_grad or not torch.is_autocast_enabled(device):
        return F.linear(x, weight, self.bias)
    dtype = torch.get_autocast_dtype(device)
    if weight.dtype == dtype or not weight.is_floating_point():
        return F.linear(x, weight, self.bias)
    return F.linear(x, _cast(self, weight, dtype), self.bias)  # autocast finds the weight cast and skips it


def _cast(linear: nn.Linear, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cached = linear.__dict__.get(CACHE)
    # The alias keeps the old storage alive, so an equal data_ptr really is the same storage.
    if (cached is None or cached[1] != weight._version or cached[0].data_ptr() != weight.data_ptr()
            or cached[2].dtype != dtype or cached[2].device != weight.device):
        with torch.no_grad():
            cached = (weight.detach(), weight._version, weight.detach().to(dtype))
        linear.__dict__[CACHE] = cached
    return cached[2]
