"""Parallel adapters (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", https://arxiv.org/abs/2110.04366).

A bottleneck beside a whole sublayer (the FFN, or the attention) rather than after it: it reads
what the sublayer reads, and its output, scaled by s, is added to what the sublayer writes, before
the residual add:

        x ──┬──> sublayer S (attention or FFN) ─────────────(+)──> S(x) + s·A(x) ──> residual add
            └──> A(x) = W_up f(W_down x + b_down) + b_up ─ × s ─┘

The paper finds the FFN the best place (its MAM adapter: a parallel adapter on the FFN, bottleneck
512, s = 4). Initialization as in its code (`init_option="lora"`): W_down Kaiming-uniform, b_down,
W_up and b_up zero, so a freshly attached model computes exactly the base. Parameters per adapter:
2md + m + d. Not mergeable: f is nonlinear. The bottleneck is the Houlsby adapter's (adapter.py),
used without its residual: its `update`, in fp32, cast to the sublayer's output dtype.

Where "the sublayer" is, per architecture (HOSTS):
- pre-norm models (Llama, Mistral, Qwen, Gemma: `self_attn`, `mlp`; GPT-2: `attn`, `mlp`): one module
  reads the sublayer input x (after the block's norm) and returns the sublayer output before the
  residual add. Hook "output": out <- out + s·A(x); attention returns a tuple, element 0 gets it.
- post-norm models (BERT, RoBERTa, ELECTRA): no module computes the FFN alone, it is split over
  `intermediate` and `output`, and `output(h, input_tensor)` = LayerNorm(dropout(dense(h)) +
  input_tensor) does the residual add, where input_tensor *is* the sublayer input x (the same for
  `attention.output`). Hook "residual": input_tensor <- x + s·A(x), giving LayerNorm(S(x) + s·A(x) + x),
  the paper's formula (its RoBERTa code adds the adapter output at that same point, after dropout).
"""

from __future__ import annotations

import math
import re
from typing import Literal, NamedTuple, Optional

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas._targets import check_within_base, find_targets, linear_kinds, shape
from deltafit.deltas.adapter import Bottleneck
from deltafit.deltas.base import Delta, TargetedConfig
from deltafit.errors import UserError

CHILD = "parallel_adapter"  # the adapter's name under its host module (in state_dict keys)


class Sublayers(NamedTuple):
    """Regexes over module names for one architecture's sublayers, and how they are hooked."""

    attention: str
    ffn: str
    hook: Literal["output", "residual"] = "output"


_POST_NORM = Sublayers(r".*\.attention\.output", r".*\.layer\.\d+\.output", "residual")
HOSTS = {
    "llama": Sublayers(r".*\.self_attn", r".*\.mlp"),
    "mistral": Sublayers(r".*\.self_attn", r".*\.mlp"),
    "qwen2": Sublayers(r".*\.self_attn", r".*\.mlp"),
    "qwen3": Sublayers(r".*\.self_attn", r".*\.mlp"),
    "gemma": Sublayers(r".*\.self_attn", r".*\.mlp"),
    "gpt2": Sublayers(r".*\.attn", r".*\.mlp"),  # not `crossattention` (a decoder's extra sublayer)
    "bert": _POST_NORM,
    "roberta": _POST_NORM,
    "xlm-roberta": _POST_NORM,
    "electra": _POST_NORM,
}


class ParallelAdapterConfig(TargetedConfig):
    method: Literal["parallel-adapter"] = "parallel-adapter"
    placement: Literal["ffn", "attention", "both"] = Field(
        "ffn", description="Sublayers that get an adapter beside them: ffn (the paper's best), attention, or both. "
        "Ignored when target_modules is set.",
    )
    bottleneck: int = Field(
        64, ge=1, description="Bottleneck size m of every adapter (the paper's MAM adapter uses 512 on 1024-wide "
        "models; 64 keeps small models cheap).",
    )
    scale: float = Field(4.0, gt=0, description="s: the adapter's output is multiplied by s before it is added "
                                                "(the paper uses 4.0).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="Nonlinearity f inside the bottleneck."
    )


class Site(NamedTuple):
    """One adapter position: the module hooked, the width d of x and of the output, and the hook kind."""

    module: nn.Module
    width: int
    hook: str


class ParallelAdapter(Delta):
    name = "parallel-adapter"
    family = "addition"
    description = "Bottleneck adapters beside the FFN (and/or attention) sublayers, output scaled by s (He et al.)."
    not_mergeable_because = "the adapter's nonlinearity cannot be folded into a linear weight"
    Config = ParallelAdapterConfig

    def __init__(self, config: ParallelAdapterConfig):
        super().__init__(config)
        self._handles: list = []  # hooks not tracked by `insertions` (it has no input-reading primitive)

    def check_fits(self, model: nn.Module) -> None:
        """Refuse an unknown architecture, a target whose widths differ (in `_sites`), and a bottleneck
        whose adapters would outweigh the whole base (a typo like 10**6 would otherwise try to allocate)."""
        per_unit = sum(2 * s.width + 1 for s in self._sites(model).values())  # numbers per unit of m
        check_within_base(model, "delta.bottleneck", self.config.bottleneck, per_unit, "the parallel adapters")

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        for name, site in self._sites(model).items():
            adapter = _bottleneck(site.width, c.bottleneck, c.activation, _device(model, site.module))
            self.insertions.holder(name, site.module, CHILD, adapter)
            self._handles.append(HOOKS[site.hook](site.module, adapter, c.scale))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def expected_trainable_params(self, model: nn.Module) -> int:
        m = self.config.bottleneck
        return sum(2 * m * s.width + m + s.width for s in self._sites(model).values())

    def _sites(self, model: nn.Module) -> dict[str, Site]:
        """{module name: Site} for the placement (or the target_modules override) and layers."""
        c = self.config
        arch = HOSTS.get(_model_type(model))
        if c.target_modules is None and arch is None:
            raise UserError(
                f"method 'parallel-adapter': no default sublayers for model type '{_model_type(model)}' "
                f"(known: {', '.join(HOSTS)}); set delta.target_modules to the modules whose output gets "
                f"s * adapter(their input)"
            )
        spec = c.target_modules if c.target_modules is not None else _placement(arch, c.placement)
        kinds = linear_kinds() if spec == "all-linear" else (nn.Module,)
        targets = find_targets(model, spec, c.layers, kinds=kinds)
        return {n: Site(m, _width(model, n, m), _hook_kind(arch, n)) for n, m in targets.items()}


def _placement(arch: Sublayers, placement: str) -> str:
    return {"ffn": arch.ffn, "attention": arch.attention, "both": f"{arch.attention}|{arch.ffn}"}[placement]


def _hook_kind(arch: Optional[Sublayers], name: str) -> str:
    """A module that is one of the architecture's sublayer hosts is hooked its way (BERT's `output`
    modules take the residual as an argument); any other target reads its input, adds to its output."""
    if arch is not None and any(re.fullmatch(r, name) for r in (arch.attention, arch.ffn)):
        return arch.hook
    return "output"


def _width(model: nn.Module, name: str, module: nn.Module) -> int:
    """d: a linear target's own width (it must map d -> d: the adapter reads its input and adds to its
    output); for a sublayer (no weight of its own to read) the model's hidden size."""
    if isinstance(module, linear_kinds()):  # nn.Linear and GPT-2's Conv1D
        out, in_ = shape(module)
        if out != in_:
            raise UserError(f"recipe key 'delta.target_modules': '{name}' maps {in_} -> {out} features; a parallel "
                            f"adapter reads a module's input and adds to its output, so both must be the same width")
        return out
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise UserError(f"method 'parallel-adapter': cannot tell the width of '{name}' (the model config has no "
                        f"hidden_size); set delta.target_modules to linear layers")
    return int(hidden)


def _model_type(model: nn.Module):
    return getattr(getattr(model, "config", None), "model_type", None)


def _device(model: nn.Module, module: nn.Module) -> torch.device:
    """The host's device (a model split over devices keeps each adapter beside its sublayer); the model's
    for a parameter-free target (a regex may match an activation or a dropout)."""
    return next(module.parameters(), next(model.parameters())).device


def _bottleneck(width: int, size: int, activation: str, device) -> Bottleneck:
    """The Houlsby bottleneck (W_up, b_up, b_down zero) with W_down Kaiming-uniform, as He et al.'s
    code initializes it (a = sqrt(5), like LoRA's A): a larger start than Houlsby's near-zero W_down."""
    module = Bottleneck(width, size, activation, device)
    if module.down.weight.device.type != "meta":
        nn.init.kaiming_uniform_(module.down.weight, a=math.sqrt(5))
    return module


# -- the two hooks (see the module docstring); each returns its handle, removed by `_detach` -------


def _add(target: torch.Tensor, adapter: Bottleneck, scale: float, x: torch.Tensor) -> torch.Tensor:
    """target + s·A(x), scaled in fp32, then cast to target's dtype (bf16 bases, autocast outputs)."""
    return target + (scale * adapter.update(x)).to(target.dtype)


def _output_hook(host: nn.Module, adapter: Bottleneck, scale: float):
    """out <- out + s·A(x), x the host's input: positional, or `hidden_states=` (Llama's attention)."""

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states")
        if x is None:
            raise UserError(f"method 'parallel-adapter': {type(module).__name__} was called without a positional "
                            f"input or hidden_states=; choose other delta.target_modules")
        if isinstance(out, tuple):  # attention: (output, weights, ...)
            return (_add(out[0], adapter, scale, x),) + tuple(out[1:])
        return _add(out, adapter, scale, x)

    return host.register_forward_hook(hook, with_kwargs=True)


def _residual_hook(host: nn.Module, adapter: Bottleneck, scale: float):
    """host(h, input_tensor) adds the residual input_tensor = x itself: rewrite it to x + s·A(x)."""

    def hook(module, args, kwargs):
        if len(args) >= 2:
            x = args[1]
            return (args[0], _add(x, adapter, scale, x)) + tuple(args[2:]), kwargs
        x = kwargs["input_tensor"]
        return args, {**kwargs, "input_tensor": _add(x, adapter, scale, x)}

    return host.register_forward_pre_hook(hook, with_kwargs=True)


HOOKS = {"output": _output_hook, "residual": _residual_hook}

DELTA = ParallelAdapter
