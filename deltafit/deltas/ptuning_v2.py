"""P-Tuning v2 (Liu et al. 2022): deep prompts, i.e. trainable key/value vectors at every attention
layer, trained directly. That is prefix tuning without the reparameterization MLP, so this is
prefix.py's method under the name the literature uses: same module, same tensors (`delta_prefix.*`),
same cache mechanics, and the same PEFT export (PREFIX_TUNING, prefix_projection false). Only the
options differ: no MLP to configure, and the paper's prompt lengths (20-100).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deltafit.deltas.base import DeltaConfig
from deltafit.deltas.prefix import PrefixTuning


class PTuningV2Config(DeltaConfig):
    method: Literal["ptuning-v2"] = "ptuning-v2"
    num_virtual_tokens: int = Field(
        20, ge=1, description="Prompt length p: trainable key/value vectors per layer (20-100 in the paper: "
        "short for simple classification, ~100 for hard sequence labelling).",
    )

    # What PrefixTuning reads of a prefix config: the table trains directly, so no MLP and no width.
    @property
    def reparameterize(self) -> bool:
        return False

    @property
    def hidden(self) -> int:
        return 0  # unused without reparameterization


class PTuningV2(PrefixTuning):
    name = "ptuning-v2"
    description = "Deep prompts: trainable key/value vectors at every layer, trained directly (prefix, no MLP)."
    Config = PTuningV2Config

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        """PREFIX_TUNING adapters import as 'prefix' (the first method of that type); this keeps
        this class's own import consistent should it be asked directly."""
        config, state = super().from_peft(fields, tensors, model_config)
        return {"method": cls.name, "num_virtual_tokens": config["num_virtual_tokens"]}, state


DELTA = PTuningV2
