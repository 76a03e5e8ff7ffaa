"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning", https://arxiv.org/abs/2110.07577): LoRA, prefix tuning and a bottleneck adapter in every
layer, each scaled by its own learned gate, so the model learns which submodule to use.

        LoRA (W_q, W_v):  h = W0 x + G_L(x) * (alpha/r) B A x          G_L from the LoRA's input x
        prefix:           [G_P(h) * P_k ; K], [G_P(h) * P_v ; V]       G_P from the attention's input h
        adapter (FFN):    h' = h + G_A(h) * W_up f(W_down h)            G_A from the adapter's input h

        G(x) = sigmoid(w . x + b), one gate (w, b) per adapted module, w ~ N(0, 0.02), b = 0

A preset of the composition `delta: [lora, prefix, adapter]` (compose.py): its parts are the deltas
`lora`, `prefix` and `adapter` under those names, so their tensors are stored as 'lora.…', 'prefix.…'
and 'adapter.…', exactly as a hand-written composition of the three stores them, plus the gates
under 'gates.<module>.<lora|prefix|adapter>_gate.{weight,bias}'. With `gates: false` it is that
composition. Sizes are the reference implementation's (github.com/morningmoni/UniPELT) and AdapterHub's
UniPELTConfig: prefix length 10 through an MLP of width 512, a sequential adapter after the FFN
(Pfeiffer placement) with reduction factor 16 and ReLU, LoRA r = 8 on the query and value projections.
LoRA's scale: the reference replaces LoRA's alpha/r by the gate (update = G_L B A x) and AdapterHub
multiplies the gate by alpha/r with alpha = r = 8; both are alpha/r = 1, the default here. The
adapter trains no layer norms (adapter-transformers freezes them).

Gates, mechanically (forward hooks on the parts' own modules, no patched forwards):
- LoRA: a hook on each LoRA update module multiplies its output by the gate of its input.
- adapter: a pre-hook on each bottleneck computes the gate of its input, a hook on its up-projection
  multiplies the up-projection's output by it: h + G * update(h), the residual untouched.
- prefix: a pre-hook on each self-attention module scales that layer's prefix keys and values in the
  cache handed to it (out of place, once per cache: a KV cache reused by `generate` is scaled at its
  first forward only). The prefix is still attended to when its gate is 0, as in the reference:
  a closed prefix gate makes its p keys and values zero, so each query still gives the p positions
  weight exp(0) in the softmax, with zero values. Closing the LoRA or adapter gate removes that
  submodule's contribution exactly; closing the prefix gate leaves a prefix of zeros, not no prefix.

Pooling (`gate_pooling`). The reference averages each gate over the sequence's tokens (padding
included): one value per sequence. Here the mean is over the real tokens (the attention mask of the
batch `prepare_inputs` saw; a forward without it averages over all tokens). On a decoder that mean
would let every position's gates see later tokens of its sequence (a leak of the future into the
training loss), and `generate`, which runs one token at a time, could not compute it. So on models
whose self-attention is causal (`auto`), the LoRA and adapter gates are per token (each position's
own sigmoid(w . x_t + b)) and the prefix gate, which must be one value per sequence to scale the
cached prefix, is computed from the sequence's first real token: no position sees a later one, and
training, evaluation and KV-cache generation compute the same gates.

Not supported (as for prefix tuning): encoder-decoder models, packed rows, gradient checkpointing.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas._lowrank import matmul_input
from deltafit.deltas._targets import find_targets, in_features, out_features
from deltafit.deltas.base import DeltaConfig, base_named_modules
from deltafit.deltas.compose import Compose
from deltafit.errors import UserError

GATES = "gates."  # the gates' tensors in the state dict: gates.<module>.<part>_gate.{weight,bias}
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")  # names across transformers
PENDING = "_deltafit_unipelt_ungated"  # on a prefix cache: the layers whose prefix is not gated yet


class UniPELTConfig(DeltaConfig):
    method: Literal["unipelt"] = "unipelt"
    prefix_tokens: int = Field(10, ge=1, description="Prefix length p on every attention layer (the paper: 10).")
    prefix_hidden: int = Field(512, ge=1, description="Hidden width of the prefix's reparameterization MLP "
                                                      "(the reference: 512).")
    reduction_factor: Optional[float] = Field(
        None, gt=0, description="Adapter bottleneck m = hidden size / reduction_factor. Default 16 (the paper's) "
        "unless bottleneck is set.",
    )
    bottleneck: Optional[int] = Field(None, ge=1, description="Alternative to reduction_factor: the adapter's "
                                                              "bottleneck size m.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="The adapter's nonlinearity.")
    r: int = Field(8, ge=1, description="LoRA rank (the paper: 8).")
    alpha: float = Field(
        8.0, gt=0, description="LoRA scaling numerator: the update is G * (alpha/r) B A x. Default alpha = r, a "
        "scale of 1 under the gate, as in the reference (whose gate replaces alpha/r) and AdapterHub.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input.")
    target_modules: Optional[Union[str, list[str]]] = Field(
        None, description="LoRA's modules (as lora's target_modules). Default: the query and value projections "
        "(GPT-2: its fused c_attn).",
    )
    gates: bool = Field(True, description="Gate each submodule (UniPELT). false: the plain composition lora + "
                                          "prefix + adapter, the same tensors without gates.")
    gate_pooling: Literal["auto", "mean", "causal"] = Field(
        "auto", description="How a gate's per-token values sigmoid(w . x_t + b) become its value. mean: one value "
        "per sequence, the mean over its real tokens (the paper's, for encoders). causal: LoRA and adapter gates "
        "per token, the prefix gate from the sequence's first real token, so no position's gates see later tokens "
        "(decoders). auto: causal where the self-attention is causal, else mean.",
    )

    @model_validator(mode="after")
    def _one_size(self):
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("set either bottleneck or reduction_factor, not both")
        return self

    @property
    def num_virtual_tokens(self) -> int:
        """Positions every input gains in front (limits.py holds them against the model's maximum)."""
        return self.prefix_tokens


class Gate(nn.Module):
    """x -> sigmoid(w . x + b) per token, in fp32. w ~ N(0, 0.02), b = 0: the reference's adapter gate (BERT's
    init) for every gate (its LoRA and prefix gates kept nn.Linear's default init)."""

    def __init__(self, width: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, width, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=torch.float32))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(nn.functional.linear(matmul_input(x, self.weight.dtype), self.weight, self.bias))


class UniPELT(Compose):
    name = "unipelt"
    family = "addition"
    description = "UniPELT: LoRA, prefix tuning and an adapter, each scaled by a learned gate (Mao et al. 2022)."
    not_mergeable_because = "its prefix and nonlinear adapter are not changes of existing weights"
    Config = UniPELTConfig
    # Facts of its parts, stated for the class too (the registry's tables and packing read them there).
    zero_init_identity = False
    supports_packing = False

    def __init__(self, config: UniPELTConfig):
        super().__init__(config)
        self._hooks: list[Any] = []
        self._mask: Optional[torch.Tensor] = None  # the real tokens of the batch prepare_inputs saw
        self._pending: dict[int, torch.Tensor] = {}  # adapter gate -> its value, from the bottleneck's input
        self._causal = False
        self._layers: list[int] = []  # the attention layers whose prefix has a gate

    def _part_configs(self, config: UniPELTConfig) -> list[DeltaConfig]:
        from deltafit.deltas import config_class

        shared = {"lr": config.lr, "weight_decay": config.weight_decay}
        size = {"bottleneck": config.bottleneck} if config.bottleneck is not None \
            else {"reduction_factor": config.reduction_factor or 16.0}
        lora = {"method": "lora", "r": config.r, "alpha": config.alpha, "dropout": config.dropout,
                "target_modules": config.target_modules}
        prefix = {"method": "prefix", "num_virtual_tokens": config.prefix_tokens, "hidden": config.prefix_hidden}
        adapter = {"method": "adapter", "variant": "pfeiffer", "activation": config.activation,
                   "train_layernorms": False, **size}
        return [config_class(part["method"]).model_validate({**part, **shared}) for part in (lora, prefix, adapter)]

    # -- lifecycle ---------------------------------------------------------------------------

    def check_fits(self, model: nn.Module) -> None:
        if self.config.gates:
            _attention_modules(model)  # every layer's self-attention must be found (refused before anything)
        super().check_fits(model)

    def _attach(self, model: nn.Module) -> None:
        super()._attach(model)  # the parts, with the composition's checks
        if not self.config.gates:
            return
        try:
            self._insert_gates(model)
        except BaseException:
            self._remove_hooks()
            self.insertions.remove_all()
            super()._detach()
            raise

    def _insert_gates(self, model: nn.Module) -> None:
        attention = _attention_modules(model)
        pooling = self.config.gate_pooling
        self._causal = pooling == "causal" or (
            pooling == "auto" and any(getattr(m, "is_causal", False) for _, m in attention.values()))
        for key, (host, _, update) in self.parts["lora"].insertions.hosts.items():
            gate = Gate(update.A.shape[1], update.A.device)
            self.insertions.holder(key.rsplit(".", 1)[0], host, "lora_gate", gate)
            self._hooks.append(update.register_forward_hook(self._lora_hook(gate)))
        for key, (host, _, bottleneck) in self.parts["adapter"].insertions.hosts.items():
            gate = Gate(bottleneck.down.in_features, bottleneck.down.weight.device)
            self.insertions.holder(key.rsplit(".", 1)[0], host, "adapter_gate", gate)
            self._hooks.append(bottleneck.register_forward_pre_hook(self._adapter_pre_hook(gate)))
            self._hooks.append(bottleneck.up.register_forward_hook(self._adapter_hook(gate)))
        width = _hidden_size(model)
        self._layers = sorted(attention)
        for index, (name, module) in sorted(attention.items()):
            device = next(module.parameters()).device
            gate = Gate(width, device)
            self.insertions.holder(name, module, "prefix_gate", gate)
            self._hooks.append(module.register_forward_pre_hook(self._prefix_hook(gate, index), with_kwargs=True))
        self._hooks.append(model.register_forward_hook(lambda *_: self._forget()))

    def _detach(self) -> None:
        self._remove_hooks()
        super()._detach()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._forget()

    def _forget(self) -> None:
        self._mask = None
        self._pending.clear()

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The parts' (the prefix cache and its mask), and for the gates: the batch's real tokens, and the
        cache marked so that each layer's prefix is gated once (at its first forward)."""
        mask = batch.get("attention_mask")
        batch = super().prepare_inputs(batch)
        if self.config.gates:
            self._mask = None if mask is None else mask.detach()
            cache = batch.get("past_key_values")
            if cache is not None:
                setattr(cache, PENDING, set(self._layers))
        return batch

    # -- the gates ---------------------------------------------------------------------------

    def _lora_hook(self, gate: Gate) -> Callable:
        def hook(module, args, out):
            return out * self._value(gate, args[0], per_token=self._causal).to(out.dtype)
        return hook

    def _adapter_pre_hook(self, gate: Gate) -> Callable:
        def hook(module, args):
            self._pending[id(gate)] = self._value(gate, args[0], per_token=self._causal)
        return hook

    def _adapter_hook(self, gate: Gate) -> Callable:
        def hook(module, args, out):
            value = self._pending.pop(id(gate), None)
            return out if value is None else out * value.to(out.dtype)
        return hook

    def _prefix_hook(self, gate: Gate, index: int) -> Callable:
        p = self.config.prefix_tokens

        def hook(module, args, kwargs):
            cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
            pending = getattr(cache, PENDING, None)
            if not pending or index not in pending:
                return None  # not a prefix cache of ours, or this layer's prefix is gated already
            pending.discard(index)
            hidden = args[0] if args else kwargs["hidden_states"]
            value = self._sequence_value(gate, hidden)  # (batch,)
            layer = getattr(cache, "self_attention_cache", cache).layers[index]
            layer.keys, layer.values = (_scale_front(t, value, p) for t in (layer.keys, layer.values))
            return None
        return hook

    def _value(self, gate: Gate, x: torch.Tensor, per_token: bool) -> torch.Tensor:
        """The gate for every token of x: its own value (per_token) or its sequence's mean over real tokens."""
        scores = gate(x)  # (..., tokens, 1)
        if per_token or scores.dim() < 3:
            return scores
        mask = self._mask_for(scores)
        if mask is None:
            return scores.mean(dim=-2, keepdim=True)
        mask = mask.to(scores.dtype).unsqueeze(-1)
        return (scores * mask).sum(dim=-2, keepdim=True) / mask.sum(dim=-2, keepdim=True).clamp(min=1)

    def _sequence_value(self, gate: Gate, hidden: torch.Tensor) -> torch.Tensor:
        """One gate per sequence (the prefix's): the mean over its real tokens, or (causal) its first real token's."""
        if not self._causal:
            return self._value(gate, hidden, per_token=False).reshape(hidden.shape[0])
        mask = self._mask_for(hidden)
        first = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device) if mask is None \
            else (mask > 0).long().argmax(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return gate(hidden[rows, first]).reshape(hidden.shape[0])

    def _mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._mask
        if mask is None or x.dim() < 3 or tuple(mask.shape) != tuple(x.shape[:2]):
            return None  # a forward without prepare_inputs, or one step of generate after the prompt
        return mask.to(x.device)

    # -- parameters and state ----------------------------------------------------------------

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        """The gates' tensors under their state-dict names ('gates.<module>.<part>_gate.weight'...)."""
        return {GATES + key: p for key, p in self.insertions.named_parameters(trainable_only=False)}

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().delta_parameters(), **self.gate_parameters()}

    def optimizer_groups(self):
        gates = self.gate_parameters()
        return super().optimizer_groups() + ([(gates, self.config.lr, self.config.weight_decay)] if gates else [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **{k: p.detach() for k, p in self.gate_parameters().items()}}

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().final_state_dict(), **{k: p.detach() for k, p in self.gate_parameters().items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The parts' and the head's as a composition loads them, then the gates (names and shapes checked)."""
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith(GATES)})
        own = self.gate_parameters()
        saved = {k: v for k, v in state.items() if k.startswith(GATES)}
        if set(saved) != set(own):
            odd = sorted(set(saved) ^ set(own))[:3]
            raise UserError(f"checkpoint tensors do not fit method 'unipelt' on this model: gate tensors {odd} are "
                            f"{'missing' if set(own) - set(saved) else 'unexpected'} (saved with another "
                            f"delta.gates, or another base model?)")
        with torch.no_grad():
            for key, target in own.items():
                if tuple(saved[key].shape) != tuple(target.shape):
                    raise UserError(f"checkpoint tensor '{key}' has shape {tuple(saved[key].shape)}, the model "
                                    f"expects {tuple(target.shape)} (different base model or config?)")
                target.copy_(saved[key].to(target.dtype))

    def expected_trainable_params(self, model: nn.Module) -> int:
        """The parts' own counts, plus one gate (width + 1) per LoRA module, adapter and attention layer."""
        total = super().expected_trainable_params(model)
        if not self.config.gates:
            return total
        lora = find_targets(model, self.config.target_modules)
        adapters = self.parts["adapter"]._hosts(model)
        layers = len(_attention_modules(model))
        return (total + sum(in_features(m) + 1 for m in lora.values())
                + sum(out_features(m) + 1 for m in adapters.values()) + layers * (_hidden_size(model) + 1))

    def inserted_hosts(self):
        gates = [(GATES + key, host, False) for key, (host, _, _) in self.insertions.hosts.items()]
        return super().inserted_hosts() + gates

    def describe_targets(self) -> list[str]:
        return super().describe_targets() + [f"gates: {key}" for key in self.insertions.hosts]


def _scale_front(t: torch.Tensor, value: torch.Tensor, p: int) -> torch.Tensor:
    """t (batch, heads, positions, head_dim) with its first p positions (the prefix) times value (batch,)."""
    value = value.to(t.dtype).view(-1, 1, 1, 1)
    if t.shape[-2] == p:
        return t * value
    return torch.cat([t[..., :p, :] * value, t[..., p:, :]], dim=-2)


def _hidden_size(model: nn.Module) -> int:
    from deltafit.deltas.prefix import _text_config

    return _text_config(model).hidden_size


def _attention_modules(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """{layer index: (name, module)}: the self-attention module of every layer, the innermost module whose
    class is an attention and that has the layer index it passes to `cache.update` (LlamaAttention,
    BertSelfAttention, GPT2Attention...). Cross-attention is left out."""
    from deltafit.deltas.prefix import _kv_shape

    layers = _kv_shape(model)["layers"]  # refuses encoder-decoders as prefix tuning does
    candidates = [(name, m) for name, m in base_named_modules(model)
                  if isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower()
                  and "cross" not in type(m).__name__.lower() and not getattr(m, "is_cross_attention", False)]
    innermost = [(name, m) for name, m in candidates
                 if not any(other.startswith(name + ".") for other, _ in candidates if other != name)]
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in innermost:
        if found.setdefault(module.layer_idx, (name, module))[1] is not module:
            found = {}
            break
    if sorted(found) != list(range(layers)):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UserError(f"method 'unipelt': cannot find one self-attention module per layer on model type "
                        f"'{model_type}' to gate the prefix; set delta.gates: false for the ungated composition")
    return found


DELTA = UniPELT
