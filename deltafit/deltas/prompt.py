"""Prompt tuning (Lester et al. 2021): p trainable embeddings prepended to the input embeddings.

`prepare_inputs` embeds `input_ids` with the model's own (frozen) embedding table, prepends the
prompt and hands the model `inputs_embeds`. Each row is laid out [prompt][padding][tokens]:
right padding is moved to the left, behind the prompt. Why: decoder classifiers (Llama & co.)
pool the last non-pad token, which they find from `input_ids`; given `inputs_embeds` they pool
the last position, which is only the last real token when padding sits on the left. Encoders that
pool the first position (BERT's [CLS] slot) pool the first prompt vector either way, as in PEFT.

Everything per-token moves with the tokens: the attention mask (ones for the prompt), token-level
labels (-100 for the prompt; the first real token's label too, since the base model never
predicts a sequence's first token either), token_type_ids (0 for the prompt). Positions are
counted over the attention mask, so a row's result does not depend on how much it was padded:
prompt 0..p-1, real tokens from p. Token logits come back in the rearranged layout.

Init: "random" draws from N(0, std of the embedding table), "vocab" copies the embeddings of p
random vocabulary tokens, "text" copies the embeddings of `init_text`'s tokens (repeated or cut
to p). The "text" init needs the tokenizer: set `delta.tokenizer` before attach, otherwise it is
loaded from the model's `name_or_path`.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from deltafit.deltas.base import Delta, DeltaConfig
from deltafit.errors import UserError

CHILD = "delta_prompt"


class PromptConfig(DeltaConfig):
    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(
        20, ge=1, description="Prompt length p: trainable embeddings prepended to every input."
    )
    init: Literal["random", "vocab", "text"] = Field(
        "vocab", description="Initial prompt: random (scaled like the embeddings), vocab (embeddings of random "
        "vocabulary tokens), or text (embeddings of init_text's tokens).",
    )
    init_text: Optional[str] = Field(None, description="Text whose token embeddings start the prompt (init: text).")

    @model_validator(mode="after")
    def _text_needs_text(self):
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init_text is required with init: text, and only used with it")
        return self


class SoftPrompt(nn.Module):
    def __init__(self, p: int, width: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(p, width, device=device, dtype=torch.float32))


class PromptTuning(Delta):
    name = "prompt"
    family = "addition"
    description = "Trainable embeddings prepended to the input (Lester et al.); weak on small models."
    not_mergeable_because = "the prompt is extra input tokens, not a change of weights"
    zero_init_identity = False
    supports_packing = False  # the prompt would precede only the first example of a packed row
    input_slot = "embeddings"
    Config = PromptConfig

    def _attach(self, model: nn.Module) -> None:
        table = model.get_input_embeddings().weight
        prompt = SoftPrompt(self.config.num_virtual_tokens, table.shape[1], table.device)
        if table.device.type != "meta":
            with torch.no_grad():
                prompt.weight.copy_(self._initial(model, table))
        self.insertions.holder("", model, CHILD, prompt)

    def _initial(self, model: nn.Module, table: torch.Tensor) -> torch.Tensor:
        p, table = self.config.num_virtual_tokens, table.detach().float()
        if self.config.init == "random":
            return torch.randn(p, table.shape[1], device=table.device) * table.std()
        if self.config.init == "vocab":
            return table[torch.randint(table.shape[0], (p,), device=table.device)]
        ids = self._text_ids(model)
        return table[torch.tensor((ids * (p // len(ids) + 1))[:p], device=table.device)]

    def _text_ids(self, model: nn.Module) -> list[int]:
        tokenizer = self.tokenizer or _load_tokenizer(model)
        ids = tokenizer(self.config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("recipe key 'delta.init_text': the text encodes to no tokens")
        return list(ids)

    def prepare_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Swap input_ids for [prompt][padding][tokens] embeddings and move everything per-token along."""
        return prepend_prompt(self.model, batch, self.insertions.hosts[CHILD][2].weight, self.name)

    def expected_trainable_params(self, model: nn.Module) -> int:
        return self.config.num_virtual_tokens * model.get_input_embeddings().weight.shape[1]

    # PEFT: one (p, d) tensor `prompt_embeddings`. PEFT lays rows out [prompt][tokens][padding]
    # and numbers positions 0.., so rows without left padding compute the same in both.

    @classmethod
    def to_peft(cls, config, state, model_config):
        weight = state[f"{CHILD}.weight"]
        text = model_config().get_text_config()
        fields = {"num_virtual_tokens": config.num_virtual_tokens, "token_dim": int(weight.shape[1]),
                  "num_transformer_submodules": 1, "num_attention_heads": text.num_attention_heads,
                  "num_layers": text.num_hidden_layers, "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
        return fields, {"prompt_embeddings": weight}

    @classmethod
    def from_peft(cls, fields, tensors, model_config):
        if (fields.get("num_transformer_submodules") or 1) != 1 or set(tensors) != {"prompt_embeddings"}:
            raise UserError("only single-stack prompt tuning adapters (decoder-only or encoder-only models, one "
                            "prompt_embeddings tensor) can be imported")
        weight = tensors["prompt_embeddings"]
        config = {"method": "prompt", "num_virtual_tokens": int(weight.shape[0]), "init": "random"}
        return config, {f"{CHILD}.weight": weight}


def prepend_prompt(model: nn.Module, batch: dict[str, Any], prompt: torch.Tensor, method: str) -> dict[str, Any]:
    """`batch` with its input_ids swapped for [prompt][padding][tokens] embeddings, `prompt` (p, d)
    in front of every row, and everything per-token moved along. Shared with P-Tuning, whose prompt
    is an encoder's output."""
    if "position_ids" in batch and batch.get("attention_mask") is None:
        raise UserError(f"method '{method}' does not support packed batches (position_ids without an attention mask)")
    batch = dict(batch)
    ids, embeds = batch.pop("input_ids", None), batch.pop("inputs_embeds", None)
    embeds = model.get_input_embeddings()(ids) if embeds is None else embeds
    size, length = embeds.shape[:2]
    mask = batch.get("attention_mask")
    mask = torch.ones(size, length, dtype=torch.long, device=embeds.device) if mask is None else mask
    order = torch.sort(mask.long(), dim=1, stable=True).indices  # padding first, tokens keep their order
    p = prompt.shape[0]
    for key, value in list(batch.items()):
        if _per_token(key, value, size, length):
            batch[key] = _prepend(key, value.gather(1, order), mask.gather(1, order), p)
    rolled = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    batch["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(size, -1, -1), rolled], dim=1)
    batch["attention_mask"] = torch.cat([mask.new_ones(size, p), mask.gather(1, order)], dim=1)
    if "position_ids" not in batch and _accepts(model, "position_ids"):
        batch["position_ids"] = _positions(batch["attention_mask"])
    return batch


def _per_token(key: str, value: Any, size: int, length: int) -> bool:
    """Tensors that follow the tokens (token labels, token_type_ids...), not the mask or float multi-labels."""
    if key == "attention_mask" or not torch.is_tensor(value) or tuple(value.shape[:2]) != (size, length):
        return False
    return not (key == "labels" and value.is_floating_point())


def _prepend(key: str, value: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """A per-token tensor (already in the rearranged order) with p prompt slots in front."""
    size = value.shape[0]
    if key == "labels":
        value = value.clone()
        first = (mask.shape[1] - mask.sum(1)).clamp(max=mask.shape[1] - 1)  # first real token per row
        value[torch.arange(size, device=value.device), first] = -100
        return torch.cat([value.new_full((size, p), -100), value], dim=1)
    if key == "position_ids":
        return torch.cat([torch.arange(p, device=value.device).expand(size, -1), value + p], dim=1)
    return torch.cat([value.new_zeros((size, p) + tuple(value.shape[2:])), value], dim=1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Over the full [prompt][padding][tokens] mask: prompt at 0..p-1, real tokens from p on."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _load_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # any failure here means: we cannot find the model's tokenizer
        raise UserError(
            f"method 'prompt' with init: text needs the model's tokenizer and could not load it from '{source}' ({e}); "
            f"use init: vocab or give the tokenizer to the delta before attaching"
        ) from None


DELTA = PromptTuning
