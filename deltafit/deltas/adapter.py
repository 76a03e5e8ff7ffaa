"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021 for the one-adapter variant).

a(h) = h + W_up f(W_down h + b_down) + b_up, inserted right after a block's attention output
projection and after its FFN output projection (Houlsby), or after the FFN output only (Pfeiffer),
i.e. before the residual add. W_up and b_up start at exactly zero, so a freshly attached model
computes exactly the base; W_down starts near zero (truncated normal, std 1e-2, as in the paper).
Parameters per adapter: 2md + m + d.

LayerNorms: Houlsby also trains the LayerNorms that follow each adapter. For post-norm models
(BERT) these are the block's two LayerNorms (attention.output.LayerNorm, output.LayerNorm). Llama
is pre-norm; the norms reading the adapted residual stream are the block's own input_layernorm and
post_attention_layernorm, so the same rule is used everywhere: every norm module inside a block
that got an adapter trains. They are trained in place and restored by `detach()`.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._inplace import InPlaceParams
from deltafit.deltas._targets import find_targets, out_features
from deltafit.deltas.base import Delta, TargetedConfig, base_named_modules
from deltafit.errors import UserError

# Per architecture: regexes for (attention output projection, FFN output projection). Regexes,
# not suffixes: in BERT 'output.dense' is a suffix of 'attention.output.dense' too.
HOSTS = {
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "mistral": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "qwen2": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "qwen3": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "gemma": (r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj"),
    "bert": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "roberta": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "xlm-roberta": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "electra": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "distilbert": (r".*\.attention\.out_lin", r".*\.ffn\.lin2"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),  # Conv1D projections
}

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")


class AdapterConfig(TargetedConfig):
    method: Literal["adapter"] = "adapter"
    bottleneck: Optional[int] = Field(
        None, ge=1, description="Bottleneck size m of every adapter. Default 64 unless reduction_factor is set."
    )
    reduction_factor: Optional[float] = Field(
        None, gt=0, description="Alternative to bottleneck: m = hidden size / reduction_factor (e.g. 16)."
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="Nonlinearity f inside the bottleneck."
    )
    variant: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: adapters after the attention and the FFN output projections of every block; "
        "pfeiffer: after the FFN output only. Ignored when target_modules is set.",
    )
    train_layernorms: bool = Field(
        True, description="Also train the norm layers of every block that got an adapter (Houlsby's recipe)."
    )

    @model_validator(mode="after")
    def _one_size(self):
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("set either bottleneck or reduction_factor, not both")
        return self

    def size(self, hidden: int) -> int:
        """The bottleneck m for a layer of width `hidden`."""
        if self.reduction_factor is not None:
            return max(1, int(hidden // self.reduction_factor))
        return self.bottleneck or 64


class Bottleneck(nn.Module):
    """h -> h + W_up f(W_down h + b_down) + b_up, computed in fp32, returned in h's dtype."""

    def __init__(self, width: int, size: int, activation: str, device=None):
        super().__init__()
        self.down = nn.Linear(width, size, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, width, device=device, dtype=torch.float32)
        if self.down.weight.device.type != "meta":
            nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # exactly zero: the block starts as the identity
            nn.init.zeros_(self.up.bias)

    def update(self, h: torch.Tensor) -> torch.Tensor:
        """W_up f(W_down h + b_down) + b_up alone, in fp32: what a parallel adapter adds beside a sublayer."""
        return self.up(self.act(self.down(h.to(torch.float32))))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.update(h).to(h.dtype)


class Adapter(Delta):
    name = "adapter"
    family = "addition"
    description = "Bottleneck adapters after the attention and FFN outputs of every block (Houlsby/Pfeiffer)."
    not_mergeable_because = "the adapter's nonlinearity cannot be folded into a linear weight"
    Config = AdapterConfig

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.base_params = InPlaceParams()

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, host in self._hosts(model).items():
            width = out_features(host)
            module = Bottleneck(width, c.size(width), c.activation, host.weight.device)
            self.insertions.after(name, host, "adapter", module)
        if c.train_layernorms:
            self.base_params.unfreeze(self._norms(model), keep_originals=True)

    def _detach(self) -> None:
        self.base_params.restore()
        self.base_params.clear()

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return {**dict(self.insertions.named_parameters()), **self.base_params.params}

    def expected_trainable_params(self, model: nn.Module) -> int:
        adapters = 0
        for host in self._hosts(model).values():
            d = out_features(host)
            m = self.config.size(d)
            adapters += 2 * m * d + m + d
        norms = sum(p.numel() for p in self._norms(model).values()) if self.config.train_layernorms else 0
        return adapters + norms

    def _hosts(self, model: nn.Module) -> dict[str, nn.Linear]:
        c = self.config
        return find_targets(model, c.target_modules or _default_hosts(model, c.variant), c.layers)

    def _norms(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Parameters of every norm module inside a block that holds an adapter host."""
        blocks = {_BLOCK.match(n).group(1) for n in self._hosts(model) if _BLOCK.match(n)}
        norms = {}
        for name, module in base_named_modules(model):
            if "norm" in type(module).__name__.lower() and any(name.startswith(b + ".") for b in blocks):
                norms.update({f"{name}.{pn}": p for pn, p in module.named_parameters(recurse=False)})
        return norms


def _default_hosts(model: nn.Module, variant: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in HOSTS:
        raise UserError(
            f"method 'adapter': no default adapter positions for model type '{model_type}' "
            f"(known: {', '.join(HOSTS)}); set delta.target_modules to the attention/FFN output projections"
        )
    attn, ffn = HOSTS[model_type]
    return ffn if variant == "pfeiffer" else f"{attn}|{ffn}"


DELTA = Adapter
