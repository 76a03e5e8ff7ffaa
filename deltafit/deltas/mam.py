"""MAM adapter ("Mix-And-Match", He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", https://arxiv.org/abs/2110.04366): prefix tuning on the attention plus a scaled
parallel adapter on the FFN, the paper's best combination.

        attention:  [prefix keys/values, p = 30] + keys/values          (prefix.py, its MLP h = 800)
        FFN:        x ──> FFN(x) + s · A(x),  A a bottleneck of m = 512, s = 4  (parallel_adapter.py)

A named preset for a composition: its parts are exactly the deltas `prefix` and `parallel-adapter`,
so `delta: {method: mam}` stores the same tensors, under the same names ('prefix.…',
'parallel-adapter.…'), as writing the two by hand:

    delta:
      - {method: prefix, num_virtual_tokens: 30, hidden: 800}
      - {method: parallel-adapter, placement: ffn, bottleneck: 512, scale: 4.0}

The paper's sizes are for 1024-wide models (RoBERTa-large, BART-large); on a small model the
bottleneck may exceed what the layer can use and is refused with the key to lower.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from deltafit.deltas.base import DeltaConfig
from deltafit.deltas.compose import Compose
from deltafit.errors import UserError


class MAMConfig(DeltaConfig):
    method: Literal["mam"] = "mam"
    prefix_tokens: int = Field(30, ge=1, description="Prefix length p on every attention layer (the paper: 30).")
    prefix_hidden: int = Field(800, ge=1, description="Hidden width of the prefix's reparameterization MLP "
                                                      "(the paper: 800).")
    bottleneck: int = Field(512, ge=1, description="Bottleneck m of the parallel FFN adapter (the paper: 512).")
    scale: float = Field(4.0, gt=0, description="s, the parallel adapter's output scale (the paper: 4.0).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="The adapter's nonlinearity.")
    layers: Optional[list[int]] = Field(
        None, description="Only blocks with these indexes get the FFN adapter (negative counts from the end). "
        "Default: every block.",
    )

    @property
    def num_virtual_tokens(self) -> int:
        """Positions every input gains in front (limits.py holds them against the model's maximum)."""
        return self.prefix_tokens


class MAM(Compose):
    name = "mam"
    family = "addition"
    description = "MAM adapter: prefix tuning on attention + a scaled parallel adapter on the FFN (He et al. 2022)."
    not_mergeable_because = "its prefix and nonlinear adapter are not changes of existing weights"
    Config = MAMConfig
    # Facts of its parts, stated for the class too (the registry's tables and packing read them there).
    zero_init_identity = False
    supports_packing = False

    def _part_configs(self, config: MAMConfig) -> list[DeltaConfig]:
        from deltafit.deltas import config_class

        prefix = {"method": "prefix", "num_virtual_tokens": config.prefix_tokens, "hidden": config.prefix_hidden}
        adapter = {"method": "parallel-adapter", "placement": "ffn", "bottleneck": config.bottleneck,
                   "scale": config.scale, "activation": config.activation, "layers": config.layers}
        return [config_class(part["method"]).model_validate(part) for part in (prefix, adapter)]

    def _in_part(self, error: UserError, index: int, name: str) -> UserError:
        """A part's error in this preset's keys: the user wrote delta.prefix_tokens, not num_virtual_tokens."""
        text = str(error)
        for part_key, own_key in PART_KEYS.items():
            text = text.replace(f"'delta.{part_key}'", f"'delta.{own_key}'")
        return UserError(f"delta '{name}' of the MAM preset: {text}")


# A part's option -> the preset's (the parts' other options keep their names).
PART_KEYS = {"num_virtual_tokens": "prefix_tokens", "hidden": "prefix_hidden"}


DELTA = MAM
