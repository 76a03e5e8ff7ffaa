"""QLoRA (Dettmers et al. 2023): LoRA beside linear layers whose frozen weights are stored 4-bit NF4.

Storage: every targeted weight becomes a torchao `NF4Tensor`. Blocks of `block_size` (64) values
share one absmax scale and each value is the nearest of the 16 NormalFloat levels; the scales are
double-quantized (their mean is subtracted, then they are stored int8 with one fp32 factor per
`scaler_block_size` (256) scales). That is ~4.13 bits per weight instead of 32.
torchao needs the scale count to be a multiple of the scaler block, so a weight whose block count
is not uses the largest divisor of its block count below `scaler_block_size` (e.g. 216 for a
SmolLM2 k_proj with 1728 blocks; bitsandbytes pads instead).

Forward: the host keeps its own `nn.Linear.forward`; `F.linear` on an NF4Tensor dequantizes to the
input's dtype (bf16 under bf16 autocast, as in the paper) and torchao's autograd function saves
the 4-bit weight, not a dequantized copy, for backward. LoRA's B A is added beside, through the
same `LowRankUpdate` LoRA uses. The 4-bit weight replaces the host's `weight` parameter as a
non-persistent buffer, so `.to(device)` moves it while `parameters()`/`state_dict()` skip it.

Lossy by design (`lossy_base`): the base this delta sits on is the quantized one. A fresh delta
leaves the quantized model's output unchanged; `detach()` puts the dequantized weights back as
plain parameters (the originals are not kept: that would undo the memory saving); `merge()` folds
B A into the dequantized weights, so the merged model equals the QLoRA model, not original + B A.

Why torchao and not bitsandbytes (both run on CPU with torch 2.13): NF4Tensor is pure PyTorch and
plugs into an unchanged nn.Linear through `F.linear`, so no module is replaced and the same code
runs on CPU and CUDA; bitsandbytes needs its native library and its own Linear4bit module. The
paper's paged optimizer is not part of this method (it is an optimizer choice).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Literal, Optional, Union

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import LowRankUpdate, lora_scale
from deltafit.deltas._targets import find_targets, in_features, is_transposed, out_features
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.deltas.lora import LoRA
from deltafit.errors import UserError


class QLoRAConfig(TargetedConfig):
    method: Literal["qlora"] = "qlora"
    target_modules: Optional[Union[str, list[str]]] = Field(
        "all-linear",
        description="Modules that are quantized and get a LoRA update: 'all-linear' (every linear but the output "
        "head, as in the paper), a list of exact names or suffixes, or a regex.",
    )
    r: int = Field(64, ge=1, description="Rank of the update B A (the paper uses 64).")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path's input (paper: 0.1 up to 13B).")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")
    block_size: int = Field(64, ge=2, description="Weights per NF4 block sharing one absmax scale.")
    scaler_block_size: int = Field(
        256, ge=1, description="Scales per block of the double quantization (int8 scales, one fp32 factor per block)."
    )


class QLoRA(Delta):
    name = "qlora"
    family = "reparameterization"
    exclusive_hosts = True  # the weights become 4-bit: nothing else may train or fold into them
    description = ("LoRA on a base whose linear weights are stored 4-bit NF4 (double-quantized); "
                   "merges into the dequantized base.")
    lossy_base = True
    Config = QLoRAConfig

    def check_fits(self, model: nn.Module) -> None:
        # the same r beside the same targets, checked before anything is quantized
        _refuse_conv1d(find_targets(model, self.config.target_modules, self.config.layers))
        LoRA.check_fits(self, model)

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        targets = find_targets(model, c.target_modules, c.layers)
        _refuse_shared_weights(model, targets)
        self._quantized: dict[str, tuple[nn.Linear, bool]] = {}
        for name, linear in targets.items():
            self._quantize(name, linear)
            update = LowRankUpdate(in_features(linear), out_features(linear), c.r, scale, c.dropout,
                                   linear.weight.device)
            self.insertions.parallel(name, linear, "lora", update)

    def _quantize(self, name: str, linear: nn.Linear) -> None:
        """Swap the weight parameter for its NF4 form (a buffer); the fp32/bf16 original is freed."""
        weight = linear.weight
        if weight.numel() % self.config.block_size:
            raise UserError(f"recipe key 'delta.block_size': {self.config.block_size} does not divide the "
                            f"{weight.numel()} weights of '{name}'; use a divisor such as 64 or 32")
        n_blocks = weight.numel() // self.config.block_size
        nf4 = to_nf4(weight.detach(), self.config.block_size, _scaler_block(n_blocks, self.config.scaler_block_size))
        del linear.weight
        linear.register_buffer("weight", nf4, persistent=False)
        self._quantized[name] = (linear, weight.requires_grad)

    def _merge(self) -> None:
        print("qlora: merging into the dequantized base (the 4-bit weights, expanded), not the original weights; "
              "the merged model reproduces the QLoRA model", file=sys.stderr)
        for name, (_host, _, update) in self.insertions.hosts.items():
            linear, flag = self._quantized.pop(name.rsplit(".", 1)[0])
            merged = linear.weight.get_original_weight().float() + update.delta_weight().to(linear.weight.device)
            _restore(linear, merged.to(linear.weight.dtype), flag)

    def _detach(self) -> None:
        """Give the hosts plain weight parameters again: the dequantized ones (originals are not kept)."""
        with torch.no_grad():
            for linear, flag in self._quantized.values():
                _restore(linear, linear.weight.get_original_weight(), flag)
        self._quantized.clear()

    def expected_trainable_params(self, model: nn.Module) -> int:
        _refuse_conv1d(find_targets(model, self.config.target_modules, self.config.layers))
        return LoRA.expected_trainable_params(self, model)  # the same r (in + out) per target

    # PEFT: a plain LORA adapter; the tensors are LoRA's (same `LowRankUpdate`, same keys). What the
    # LoRA format cannot say is that they were trained against the NF4 base: on the full-precision
    # base they give slightly different logits; on a 4-bit base they match the training setup.

    @classmethod
    def to_peft(cls, config, state, model_config):
        print("qlora: exported as a LORA adapter; its base was NF4-quantized in deltafit, so on the full-precision "
              "base PEFT's logits differ slightly (load the base in 4-bit NF4 to match training)", file=sys.stderr)
        return LoRA.to_peft(config, state, model_config)


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The NF4 weights inside `model` (for inspection and tests), keyed by module name."""
    nf4_type = _nf4().NF4Tensor
    return {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nf4_type)}


def _restore(linear: nn.Linear, weight: torch.Tensor, requires_grad: bool) -> None:
    del linear.weight  # the NF4 buffer
    linear.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)


def _scaler_block(n_blocks: int, wanted: int) -> int:
    """The largest divisor of n_blocks not above `wanted` (torchao needs an exact fit)."""
    return max(d for d in range(1, min(wanted, n_blocks) + 1) if n_blocks % d == 0)


def _refuse_conv1d(targets: dict[str, nn.Module]) -> None:
    """GPT-2's Conv1D multiplies its weight with torch.addmm, which torchao's NF4Tensor does not
    implement (it handles only F.linear): such a layer cannot keep a 4-bit weight."""
    conv = [name for name, module in targets.items() if is_transposed(module)]
    if conv:
        raise UserError(f"recipe key 'delta.target_modules': '{conv[0]}' is a GPT-2-style Conv1D layer, whose weight "
                        f"cannot be stored 4-bit (NF4 supports only nn.Linear); use method 'lora' on this model, or "
                        f"target its nn.Linear modules only")


def _refuse_shared_weights(model: nn.Module, targets: dict[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for name, linear in targets.items():
        shared = [n for n in owners.get(id(linear.weight), []) if n != name]
        if shared:
            raise UserError(f"recipe key 'delta.target_modules': '{name}' shares its weight with '{shared[0]}' "
                            f"(tied embeddings); quantizing it would change both: leave it out of the targets")


def to_nf4(weight: torch.Tensor, block_size: int, scaler_block_size: int):
    return _nf4().to_nf4(weight, block_size, scaler_block_size)


def _nf4():
    """torchao's NF4 module, imported quietly: torchao's package import tries to load CUDA kernels
    (logging a warning for each one a CPU build cannot load) and registers types with torch's
    pytree (deprecation warnings on recent torch); NF4 needs none of that."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    if sys.modules.get("torchao", False) is None:
        del sys.modules["torchao"]  # hidden from transformers by the CLI (cli._quiet_import_warnings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return nf4_tensor


DELTA = QLoRA
