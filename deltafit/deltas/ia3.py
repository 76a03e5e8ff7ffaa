"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors rescale the attention keys and values and the FFN's intermediate activation.

    k <- l_k * (W_k x + b_k)        v <- l_v * (W_v x + b_v)        FFN: W_down (l_ff * a)

Each adapted linear gets one vector, all ones at init, so the model starts exactly at the base.
Following PEFT's IA3 conventions, `target_modules` names the adapted linears and `feedforward_modules`
says which of them are scaled on their *input* (the FFN's down projection: l_ff has one entry per
intermediate unit); the others are scaled on their *output* (bias included). Defaults per architecture:
Llama-family k_proj, v_proj, down_proj (feedforward: down_proj); BERT-family key, value and the FFN's
output.dense; GPT-2 c_attn and mlp.c_proj (c_attn is one fused q/k/v Conv1D, so its vector scales the
queries too, as with PEFT's default). PEFT's BERT default is the suffix 'output.dense', which also
catches 'attention.output.dense' (the attention output projection) and scales its input too; deltafit
follows the paper and anchors it to the FFN (`layer.N.output.dense`).

Family: "addition". (IA)^3 adds new parameters (the vectors) next to frozen weights rather than
choosing existing tensors (specification) or training a low-dimensional proxy of a weight update
(reparameterization); the Ding et al. taxonomy groups such learned rescalings with adapters.

Merge is exact: output scaling folds as W <- diag(l) W, b <- l * b; input scaling as W <- W diag(l).
A checkpoint holds only the vectors, keyed `<module>.ia3_out.scale` / `<module>.ia3_in.scale`, so it
says by itself which side each one scales. PEFT stores the same vectors as `<module>.ia3_l`, shaped
(out, 1) for output scaling and (1, in) for feedforward modules: export and import map them 1:1.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas._lowrank import _replace_weight
from deltafit.deltas._targets import _matches, find_targets, is_transposed, shape
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

OUT, IN = "ia3_out", "ia3_in"  # child names: the vector scales the host's output / its input

_LLAMA = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_BERT = (r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")
# (target_modules, feedforward_modules) per architecture: keys, values and the FFN's down projection.
DEFAULTS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # fused q/k/v: its vector scales q too (as in PEFT)
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    "deberta-v2": (r".*\.attention\.self\.(key_proj|value_proj)|.*\.layer\.\d+\.output\.dense",
                   r".*\.layer\.\d+\.output\.dense"),
    "distilbert": (["k_lin", "v_lin", "ffn.lin2"], ["ffn.lin2"]),
}


class IA3Config(TargetedConfig):
    method: Literal["ia3"] = "ia3"
    feedforward_modules: Optional[Union[str, list[str]]] = Field(
        None,
        description="Which targets are scaled on their input rather than their output (the FFN's down projection, "
        "as in the paper): names or name suffixes, or a regex, as for target_modules; [] for none. "
        "Default: per architecture (down_proj, fc2, BERT's layer.N.output.dense).",
    )


class IA3Scale(nn.Module):
    """h -> l * h over the last dimension, l an fp32 vector of ones at init (so exactly the identity)."""

    def __init__(self, size: int, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size, device=device, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.to(self.scale.dtype) * self.scale).to(h.dtype)


class IA3(Delta):
    name = "ia3"
    family = "addition"
    description = "Learned vectors rescale attention keys/values and the FFN's intermediate activation; merges."
    Config = IA3Config

    def check_fits(self, model: nn.Module) -> None:
        self._targets(model)  # refuses specs matching nothing and feedforward specs outside the targets

    def _attach(self, model: nn.Module) -> None:
        for name, (linear, feedforward) in self._targets(model).items():
            out_features, in_features = shape(linear)
            device = linear.weight.device
            if feedforward:  # l_ff scales the FFN's intermediate activation, the down projection's input
                self.insertions.before(name, linear, IN, IA3Scale(in_features, device))
            else:
                self.insertions.after(name, linear, OUT, IA3Scale(out_features, device))

    def _merge(self) -> None:
        """W <- diag(l) W and b <- l * b (output side), W <- W diag(l) (input side), in fp32."""
        for host, child, update in self.insertions.hosts.values():
            scale = update.scale.detach().to(host.weight.device)
            # The weight is out x in (a Conv1D stores in x out): l runs along out for the output side.
            along_rows = (child == OUT) != is_transposed(host)
            factor = scale[:, None] if along_rows else scale[None, :]
            _replace_weight(host, (host.weight.float() * factor).to(host.weight.dtype))
            if child == OUT and getattr(host, "bias", None) is not None:
                host.bias.data = (host.bias.float() * scale).to(host.bias.dtype)

    def expected_trainable_params(self, model: nn.Module) -> int:
        return sum(shape(m)[1] if ff else shape(m)[0] for m, ff in self._targets(model).values())

    def _targets(self, model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
        """{module name: (linear, scaled on its input)} for the configured or default specs."""
        c = self.config
        default_targets, default_ff = _defaults(model, c.target_modules is None, c.feedforward_modules is None)
        targets = find_targets(model, default_targets if c.target_modules is None else c.target_modules, c.layers)
        ff_spec = default_ff if c.feedforward_modules is None else c.feedforward_modules
        if isinstance(ff_spec, str):
            try:
                re.compile(ff_spec)
            except re.error as e:
                raise UserError(f"recipe key 'delta.feedforward_modules': {ff_spec!r} is not a valid regex ({e})") \
                    from None
        feedforward = {n for n in targets if ff_spec and _matches(n, ff_spec)}
        if c.feedforward_modules and not feedforward:  # PEFT: feedforward modules must be among the targets
            raise UserError(f"recipe key 'delta.feedforward_modules': {c.feedforward_modules!r} matches none of the "
                            f"adapted modules ({', '.join(sorted(targets)[:4])}...); it must name some of "
                            f"delta.target_modules, or be [] for none")
        return {n: (m, n in feedforward) for n, m in targets.items()}

    # PEFT: `<module>.ia3_l`, (out, 1) for output scaling, (1, in) for feedforward modules.

    @classmethod
    def to_peft(cls, config, state, model_config):
        tensors, hosts, feedforward = {}, [], []
        for key, value in state.items():
            host, child = _split(key)
            hosts.append(host)
            if child == IN:
                feedforward.append(host)
            tensors[f"{host}.ia3_l"] = value[None, :] if child == IN else value[:, None]
        fields = {"target_modules": sorted(hosts), "feedforward_modules": sorted(feedforward),
                  "fan_in_fan_out": False, "init_ia3_weights": True, "exclude_modules": None}
        return fields, tensors

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        state, hosts, feedforward = {}, [], []
        for key, value in tensors.items():
            host, marker, rest = key.rpartition(".ia3_l")
            if not host or marker != ".ia3_l" or rest or value.dim() != 2 or 1 not in value.shape:
                raise UserError(f"tensor '{key}' ({tuple(value.shape)}) is not an (IA)^3 vector of a linear layer "
                                f"(<module>.ia3_l shaped (out, 1) or (1, in))")
            # PEFT builds (1, in) exactly for its feedforward modules; a (1, 1) vector asks PEFT's own rule.
            rows, cols = value.shape
            is_ff = rows == 1 and (cols != 1 or _peft_feedforward(fields.get("feedforward_modules"), host))
            hosts.append(host)
            feedforward += [host] if is_ff else []
            state[f"{host}.{IN if is_ff else OUT}.scale"] = value.reshape(-1)
        config = {"method": "ia3", "target_modules": sorted(hosts), "feedforward_modules": sorted(feedforward)}
        return config, state


def _defaults(model: nn.Module, want_targets: bool, want_ff: bool) -> tuple:
    """This architecture's (targets, feedforward) specs; a UserError naming the key when one is needed
    and the architecture has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULTS:
        return DEFAULTS[model_type]
    if want_targets or want_ff:
        key = "delta.target_modules" if want_targets else "delta.feedforward_modules"
        raise UserError(f"recipe key '{key}': method 'ia3' has no default targets for model type '{model_type}' "
                        f"(known: {', '.join(DEFAULTS)}); set delta.target_modules (the key/value projections and "
                        f"the FFN's down projection) and delta.feedforward_modules (the down projection, or [])")
    return None, None


def _split(key: str) -> tuple[str, str]:
    """(host module, 'ia3_out' | 'ia3_in') of a state key '<host>.<child>.scale'."""
    host, child, tensor = (key.rsplit(".", 2) + ["", ""])[:3]
    if child not in (OUT, IN) or tensor != "scale":
        raise UserError(f"tensor '{key}' is not an (IA)^3 vector (<module>.{OUT}.scale or <module>.{IN}.scale)")
    return host, child


def _peft_feedforward(spec, host: str) -> bool:
    """PEFT's own test of a feedforward module: a regex fullmatch, or a plain suffix of the name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, host) is not None
    return any(host.endswith(target) for target in spec or ())


DELTA = IA3
