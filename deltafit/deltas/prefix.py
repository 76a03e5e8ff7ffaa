"""Prefix tuning (Li & Liang 2021) and, without the MLP, P-Tuning v2.

Every self-attention layer attends to p extra trainable key/value vectors before the real tokens.
They come from a reparameterization MLP, Embedding(p, d) -> Linear(d, h) -> tanh ->
Linear(h, 2 L d_kv) with d_kv = kv_heads * head_dim (GQA models have fewer kv heads), or, with
`reparameterize: false`, straight from a trainable (p, 2 L d_kv) table.

How it reaches the model (transformers 5.x): `prepare_inputs` builds a fresh `DynamicCache`
pre-filled with the prefix keys/values of shape (batch, kv_heads, p, head_dim) per layer, passes
it as `past_key_values`, and left-pads the attention mask with p ones. Each attention layer's
`cache.update` then concatenates its real keys/values after the prefix. This works for decoders
(Llama: causal mask offset by the cache length) and for encoders (BERT's self-attention also
calls `cache.update`, and its mask builder takes the key length from the 2D mask, a path kept
"for prefix tuning"). The cache is mutated by the forward pass: build one per forward.

Positions: the prefix occupies no position. Without `position_ids` in the batch, the model would
number the real tokens from p (the cache length); that shifts absolute position embeddings (BERT)
away from what the base saw. So real tokens get positions counted over the attention mask from 0
(padding-invariant, like `generate`).

Not supported: gradient checkpointing (transformers drops `past_key_values` inside checkpointed
layers), encoder-decoder models, packed batches (position_ids without attention_mask).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltafit.deltas.base import Delta, DeltaConfig
from deltafit.errors import UserError

CHILD = "delta_prefix"


class PrefixConfig(DeltaConfig):
    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length p: extra key/value vectors per layer.")
    hidden: int = Field(512, ge=1, description="Hidden width h of the reparameterization MLP.")
    reparameterize: bool = Field(
        True, description="Produce the prefix through the MLP (Li & Liang). false: train the prefix directly (P-Tuning v2)."
    )


class PrefixEncoder(nn.Module):
    """() -> (p, 2 L d_kv): the prefix keys and values of every layer, flattened."""

    def __init__(self, p: int, width: int, hidden: int, out: int, reparameterize: bool, device=None):
        super().__init__()
        f32 = dict(device=device, dtype=torch.float32)
        if reparameterize:
            self.embedding = nn.Embedding(p, width, **f32)
            self.mlp = nn.Sequential(nn.Linear(width, hidden, **f32), nn.Tanh(), nn.Linear(hidden, out, **f32))
        else:
            self.embedding = nn.Embedding(p, out, **f32)  # N(0, 1) like PEFT's P-Tuning v2 table
            self.mlp = nn.Identity()

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding.weight)


class PrefixTuning(Delta):
    name = "prefix"
    family = "addition"
    description = "Trainable key/value prefixes at every attention layer, through an MLP (Li & Liang) or direct."
    not_mergeable_because = "prefix keys/values are extra attention inputs, not a change of weights"
    zero_init_identity = False
    supports_packing = False  # one prefix per row, and transformers' packed masks exclude a cache
    Config = PrefixConfig

    def _attach(self, model: nn.Module) -> None:
        c = self.config
        shape = _kv_shape(model)
        device = model.get_input_embeddings().weight.device
        width = _text_config(model).hidden_size
        out = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]
        encoder = PrefixEncoder(c.num_virtual_tokens, width, c.hidden, out, c.reparameterize, device)
        self.insertions.holder("", model, CHILD, encoder)
        self._shape = shape

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the prefix cache, pad the mask for it, and pin the real tokens' positions."""
        _check_batch(self.model, batch)
        batch = dict(batch)
        size, length, device = _batch_size_length(batch)
        mask = batch.get("attention_mask")
        mask = torch.ones(size, length, dtype=torch.long, device=device) if mask is None else mask
        p = self.config.num_virtual_tokens
        batch["attention_mask"] = torch.cat([mask.new_ones(size, p), mask], dim=1)
        if "position_ids" not in batch and _accepts(self.model, "position_ids"):
            batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        batch["past_key_values"] = self._cache(size)
        return batch

    def _cache(self, batch_size: int):
        """A DynamicCache whose layer i already holds the prefix keys/values of layer i."""
        from transformers import DynamicCache

        s, p = self._shape, self.config.num_virtual_tokens
        dtype = self.model.get_input_embeddings().weight.dtype
        kv = self.insertions.hosts[CHILD][2]()  # (p, 2 L kvh hd)
        kv = kv.view(p, s["layers"], 2, s["kv_heads"], s["head_dim"]).permute(1, 2, 3, 0, 4).to(dtype)
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in kv]
        return DynamicCache(layers, config=self.model.config)

    def expected_trainable_params(self, model: nn.Module) -> int:
        c, s = self.config, _kv_shape(model)
        p, d, h = c.num_virtual_tokens, _text_config(model).hidden_size, c.hidden
        out = 2 * s["layers"] * s["kv_heads"] * s["head_dim"]
        return p * d + d * h + h + h * out + out if c.reparameterize else p * out


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UserError("method 'prefix' needs a transformers model (with a .config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _kv_shape(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head width of the model's attention (GQA-aware)."""
    config = _text_config(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError("method 'prefix' supports decoder-only and encoder-only models, not encoder-decoders")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"layers": config.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim}


def _check_batch(model: nn.Module, batch: dict[str, Any]) -> None:
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    checkpointing = getattr(model, "is_gradient_checkpointing", False) if checkpointing is None else checkpointing
    if model.training and checkpointing:
        raise UserError(
            "method 'prefix' cannot train with gradient checkpointing: transformers drops past_key_values inside "
            "checkpointed layers, so the prefix would be ignored; set train.gradient_checkpointing: false"
        )
    if "position_ids" in batch and batch.get("attention_mask") is None:
        raise UserError("method 'prefix' does not support packed batches (position_ids without an attention mask)")
    if batch.get("past_key_values") is not None:
        raise UserError("method 'prefix' builds past_key_values itself; the batch already has one")


def _batch_size_length(batch: dict[str, Any]) -> tuple[int, int, torch.device]:
    tokens = batch.get("input_ids")
    tokens = batch["inputs_embeds"] if tokens is None else tokens
    return tokens.shape[0], tokens.shape[1], tokens.device


def _accepts(model: nn.Module, argument: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return argument in parameters


DELTA = PrefixTuning
