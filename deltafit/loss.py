"""Causal-LM loss without the full logits tensor.

transformers' causal-LM models compute `lm_head(hidden)` for every position and upcast it to fp32
before the cross-entropy: [batch, seq, vocab] floats (8 x 256 x 49,152 x 4 B = 400 MB for
SmolLM2), several times over counting the softmax and its gradient. That is most of a small
model's training memory. Here the decoder body runs as usual (through the model's own forward,
so delta hooks, `prepare_inputs` kwargs such as a prefix cache, and gradient checkpointing all
apply), the head is skipped (`logits_to_keep` selects no position), and then:

- only positions whose (shifted) label counts are projected: prompt tokens masked with -100 and
  padding never reach the head at all;
- those positions go through the head in chunks of about CHUNK_BYTES of fp32 logits, each under
  `torch.utils.checkpoint`, so backward recomputes one chunk's logits at a time instead of
  keeping them all.

The head is called as a module (`model.get_output_embeddings()(h)`), never as a bare weight, so
hooks on it (a LoRA on lm_head) still apply (a dropout inside such a hook draws its masks chunk by
chunk: the same distribution as the plain path, not the same masks). The result is transformers' `ForCausalLMLoss`:
labels shifted left by one, -100 ignored, fp32 logits, mean over the counted tokens.

Models whose forward changes the logits after the head (Gemma's final soft-capping, Cohere's
logit scale, Granite's logits scaling) or that take no `logits_to_keep` use the plain loss.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20  # fp32 logits per chunk: ~170 tokens at SmolLM2's 49,152 vocabulary
# Config attributes that mean "the logits are transformed after the head": the chunked path would
# compute a different loss for such models, so they keep the plain one.
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def causal_lm_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's causal-LM loss on `inputs` (which hold `labels`), computed chunk by chunk when possible."""
    core = getattr(model, "module", model)  # DistributedDataParallel and friends wrap the model
    if not supports_chunked_loss(core) or inputs.get("labels") is None:
        return model(**inputs).loss
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden = _hidden_states(model, core, inputs)
    return chunked_cross_entropy(core.get_output_embeddings(), hidden, labels)


def supports_chunked_loss(model: nn.Module) -> bool:
    """True for causal LMs whose logits are exactly `lm_head(body(...))` and that can skip the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", model)
    if head is None or body is model:
        return False
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, name, None) not in (None, 1, 1.0)
           for c in (config, text_config) for name in POST_HEAD_TRANSFORMS):
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _hidden_states(model: nn.Module, core: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Run the full model with no logits kept and catch the body's last hidden state on the way."""
    caught = []
    handle = core.base_model.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=_device(inputs, core)))
    finally:
        handle.remove()
    return caught[-1]


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` ([batch, seq], -100 = ignore)."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape[:2])} and labels {tuple(labels.shape)} do not line up")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)  # position t predicts t+1
    counted = targets != IGNORE_INDEX
    picked, targets = hidden[counted], targets[counted]
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * _vocab_size(head)))
    total = picked.sum() * 0.0  # keeps the graph (and gives 0/0 = nan, like transformers) when no token counts
    for start in range(0, picked.shape[0], chunk):
        h, y = picked[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _summed_loss(head, h, y)
    return total / targets.numel()


def _summed_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _vocab_size(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 65536


def _device(inputs: dict[str, Any], core: nn.Module) -> torch.device:
    for value in inputs.values():
        if torch.is_tensor(value):
            return value.device
    return next(core.parameters()).device
