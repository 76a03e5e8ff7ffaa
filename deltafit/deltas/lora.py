"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A dropout(x), with the rsLoRA scaling option."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import LowRankUpdate, lora_scale
from deltafit.deltas._targets import check_rank, find_targets
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

# PEFT LoraConfig options deltafit's LoRA cannot express, with the value that means "not used".
PEFT_UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {},
                    "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
                    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}


class LoRAConfig(TargetedConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update B A.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input.")
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA).")


class LoRA(Delta):
    name = "lora"
    family = "reparameterization"
    description = "Low-rank update B A beside chosen linear layers; merges into the weights."
    Config = LoRAConfig

    def check_fits(self, model: nn.Module) -> None:
        check_rank(find_targets(model, self.config.target_modules, self.config.layers), self.config.r)

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        scale = lora_scale(c.alpha, c.r, c.rslora)
        for name, linear in find_targets(model, c.target_modules, c.layers).items():
            update = LowRankUpdate(linear.in_features, linear.out_features, c.r, scale, c.dropout, linear.weight.device)
            self.insertions.parallel(name, linear, "lora", update)

    def expected_trainable_params(self, model: nn.Module) -> int:
        targets = find_targets(model, self.config.target_modules, self.config.layers)
        return sum(self.config.r * (m.in_features + m.out_features) for m in targets.values())

    # PEFT: `<module>.lora_A.weight` / `lora_B.weight`; alpha/r or (use_rslora) alpha/sqrt(r).

    @classmethod
    def to_peft(cls, config, state, model_config):
        tensors = {f"{host}.lora_{part}.weight": v for (host, part), v in _split_keys(state, ".lora.").items()}
        hosts = sorted({host for host, _ in _split_keys(state, ".lora.")})
        fields = {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                  "use_rslora": config.rslora, "target_modules": hosts, "bias": "none", "fan_in_fan_out": False,
                  "init_lora_weights": True, "use_dora": False}
        return fields, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        for option, neutral in PEFT_UNSUPPORTED.items():
            if fields.get(option) not in (neutral, None):
                raise UserError(f"PEFT LoRA option {option}={fields[option]!r} has no deltafit equivalent; "
                                f"only plain LoRA/rsLoRA adapters on linear layers can be imported")
        split = _split_keys({k.removesuffix(".weight"): v for k, v in tensors.items()}, ".lora_")
        state = {f"{host}.lora.{part}": v for (host, part), v in split.items()}
        config = {"method": "lora", "r": int(fields["r"]), "alpha": float(fields["lora_alpha"]),
                  "dropout": float(fields.get("lora_dropout") or 0.0), "rslora": bool(fields.get("use_rslora")),
                  "target_modules": sorted({host for host, _ in split})}
        return config, state


def _split_keys(state: dict, marker: str) -> dict:
    """{(host module, 'A' | 'B'): tensor} from keys '<host><marker>A'; anything else is refused."""
    split = {}
    for key, value in state.items():
        host, _, part = key.rpartition(marker)
        if not host or part not in ("A", "B"):
            raise UserError(f"tensor '{key}' is not a LoRA A/B matrix (embedding or bias LoRA cannot be imported)")
        split[(host, part)] = value
    return split


DELTA = LoRA
