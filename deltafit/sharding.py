"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied by deltafit itself (`train.fsdp: true`).

    base model + delta (attached, loaded)  ->  fully_shard(block) for every transformer block
                                            ->  fully_shard(delta module) outside the blocks (soft prompt)
                                            ->  fully_shard(model)  (embeddings, final norm, head)

Every parameter, frozen base and trainable delta alike, becomes a DTensor sharded along dim 0 over
the run's processes; a block's forward all-gathers its parameters (the delta's with them, so the
methods' forward hooks see whole tensors) and frees them after. The optimizer is built on the
sharded parameters, so its state is sharded too. Accelerate does not wrap the model: it cannot
apply FSDP on CPU (`Accelerator(cpu=True)` always goes DDP), and deltafit's checkpoints need the
sharded parameters as they are.

Tensors a checkpoint writes are made whole first (`full_tensors`, a collective) where they must
be (the delta); optimizer state is written as shards instead (`split_shards`): every process
writes `rank-NNNNN.safetensors` with its own slices and `rank-NNNNN.json` with each tensor's full
shape and the dim-0 row its slice starts at. `join_shards` puts the full tensors back together
from any number of shard files, so a run resumes with another number of processes, sharded or not.
No pickle anywhere (torch.distributed.checkpoint's .metadata file is one: not used).

Each process loads the whole base model into CPU memory before sharding it (the device only ever
holds one unsharded block at a time). Methods that train base weights through their own references,
or read their tensors outside the forward pass (extra_loss, before_optimizer_step), are refused.

The helpers below are no-ops on plain tensors, so the trainer calls them on every path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from deltafit.errors import UserError

SHARDS = "shards"  # under a step checkpoint's trainer/: rank-NNNNN.safetensors + rank-NNNNN.json
_GATHERED_EARLY: WeakKeyDictionary = WeakKeyDictionary()  # sharded model -> its units `unshard` gathers


def shard_model(model: nn.Module, accelerator, delta) -> nn.Module:
    """Apply fully_shard to each transformer block, then to the root; returns the same module.

    fully_shard replaces every parameter by a new (sharded) one under the same name. A delta that
    reaches its trainable tensors through its own modules sees the new ones; one that kept references
    to base parameters (methods that train base weights in place: full, layernorm, adapter's norms...)
    would train stale copies, so it is refused."""
    from torch.distributed.fsdp import fully_shard

    from deltafit.deltas._blocks import find_blocks

    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise UserError("recipe key 'train.fsdp': Accelerate is already set up for FSDP or DeepSpeed (accelerate "
                        "config); use one or the other: launch without that config, or set train.fsdp: false")
    if accelerator.mixed_precision == "fp16":
        raise UserError("recipe key 'train.fsdp' with train.mixed_precision fp16: the gradient scaler does not "
                        "agree across shards; use bf16")
    _check_hooks(delta)
    _, blocks = find_blocks(model)
    # fully_shard moves each block to the device as it shards it: the whole model is never there at once.
    for block in blocks:
        fully_shard(block)
    # Delta modules outside the blocks (a soft prompt, a prefix encoder) are used before the root's
    # forward, from prepare_inputs: their own unit, gathered up front (`unshard`) and reduced after backward.
    inside = {id(m) for block in blocks for m in block.modules()}
    early = [m for _, _, m in delta.insertions.hosts.values()
             if id(m) not in inside and next(m.parameters(), None) is not None]
    for module in early:
        fully_shard(module)
    fully_shard(model)
    # FSDP takes the first unit to run forward as the root; a prefix encoder runs before the model does.
    model._get_fsdp_state()._lazy_init()
    _GATHERED_EARLY[model] = [model, *early]
    live = {id(p) for p in model.parameters()}
    stale = [name for name, p in delta.trainable_parameters().items() if id(p) not in live]
    if stale:
        raise UserError(f"recipe key 'train.fsdp': method '{delta.name}' holds its own references to parameters of "
                        f"the base model ({stale[0]}{', ...' if len(stale) > 1 else ''}), which FSDP replaces by "
                        f"sharded ones; train it without FSDP (train.fsdp: false runs DDP)")
    if accelerator.mixed_precision == "bf16":  # what accelerator.prepare would have added to a wrapped model
        model.forward = torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(model.forward)
    return model


def _check_hooks(delta) -> None:
    """extra_loss and before_optimizer_step read the delta's tensors (and gradients) outside the
    forward pass, where each process holds only its shard: a method that uses them is refused."""
    from deltafit.deltas.base import Delta

    used = [hook for hook in ("extra_loss", "before_optimizer_step")
            if getattr(type(delta), hook) is not getattr(Delta, hook)]
    if used:
        raise UserError(f"recipe key 'train.fsdp': method '{delta.name}' reads its tensors outside the forward pass "
                        f"({used[0]}), where FSDP holds only each process's shard; train it without FSDP "
                        f"(train.fsdp: false runs DDP)")


def unshard(model: nn.Module) -> None:
    """Gather the root's own parameters (embeddings...) and the delta's outside the blocks ahead of
    the root's forward: `prepare_inputs` uses them before it (prompt tuning embeds its inputs). They
    are freed after backward, or by `reshard` after an evaluation. No-op on an unsharded model."""
    for unit in _GATHERED_EARLY.get(model, ()):
        unit.unshard()


def reshard(model: nn.Module) -> None:
    for unit in _GATHERED_EARLY.get(model, ()):
        unit.reshard()


def is_sharded(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, sharded ones made whole (a collective: every process calls it, same order)."""
    return {k: (v.full_tensor() if is_sharded(v) else v) for k, v in tensors.items()}


def full(x: Any) -> Any:
    """A sharded (or partial, e.g. a gradient norm) tensor as a plain one; anything else as it is."""
    return x.full_tensor() if is_sharded(x) else x


# ----------------------------------------------------------------------------------------------
# Optimizer state as shards


def split_shards(state: Any, rank: int) -> tuple[Any, dict[str, torch.Tensor], dict]:
    """(state with every sharded tensor replaced by a {'__tensor__': key} reference, this process's
    slices by key, their layout {key: {shape, start}}). Plain tensors stay in the state."""
    slices: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}

    def walk(node, path):
        if is_sharded(node):
            slices[path], layout[path] = _own_slice(node, rank, path)
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return walk(state, "optimizer"), slices, layout


def _own_slice(tensor, rank: int, key: str) -> tuple[torch.Tensor, dict]:
    from torch.distributed.tensor import Shard

    if len(tensor.placements) != 1 or tensor.placements[0] != Shard(0):
        raise UserError(f"optimizer state '{key}' is sharded as {tensor.placements}; deltafit writes dim-0 shards only")
    rows, world = tensor.shape[0], tensor.device_mesh.size()
    start = min(rank * math.ceil(rows / world), rows)  # torch.chunk's split, as DTensor's Shard(0) uses it
    local = tensor.to_local().detach().contiguous().cpu()
    if local.shape[1:] != tensor.shape[1:] or local.shape[0] != min(math.ceil(rows / world), rows - start):
        raise UserError(f"optimizer state '{key}': local shard {tuple(local.shape)} does not fit {tuple(tensor.shape)}")
    return local, {"shape": list(tensor.shape), "start": start}


def staging_dir(checkpoint_dir: Path) -> Path:
    """Where every process writes its shard files for `checkpoint_dir`, before the main process moves
    them into the checkpoint's temporary directory (named as a temporary: pruning removes a leftover)."""
    from deltafit.fsutil import TMP_MARK

    return checkpoint_dir.with_name(f".{checkpoint_dir.name}.{SHARDS}{TMP_MARK}")


def shard_files(staging: Path, world: int) -> tuple[Path, ...]:
    """The files the `world` processes of this run wrote (a killed earlier run may have left others)."""
    return tuple(staging / f"rank-{rank:05d}.{ext}" for rank in range(world) for ext in ("safetensors", "json"))


def write_shards(directory: Path, rank: int, slices: dict[str, torch.Tensor], layout: dict) -> None:
    """This process's slices and their layout, as safetensors + JSON."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(slices, str(directory / f"rank-{rank:05d}.safetensors"))
    (directory / f"rank-{rank:05d}.json").write_text(json.dumps({"rank": rank, "tensors": layout}, indent=1))


def join_shards(directory: Path) -> dict[str, torch.Tensor]:
    """Full tensors from every shard file under `directory` (empty when there are none); every row of
    every tensor must be covered exactly once."""
    from safetensors.torch import load_file

    whole: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for meta_path in sorted(directory.glob("rank-*.json")) if directory.is_dir() else []:
        layout = json.loads(meta_path.read_text())["tensors"]
        slices = load_file(str(meta_path.with_suffix(".safetensors")))
        for key, where in layout.items():
            piece = slices[key]
            if key not in whole:
                whole[key] = torch.zeros(where["shape"], dtype=piece.dtype)
            whole[key][where["start"]:where["start"] + piece.shape[0]] = piece
            covered[key] = covered.get(key, 0) + piece.shape[0]
    short = [k for k, t in whole.items() if covered[k] != t.shape[0]]
    if short:
        raise UserError(f"optimizer shards under '{directory}' do not cover '{short[0]}' exactly "
                        f"({covered[short[0]]} of {whole[short[0]].shape[0]} rows): a shard file is missing")
    return whole


def reshard_optimizer_state(optimizer) -> None:
    """After `optimizer.load_state_dict` with full tensors: shard each state tensor like its
    parameter (every process holds the full tensor, so each takes its slice without communication)."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == p.shape:
                    state[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                    src_data_rank=None)
