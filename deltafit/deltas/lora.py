"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A dropout(x), with the rsLoRA scaling option.

`init` chooses the starting A and B. default (Kaiming-uniform A, zero B) and gaussian (A ~ N(0, 1/r^2),
PEFT's "gaussian") start exactly at the base. pissa (Meng et al. 2024) and olora start B A at the top
of W0 itself (its principal singular triplets; its QR factors) and replace the frozen weight by the
residual W0 - s B0 A0, so the model still starts at the base (up to fp32 rounding). That changes base
weights in place, so for these two:
- the original weights are kept (a reference, not a copy: the residual is a new tensor) and detach()
  puts them back bit for bit; merge() keeps the merged residual + s B A instead;
- the initial factors A0, B0 are buffers stored in the checkpoint (r (in + out) numbers per layer,
  as many as the LoRA itself). Reload rebuilds the residual from W0 and the stored A0, B0 with the
  same function as attach, so it is exact whatever the SVD/QR of the reloading machine would give
  (LAPACK and CUDA differ in the last bits and in singular vectors' signs), and export needs them:
- PEFT export converts to a plain LoRA on the ORIGINAL base, as PEFT's
  `path_initial_model_for_weight_conversion` does: s B A - s B0 A0 = s [B, -B0] [A; A0], rank 2r,
  alpha doubled (times sqrt(2) under rsLoRA) so the scale is unchanged.
Cost: pissa runs a full SVD per target at attach (PEFT's "pissa" too; ~11 s for SmolLM2-135M's 210
linears on 2 cores); `svd_niter: N` takes a randomized SVD instead (PEFT's "pissa_niter_N"), ~10x
faster. Reattaching to load a checkpoint (eval, merge, export, --resume) skips the factorization:
the stored A0, B0 replace it anyway. B A starts large, so gradients are ~10x LoRA's: PiSSA trains
with lower learning rates (the paper: 2e-5), and without dropout: the LoRA path's dropout would drop
part of W0's principal component itself (PEFT's PiSSA example sets lora_dropout=0).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._lowrank import (
    LowRankUpdate,
    _replace_weight,
    base_factors,
    lora_scale,
    replace_dense_weight,
    residual_weight,
)
from deltafit.deltas._targets import (
    check_rank,
    dense_weight,
    find_targets,
    in_features,
    is_transposed,
    out_features,
    shape,
)
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

# PEFT LoraConfig options deltafit's LoRA cannot express, with the value that means "not used".
# (fan_in_fan_out is not one: it only says the target stores its weight (in, out), as GPT-2's Conv1D
# does; lora_A/lora_B have the same shapes either way, and deltafit reads the layer's own layout.)
PEFT_UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "rank_pattern": {},
                    "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
                    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}
# Inits whose LoRA path starts at part of W0, the frozen base holding the rest (the residual).
RESIDUAL_INITS = ("pissa", "olora")
# PEFT init_lora_weights values whose adapter only works on a base PEFT changed at init (saved
# without path_initial_model_for_weight_conversion): refused on import.
PEFT_BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoRAConfig(TargetedConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update B A.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input.")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="Starting A and B. default: Kaiming-uniform A, zero B. gaussian: A ~ N(0, (1/r)^2), zero B "
        "(PEFT's). pissa: B A = the top-r singular part of W0, the frozen weight becomes W0 minus it (PiSSA). "
        "olora: the same with W0's first r QR factors. pissa/olora exports convert to a rank-2r LoRA on the base; "
        "train them with ~1/10 of LoRA's lr and dropout 0 (dropout would hit W0's principal part).",
    )
    svd_niter: Optional[int] = Field(
        None, ge=1, le=64, description="init pissa only: a randomized SVD (torch.svd_lowrank) with this many subspace "
        "iterations instead of the full SVD (PEFT's pissa_niter_N); 4 is close to exact and ~10x faster. "
        "Default: the full SVD.",
    )

    @model_validator(mode="after")
    def _niter_needs_pissa(self):
        if self.svd_niter is not None and self.init != "pissa":
            raise ValueError(f"'delta.svd_niter' applies to init: pissa only (init is '{self.init}')")
        return self


class LoRA(Delta):
    name = "lora"
    family = "reparameterization"
    description = "Low-rank update B A beside chosen linear layers; merges into the weights."
    Config = LoRAConfig

    def __init__(self, config: LoRAConfig):
        super().__init__(config)
        self._originals: dict[str, tuple[nn.Linear, torch.Tensor]] = {}  # pissa/olora: host name -> (host, W0)

    def check_fits(self, model: nn.Module) -> None:
        check_rank(find_targets(model, self.config.target_modules, self.config.layers), self.config.r)

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        targets = find_targets(model, c.target_modules, c.layers)
        if c.init in RESIDUAL_INITS:
            _refuse_shared_weights(model, targets, c.init)
        for name, linear in targets.items():
            update = LowRankUpdate(in_features(linear), out_features(linear), c.r, scale, c.dropout,
                                   linear.weight.device)
            self._initialize(name, linear, update)
            self.insertions.parallel(name, linear, "lora", update)

    def _initialize(self, name: str, linear: nn.Linear, update: LowRankUpdate) -> None:
        """Apply `init` (default: what LowRankUpdate already drew). On the meta device (planning) only
        the shapes exist, and a restoring attach loads factors right after: pissa/olora then register
        empty factors and leave the weight alone (load_state_dict builds the residual)."""
        init, meta = self.config.init, linear.weight.device.type == "meta"
        real = not meta
        with torch.no_grad():
            if init == "gaussian" and real:
                nn.init.normal_(update.A, std=1 / self.config.r)
            if init not in RESIDUAL_INITS:
                return
            A0, B0 = torch.zeros_like(update.A), torch.zeros_like(update.B)
            if real:
                self._originals[name] = (linear, linear.weight.data)
            if real and not self.restoring:
                weight = dense_weight(linear)  # out x in, whatever the layer stores (Conv1D: in x out)
                factors = base_factors(weight, self.config.r, update.scale, init, self.config.svd_niter)
                A0, B0 = (t.to(update.A.device) for t in factors)
                replace_dense_weight(linear, residual_weight(weight, A0, B0, update.scale))
            update.A.copy_(A0)
            update.B.copy_(B0)
        update.register_buffer("A0", A0, persistent=False)  # stored through _extra_state
        update.register_buffer("B0", B0, persistent=False)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """pissa/olora: the initial factors (the residual base is rebuilt from them on reload)."""
        return {f"{key}.{part}": getattr(update, part) for key, (_, _, update) in self.insertions.hosts.items()
                for part in ("A0", "B0") if hasattr(update, part)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load, then rebuild each residual base from W0 and the checkpoint's A0, B0 (not this attach's)."""
        super().load_state_dict(state)
        with torch.no_grad():
            for linear, original in self._originals.values():
                update, weight = linear.lora, linear.weight
                dense = (original.t() if is_transposed(linear) else original).to(weight.device)
                residual = residual_weight(dense, update.A0, update.B0, update.scale)
                replace_dense_weight(linear, residual.to(weight.dtype))

    def _detach(self) -> None:
        """pissa/olora: the original weights back, bit for bit (the very tensors attach replaced)."""
        with torch.no_grad():
            for linear, original in self._originals.values():
                _replace_weight(linear, original.to(linear.weight.device, linear.weight.dtype))
        self._originals.clear()

    def _merge(self) -> None:
        super()._merge()  # residual + s B A: the trained model's weights, which detach must now keep
        self._originals.clear()

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r * sum(shape(m)) for m in targets.values())

    # PEFT: `<module>.lora_A.weight` / `lora_B.weight`; alpha/r or (use_rslora) alpha/sqrt(r).

    @classmethod
    def to_peft(cls, config, state, model_config):
        trained = {k: v for k, v in state.items() if not k.endswith((".A0", ".B0"))}
        split = _split_keys(trained, ".lora.")
        r, alpha = config.r, config.alpha
        init = getattr(config, "init", "default")  # LoRA-FA and QLoRA export through here too
        if init in RESIDUAL_INITS:
            initial = _split_keys({k: v for k, v in state.items() if k not in trained}, ".lora.", ("A0", "B0"))
            split, r, alpha = _on_original_base(split, initial, config)
        tensors = {f"{host}.lora_{part}.weight": v for (host, part), v in split.items()}
        hosts = sorted({host for host, _ in split})
        fields = {"r": r, "lora_alpha": alpha, "lora_dropout": config.dropout,
                  "use_rslora": config.rslora, "target_modules": hosts, "bias": "none",
                  "fan_in_fan_out": False,  # export sets it from the targets' layer kind
                  "init_lora_weights": "gaussian" if init == "gaussian" else True, "use_dora": False}
        return fields, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        if fields.get("use_dora"):  # PEFT's DoRA is a LORA adapter with a magnitude vector
            from deltafit.deltas import get

            return get("dora").from_peft(fields, tensors, model_config)
        refuse_peft_options(fields)
        split = _split_keys({k.removesuffix(".weight"): v for k, v in tensors.items()}, ".lora_")
        state = {f"{host}.lora.{part}": v for (host, part), v in split.items()}
        return peft_base_config(fields, "lora", split), state


def refuse_peft_options(fields: dict, allowed: tuple[str, ...] = ()) -> None:
    """Refuse PEFT LoRA options deltafit cannot express (those in `allowed` excepted), and adapters
    trained on a base PEFT changed at init (PiSSA & co. saved without conversion)."""
    for option, neutral in PEFT_UNSUPPORTED.items():
        if option not in allowed and fields.get(option) not in (neutral, None):
            raise UserError(f"PEFT LoRA option {option}={fields[option]!r} has no deltafit equivalent; "
                            f"only plain LoRA/rsLoRA/DoRA adapters on linear layers can be imported")
    init = fields.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(PEFT_BASE_CHANGING):
        raise UserError(f"PEFT LoRA option init_lora_weights={init!r}: the adapter needs the base PEFT changed at "
                        f"init; save it with path_initial_model_for_weight_conversion (a plain LoRA on the "
                        f"original base) to import it")


def peft_base_config(fields: dict, method: str, split: dict) -> dict:
    """The deltafit config of a PEFT LORA adapter (LoRA or DoRA): rank, scaling, dropout, targets."""
    return {"method": method, "r": int(fields["r"]), "alpha": float(fields["lora_alpha"]),
            "dropout": float(fields.get("lora_dropout") or 0.0), "rslora": bool(fields.get("use_rslora")),
            "target_modules": sorted({host for host, _ in split})}


def _on_original_base(split: dict, initial: dict, config) -> tuple[dict, int, float]:
    """A PiSSA/OLoRA result (W0 - s B0 A0 + s B A) as a plain LoRA on W0: s [B, -B0] [A; A0]
    at rank 2r, alpha scaled so alpha'/r' (or alpha'/sqrt(r') under rsLoRA) is still s."""
    plain = {}
    for host in sorted({h for h, _ in split}):
        plain[(host, "A")] = torch.cat([split[(host, "A")], initial[(host, "A0")]], dim=0)
        plain[(host, "B")] = torch.cat([split[(host, "B")], -initial[(host, "B0")]], dim=1)
    return plain, 2 * config.r, config.alpha * (math.sqrt(2) if config.rslora else 2)


def _split_keys(state: dict, marker: str, parts: tuple[str, ...] = ("A", "B")) -> dict:
    """{(host module, part): tensor} from keys '<host><marker><part>'; anything else is refused."""
    split = {}
    for key, value in state.items():
        host, _, part = key.rpartition(marker)
        if not host or part not in parts:
            raise UserError(f"tensor '{key}' is not a LoRA A/B matrix (embedding or bias LoRA cannot be imported)")
        split[(host, part)] = value
    return split


def _refuse_shared_weights(model: nn.Module, targets: dict[str, nn.Module], init: str) -> None:
    """A target whose weight another module shares (tied embeddings) cannot take a residual base:
    replacing it would change the other module too, and the model would not start at the base."""
    by_weight = {id(linear.weight): target for target, linear in targets.items()}
    for name, module in model.named_modules(remove_duplicate=False):
        target = by_weight.get(id(getattr(module, "weight", None)))
        if target is not None and name != target:
            raise UserError(f"recipe key 'delta.init': {init} replaces the weight of '{target}' by a residual, "
                            f"but '{name}' shares it (tied embeddings): leave it out of delta.target_modules")


DELTA = LoRA
