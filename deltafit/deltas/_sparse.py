"""Sparse and binary deltas shared by diff pruning and learned masking.

Both methods train a dense per-element tensor beside a chosen weight but keep only a sparse or
binary result: global magnitude pruning (`top_k_masks`), a sparse checkpoint form (flat indices +
values, `to_sparse` / `from_sparse`) and a 1-bit packed mask (`pack_bits` / `unpack_bits`).
Checkpoint tensors are validated here, so a damaged or foreign checkpoint is a UserError, not an
index error deep inside torch.
"""

from __future__ import annotations

import torch

from deltafit.errors import UserError

INT32_MAX = 2**31 - 1
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # most significant bit first, as numpy.packbits


def top_k_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly the `k` largest scores over all tensors together (one global
    ranking, as magnitude pruning to a model-wide density does; ties are broken by position)."""
    names = list(scores)
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])
    k = max(0, min(k, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    if k:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[start:start + size].view(scores[name].shape).to(scores[name].device)
        start += size
    return masks


def to_sparse(dense: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) of the kept entries; int32 indices (half the bytes of int64) wherever
    the tensor is small enough, which is every weight matrix of today's models."""
    index = keep.reshape(-1).nonzero().view(-1)
    values = dense.detach().reshape(-1)[index].clone()
    return index.to(torch.int32 if dense.numel() <= INT32_MAX else torch.int64), values


def from_sparse(key: str, index: torch.Tensor, values: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """(dense tensor shaped like `like` holding `values` at `index`, boolean mask of those entries)."""
    numel = like.numel()
    bad = (index.ndim != 1 or values.shape != index.shape or index.dtype not in (torch.int32, torch.int64)
           or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel)))
    if bad:
        raise UserError(f"checkpoint tensor '{key}': not a sparse delta for a {tuple(like.shape)} weight "
                        f"({index.numel()} indices of dtype {index.dtype}, {values.numel()} values)")
    index = index.to(like.device, torch.int64)
    dense = torch.zeros(numel, dtype=like.dtype, device=like.device)
    dense[index] = values.to(like.device, like.dtype)
    keep = torch.zeros(numel, dtype=torch.bool, device=like.device)
    keep[index] = True
    return dense.view(like.shape), keep.view(like.shape)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 entries per byte (flattened, most significant bit first, zero
    padded): the same bytes as numpy.packbits(mask.ravel())."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(key: str, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The boolean tensor shaped like `like` that `pack_bits` packed into `packed`."""
    numel = like.numel()
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 7) // 8:
        raise UserError(f"checkpoint tensor '{key}': not a packed bit mask for a {tuple(like.shape)} weight "
                        f"(expected {(numel + 7) // 8} uint8 bytes, got {tuple(packed.shape)} {packed.dtype})")
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=like.device)
    bits = (packed.to(like.device)[:, None] & weights) != 0
    return bits.reshape(-1)[:numel].view(like.shape)
