"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): only the norm layers train.

The weights of every LayerNorm/RMSNorm module (and their biases where they have them: LayerNorm
does, RMSNorm does not) train, plus the task head; nothing is added to the model. A norm is found by
its type, not its name (`nn.LayerNorm`, `nn.RMSNorm`, or a class named `*LayerNorm` / `*RMSNorm`:
LlamaRMSNorm, T5LayerNorm...), so every architecture works without a per-model list; the final norm
(Llama's `model.norm`) is included, as in PEFT's LN_TUNING defaults.

Like BitFit, the tensors are the model's own, trained in place (`_inplace.InPlaceDelta`): a
checkpoint holds the trained norm tensors under their model names, `merge()` keeps them (nothing to
fold), `detach()` restores the starting values it kept (norms are tiny, so the copy costs nothing).

PEFT's LN_TUNING stores a trained copy of each whole norm module under
`base_model.model.<module>.ln_tuning_layers.<weight|bias>`: export and import map these keys 1:1.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from deltafit.deltas._inplace import InPlaceDelta
from deltafit.deltas._targets import find_targets
from deltafit.deltas.base import TargetedConfig, base_named_modules
from deltafit.errors import UserError

PEFT_LAYER = ".ln_tuning_layers."  # PEFT keeps the trained copy of a norm under this child
PEFT_UNSUPPORTED = {"exclude_modules": None}  # applied before saving: the tensors already say which norms


class LayerNormConfig(TargetedConfig):
    method: Literal["layernorm"] = "layernorm"
    # target_modules / layers come from TargetedConfig; here they choose among the norm modules only
    # (None: every norm of the model, the final one included).


class LayerNormTuning(InPlaceDelta):
    name = "layernorm"
    family = "specification"
    description = "Only the LayerNorm/RMSNorm weights (and biases) train, plus the task head; merges (in place)."
    Config = LayerNormConfig

    def check_fits(self, model: nn.Module) -> None:
        self._norms(model)  # refuses a model without norms, or a target spec matching none

    def describe_targets(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[0] for n in self.base_params.params})

    def _chosen(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """{model parameter name: tensor} of the chosen norms' own weights and biases."""
        return {f"{name}.{p_name}": p for name, module in self._norms(model).items()
                for p_name, p in module.named_parameters(recurse=False)}

    def _norms(self, model: nn.Module) -> dict[str, nn.Module]:
        kinds = tuple({type(m) for _, m in base_named_modules(model) if is_norm(m)})
        if not kinds:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise UserError(f"method 'layernorm': this model ({model_type}) has no LayerNorm/RMSNorm module with "
                            f"a weight, so nothing would train; use another method (bitfit, lora...)")
        # None means every norm: a regex matching any name (find_targets' own default is LoRA's list).
        spec = ".*" if self.config.target_modules is None else self.config.target_modules
        return find_targets(model, spec, self.config.layers, kinds=kinds)

    # PEFT: `<module>.ln_tuning_layers.weight` (and `.bias`), a trained copy of the whole norm.

    @classmethod
    def to_peft(cls, config, state, model_config):
        tensors = {}
        for key, value in state.items():
            module, _, tensor = key.rpartition(".")
            tensors[f"{module}{PEFT_LAYER}{tensor}"] = value
        hosts = sorted({key.rpartition(".")[0] for key in state})
        return {"target_modules": hosts, "exclude_modules": None}, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        for option, neutral in PEFT_UNSUPPORTED.items():
            if fields.get(option) not in (neutral, None, []):
                raise UserError(f"PEFT LN_TUNING option {option}={fields[option]!r} has no deltafit equivalent; "
                                f"re-save the adapter without it")
        state = {}
        for key, value in tensors.items():
            module, marker, tensor = key.rpartition(PEFT_LAYER)
            if not marker or not module or "." in tensor:
                raise UserError(f"tensor '{key}' is not a norm copy of a PEFT LN_TUNING adapter "
                                f"(<module>{PEFT_LAYER}weight/bias)")
            state[f"{module}.{tensor}"] = value
        hosts = sorted({key.rpartition(".")[0] for key in state})
        return {"method": "layernorm", "target_modules": hosts}, state


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm with a learnable weight (an `elementwise_affine=False` norm has nothing to train)."""
    named = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return named and isinstance(getattr(module, "weight", None), nn.Parameter)


DELTA = LayerNormTuning
