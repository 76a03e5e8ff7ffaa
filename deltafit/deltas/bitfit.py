"""BitFit (Ben Zaken et al. 2022): only the bias terms (plus the task head) train.

Every parameter named `*.bias` trains, LayerNorm biases included (as in the paper's code). The
subset variant trains only the query bias and the middle-of-MLP bias of every block (the first MLP
layer's, hidden -> 4 x hidden: BERT's `intermediate.dense`), the two the paper found change most:
about half of the block biases (45% on BERT-base). The biases are the model's own tensors, trained in place: `merge()`
keeps their trained values (nothing to fold), `detach()` restores the starting values it kept
(biases are tiny, so the copy costs nothing).

Models whose blocks have no biases (Llama, Mistral...) are refused with a clear error: BitFit would
silently train only the task head there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from deltafit.deltas._inplace import InPlaceDelta
from deltafit.deltas._targets import block_index, find_targets
from deltafit.deltas.base import DeltaConfig, base_named_parameters
from deltafit.errors import UserError

# Subset variant, per architecture: a regex over module names whose bias trains (query projection
# and the block's first MLP layer, the "middle-of-MLP" bias of the paper: its 3072-wide output on
# BERT-base; the MLP's output layer, 3072 -> 768, is not part of the subset).
SUBSET_MODULES = {
    "bert": r".*\.(attention\.self\.query|intermediate\.dense)",
    "roberta": r".*\.(attention\.self\.query|intermediate\.dense)",
    "xlm-roberta": r".*\.(attention\.self\.query|intermediate\.dense)",
    "electra": r".*\.(attention\.self\.query|intermediate\.dense)",
    "deberta-v2": r".*\.(attention\.self\.query_proj|intermediate\.dense)",
    "distilbert": r".*\.(attention\.q_lin|ffn\.lin1)",
}


class BitFitConfig(DeltaConfig):
    method: Literal["bitfit"] = "bitfit"
    subset: bool = Field(
        False, description="Train only the query bias and the middle-of-MLP bias (the first MLP layer's, "
        "hidden -> 4 x hidden) of every block (the paper's subset, about half of the biases), instead of every bias."
    )


class BitFit(InPlaceDelta):
    name = "bitfit"
    family = "specification"
    description = "Only bias terms train (plus the task head); needs a model with biases (BERT-like)."
    Config = BitFitConfig

    def _chosen(self, model: nn.Module) -> dict[str, nn.Parameter]:
        _check_has_biases(model)
        if not self.config.subset:
            return {n: p for n, p in base_named_parameters(model) if n == "bias" or n.endswith(".bias")}
        modules = find_targets(model, _subset_regex(model), kinds=(nn.Module,))
        return {f"{n}.bias": m.bias for n, m in modules.items() if getattr(m, "bias", None) is not None}


def _check_has_biases(model: nn.Module) -> None:
    """Refuse models whose transformer blocks have no bias at all (only a head would train)."""
    in_blocks = [n for n, _ in base_named_parameters(model) if n.endswith(".bias") and block_index(n) is not None]
    if not in_blocks:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(
            f"method 'bitfit': this model ({model_type}) has no bias terms in its transformer blocks, so BitFit "
            f"would train nothing but the task head; use a model with biases (BERT, RoBERTa...) or another "
            f"method (lora, adapter, full)"
        )


def _subset_regex(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUBSET_MODULES:
        raise UserError(
            f"recipe key 'delta.subset': the BitFit subset (query + middle-of-MLP bias) is not defined for model type "
            f"'{model_type}' (known: {', '.join(SUBSET_MODULES)}); set subset: false to train every bias"
        )
    return SUBSET_MODULES[model_type]


DELTA = BitFit
