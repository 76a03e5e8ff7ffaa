"""P-Tuning (Liu et al. 2021, "GPT Understands, Too"): virtual token embeddings produced by a
trainable prompt encoder, prepended to the input embeddings.

The encoder is PEFT's PromptEncoder: an Embedding(p, d) whose rows go through a bidirectional
LSTM (`encoder_num_layers` layers, hidden h per direction) and an MLP head
Linear(2h, 2h) -> ReLU -> Linear(2h, d) (`encoder: lstm`, the paper's), or through an MLP
Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d) (`encoder: mlp`). The LSTM lets the
virtual tokens depend on each other, which the paper found to stabilize training. Its output,
p vectors of width d, goes in front of every input exactly as prompt tuning's prompt does: the
insertion, attention mask, label and position handling is prompt.py's `prepend_prompt`.

The checkpoint holds the encoder (embedding and heads), so a run resumes exactly. Only its
output is needed for inference: PEFT's P_TUNING adapter stores just that (p, d) table
(`prompt_embeddings`, as PEFT's own save does), which `to_peft` computes from the checkpoint.
Importing such an adapter gives back that table with no encoder (`encoder: none`), which is also
what PEFT itself builds for an adapter loaded for inference.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas.base import Delta, DeltaConfig
from deltafit.deltas.prompt import prepend_prompt
from deltafit.errors import UserError

CHILD = "delta_ptuning"
ENCODER_ONLY = ("encoder_hidden_size", "encoder_num_layers", "encoder_dropout")  # meaningless without one
LSTM_ONLY = ("encoder_num_layers", "encoder_dropout")  # PEFT's MLP has a fixed depth and no dropout


class PTuningConfig(DeltaConfig):
    method: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(
        20, ge=1, description="Prompt length p: virtual tokens the encoder produces and every input is prefixed with."
    )
    encoder: Literal["lstm", "mlp", "none"] = Field(
        "lstm", description="Prompt encoder: lstm (bidirectional LSTM + MLP head, the paper's), mlp (3-layer MLP), "
        "or none (the virtual tokens train directly: what an imported PEFT P_TUNING adapter holds).",
    )
    encoder_hidden_size: Optional[int] = Field(
        None, ge=1, description="Hidden width h of the encoder (per direction for the LSTM). Default: the model's "
        "hidden size.",
    )
    encoder_num_layers: int = Field(2, ge=1, description="Layers of the LSTM (encoder: lstm only).")
    encoder_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout between the LSTM's layers (encoder: lstm only)."
    )

    @model_validator(mode="after")
    def _options_fit_the_encoder(self):
        unused = ENCODER_ONLY if self.encoder == "none" else LSTM_ONLY if self.encoder == "mlp" else ()
        # Compared with the defaults, not "was it given": checkpoints store every field, defaults included.
        given = [k for k in unused if getattr(self, k) != type(self).model_fields[k].default]
        if given:
            raise ValueError(f"{', '.join(given)} has no effect with encoder: {self.encoder}; remove it")
        return self


class PromptEncoder(nn.Module):
    """() -> (p, d): the virtual token embeddings. Parameter names follow PEFT's PromptEncoder."""

    def __init__(self, config: PTuningConfig, width: int, device=None):
        super().__init__()
        f32 = dict(device=device, dtype=torch.float32)
        p, h, kind = config.num_virtual_tokens, config.encoder_hidden_size or width, config.encoder
        self.embedding = nn.Embedding(p, width, **f32)  # N(0, 1), as PEFT's
        if kind == "lstm":
            self.lstm_head = nn.LSTM(width, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **f32)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **f32), nn.ReLU(), nn.Linear(2 * h, width, **f32))
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(width, h, **f32), nn.ReLU(), nn.Linear(h, h, **f32), nn.ReLU(),
                                          nn.Linear(h, width, **f32))

    def forward(self) -> torch.Tensor:
        tokens = self.embedding.weight
        # Outside autocast: the encoder is small and runs once per forward, so fp32 costs nothing, and
        # oneDNN has no fp16 LSTM on CPU. The caller casts the output to the embeddings' dtype.
        with torch.autocast(tokens.device.type, enabled=False):
            if hasattr(self, "lstm_head"):
                tokens = self.lstm_head(tokens[None])[0][0]  # one sequence of p tokens: each sees all the others
            return self.mlp_head(tokens) if hasattr(self, "mlp_head") else tokens


class PTuning(Delta):
    name = "ptuning"
    family = "addition"
    description = "Virtual tokens from a trainable LSTM/MLP prompt encoder, prepended to the input (Liu et al.)."
    not_mergeable_because = "the virtual tokens are extra input tokens, not a change of weights"
    zero_init_identity = False
    supports_packing = False  # the prompt would precede only the first example of a packed row
    input_slot = "embeddings"
    Config = PTuningConfig

    def _attach(self, model: nn.Module) -> None:
        table = model.get_input_embeddings().weight
        encoder = PromptEncoder(self.config, table.shape[1], table.device)
        if self.config.encoder == "none" and table.device.type != "meta":
            # Trained directly, the tokens start at the embeddings' scale (prompt tuning's random init);
            # behind an encoder they are its input, N(0, 1) as in PEFT.
            with torch.no_grad():
                encoder.embedding.weight.normal_(0.0, float(table.detach().float().std()))
        self.insertions.holder("", model, CHILD, encoder)

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The encoder runs once per forward (its output is the same for every row), then prompt
        tuning's layout: [virtual tokens][padding][tokens], labels masked under the virtual tokens."""
        return prepend_prompt(self.model, batch, self.insertions.hosts[CHILD][2](), self.name)

    def expected_trainable_params(self, model: nn.Module) -> int:
        return encoder_size(self.config, model.get_input_embeddings().weight.shape[1])

    # PEFT: P_TUNING adapters hold one (p, d) tensor `prompt_embeddings`, the encoder's output (PEFT
    # saves that, not the encoder), with inference_mode true. The layout is prompt tuning's, so rows
    # without left padding compute the same in both (see prompt.py).

    @classmethod
    def to_peft(cls, config, state, model_config):
        table = encoder_output(config, state)
        text = model_config().get_text_config()
        fields = {"num_virtual_tokens": config.num_virtual_tokens, "token_dim": int(table.shape[1]),
                  "num_transformer_submodules": 1, "num_attention_heads": text.num_attention_heads,
                  "num_layers": text.num_hidden_layers,
                  "encoder_reparameterization_type": "LSTM" if config.encoder == "lstm" else "MLP",
                  "encoder_hidden_size": config.encoder_hidden_size or int(table.shape[1]),
                  "encoder_num_layers": config.encoder_num_layers, "encoder_dropout": config.encoder_dropout}
        return fields, {"prompt_embeddings": table}

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        if (fields.get("num_transformer_submodules") or 1) != 1 or set(tensors) != {"prompt_embeddings"}:
            raise UserError("only single-stack P-Tuning adapters (decoder-only or encoder-only models, one "
                            "prompt_embeddings tensor) can be imported")
        table = tensors["prompt_embeddings"]
        if table.ndim != 2:
            raise UserError(f"PEFT P-Tuning tensor prompt_embeddings has shape {tuple(table.shape)}; expected "
                            f"(num_virtual_tokens, hidden size)")
        config = {"method": "ptuning", "num_virtual_tokens": int(table.shape[0]), "encoder": "none"}
        return config, {f"{CHILD}.embedding.weight": table}


def encoder_size(config: PTuningConfig, width: int) -> int:
    """Parameters of the prompt encoder for hidden size `width` (PyTorch's LSTM has two bias vectors)."""
    p, h, kind = config.num_virtual_tokens, config.encoder_hidden_size or width, config.encoder
    count = p * width
    if kind == "lstm":
        inputs = [width] + [2 * h] * (config.encoder_num_layers - 1)
        count += sum(2 * (4 * h * i + 4 * h * h + 8 * h) for i in inputs)  # two directions per layer
        count += 2 * h * 2 * h + 2 * h + 2 * h * width + width
    elif kind == "mlp":
        count += width * h + h + h * h + h + h * width + width
    return count


def encoder_output(config: PTuningConfig, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(p, d): what the encoder computes from a checkpoint's tensors, in eval mode (no dropout)."""
    width = state[f"{CHILD}.embedding.weight"].shape[1]
    encoder = PromptEncoder(config, width)
    encoder.load_state_dict({k[len(CHILD) + 1:]: v.float() for k, v in state.items() if k.startswith(CHILD + ".")})
    with torch.no_grad():
        return encoder.eval()().detach()


DELTA = PTuning
