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
        True,
        description="Produce the prefix through the MLP (Li & Liang). false: train the prefix directly (P-Tuning v2).",
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
    input_slot = "cache"
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

    # PEFT: one tensor `prompt_embeddings`, (p, L*2*token_dim) with token_dim = kv_heads*head_dim,
    # each row laid out [layer][key, value][head][head_dim]: the layout of PrefixEncoder's output.
    # Export writes the computed table with prefix_projection=False. That is exact and is what PEFT
    # itself stores, for prefix_projection=True too (it saves the MLP's output and loads it without
    # the MLP); mapping the MLP instead would not fit on GQA models anyway (PEFT's embedding width is
    # token_dim, deltafit's is the hidden size). Import takes that table, so both PEFT forms load.
    # Positions: PEFT numbers the real tokens after the prefix (p, p+1, ...), deltafit from 0. With
    # RoPE a real query at position m meets an unrotated prefix key k as R_m q . k, so PEFT computes
    # the same scores with keys rotated by p: R_(m+p) q . R_p k = R_m q . k. Export rotates by +p,
    # import by -p. Absolute position embeddings (BERT) would see other positions: refused.

    @classmethod
    def to_peft(cls, config, state, model_config):
        text = _peft_text_config(model_config())
        shape, p = _kv_shape_of(text), config.num_virtual_tokens
        with torch.no_grad():
            table = _computed_table(config, state)
            table = _rotate_keys(table, shape, _rope_rotation(text, shape["head_dim"], p))
        token_dim = shape["kv_heads"] * shape["head_dim"]
        fields = {"num_virtual_tokens": p, "token_dim": token_dim, "num_attention_heads": shape["kv_heads"],
                  "num_layers": shape["layers"], "num_transformer_submodules": 1, "prefix_projection": False,
                  "encoder_hidden_size": token_dim, "init_weights": None}
        return fields, {"prompt_embeddings": table}

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        if (fields.get("num_transformer_submodules") or 1) != 1 or set(tensors) != {"prompt_embeddings"}:
            raise UserError("only single-stack prefix tuning adapters (decoder-only or encoder-only models, one "
                            "prompt_embeddings tensor) can be imported")
        text = _peft_text_config(model_config())
        shape, table = _kv_shape_of(text), tensors["prompt_embeddings"]
        width = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]
        if table.ndim != 2 or table.shape[1] != width:
            raise UserError(f"PEFT prefix tensor prompt_embeddings has shape {tuple(table.shape)}; this base model "
                            f"needs (num_virtual_tokens, {width}): was the adapter trained on another model?")
        p = table.shape[0]
        with torch.no_grad():
            table = _rotate_keys(table.float(), shape, _rope_rotation(text, shape["head_dim"], -p))
        config = {"method": "prefix", "num_virtual_tokens": int(p), "reparameterize": False}
        return config, {f"{CHILD}.embedding.weight": table}


# Decoders whose attention rotates q and k with Llama's rotate_half RoPE (the prefix keys can be
# re-rotated exactly); other position schemes cannot be translated between the two numberings.
ROTARY_MODELS = ("llama", "mistral", "qwen2", "qwen3")
ROTARY_MESSAGE = ("PEFT numbers the real tokens after the prefix, deltafit from 0; deltafit translates between the "
                  f"two only for RoPE decoders ({', '.join(ROTARY_MODELS)})")


def _peft_text_config(config):
    if getattr(config, "is_encoder_decoder", False):
        raise UserError("method 'prefix' supports decoder-only and encoder-only models, not encoder-decoders")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _computed_table(config: PrefixConfig, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(p, 2 L d_kv): what PrefixEncoder.forward computes from the checkpoint's tensors."""
    table = state[f"{CHILD}.embedding.weight"].float()
    if config.reparameterize:
        mlp = {k[len(f"{CHILD}.mlp."):]: v.float() for k, v in state.items() if k.startswith(f"{CHILD}.mlp.")}
        hidden = torch.tanh(torch.nn.functional.linear(table, mlp["0.weight"], mlp["0.bias"]))
        table = torch.nn.functional.linear(hidden, mlp["2.weight"], mlp["2.bias"])
    return table


def _rope_rotation(text, head_dim: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the RoPE rotation by `shift` positions, as the model's rotary embedding
    computes them but without its attention scaling (a pure rotation)."""
    model_type = getattr(text, "model_type", None)
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if model_type not in ROTARY_MODELS or "rope_theta" not in rope:
        raise UserError(f"method 'prefix' on model type '{model_type}' cannot be expressed in PEFT's format: "
                        f"{ROTARY_MESSAGE}; use the deltafit checkpoint (deltafit eval/merge accept it directly)")
    if rope_type in ("dynamic", "longrope") or (getattr(text, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise UserError(f"method 'prefix' with RoPE type '{rope_type}' cannot be expressed in PEFT's format: its "
                        f"frequencies depend on the sequence length; use the deltafit checkpoint")
    if rope_type == "default":  # as LlamaRotaryEmbedding.compute_default_rope_parameters
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](text)
    angle = torch.cat([inv_freq, inv_freq]).double() * shift
    return angle.cos(), angle.sin()


def _rotate_keys(table: torch.Tensor, shape: dict[str, int], rotation) -> torch.Tensor:
    """The (p, 2 L d_kv) table with every layer's prefix keys rotated (values unchanged)."""
    cos, sin = rotation
    p = table.shape[0]
    kv = table.double().view(p, shape["layers"], 2, shape["kv_heads"], shape["head_dim"]).clone()
    keys = kv[:, :, 0]
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)  # Llama's rotate_half
    kv[:, :, 0] = keys * cos + rotated_half * sin
    return kv.view(p, -1).to(table.dtype)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UserError("method 'prefix' needs a transformers model (with a .config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _kv_shape(model: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head width of the model's attention (GQA-aware)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError("method 'prefix' supports decoder-only and encoder-only models, not encoder-decoders")
    return _kv_shape_of(_text_config(model))


def _kv_shape_of(config) -> dict[str, int]:
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
