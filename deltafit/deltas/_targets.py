"""Which modules get a delta: name matching shared by every targeted method.

Rules (the same as PEFT's, so recipes translate): a list matches a module whose full name equals
an entry or ends with '.' + entry; a string is a regex that must match the full name; 'all-linear'
is every linear layer except the output head. `layers` keeps only blocks with those indexes.

"Linear layer" means nn.Linear and transformers' `Conv1D` (OpenAI GPT, GPT-2 and its kin), which
computes the same x W^T + b but stores its weight transposed (in x out). Methods read a target's
sizes through `shape`/`in_features`/`out_features` and its weight as out x in through `dense_weight`,
never off the weight's own layout.
"""

from __future__ import annotations

import re
import sys
from typing import Optional, Union

import torch
from torch import nn

from deltafit.deltas.base import base_named_modules, base_named_parameters
from deltafit.errors import UserError

# Per-architecture defaults: the attention query/value projections, as in the LoRA paper.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
}

# Output heads never get a delta under 'all-linear' (they are trained whole or left alone).
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "pooler.dense")

_BLOCK_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def block_index(module_name: str) -> Optional[int]:
    """Index of the transformer block a module lives in, or None outside the blocks."""
    match = _BLOCK_INDEX.search("." + module_name)
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    indexes = {block_index(n) for n, _ in base_named_modules(model)} - {None}
    return max(indexes) + 1 if indexes else 0


def linear_kinds() -> tuple[type, ...]:
    """nn.Linear, and transformers' Conv1D when transformers is loaded (a Conv1D cannot exist before
    `transformers.pytorch_utils` is imported, so checking sys.modules keeps this module light)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_transposed(module: nn.Module) -> bool:
    """True for a Conv1D: its weight is stored in x out, the transpose of nn.Linear's out x in."""
    kinds = linear_kinds()
    return len(kinds) > 1 and isinstance(module, kinds[1])


def find_targets(
    model: nn.Module,
    spec: Union[str, list[str], None],
    layers: Optional[list[int]] = None,
    kinds: Optional[tuple[type, ...]] = None,
) -> dict[str, nn.Module]:
    """Resolve a target spec into {full module name: module}; an empty result is a user error.
    `kinds`: the module types that can be targets (default: linear layers, Conv1D included)."""
    kinds = linear_kinds() if kinds is None else kinds
    spec = default_targets(model) if spec is None else spec
    _check_regex(spec)
    matches = {n: m for n, m in base_named_modules(model) if n and isinstance(m, kinds) and _matches(n, spec)}
    if layers is not None:
        wanted = _normalize_layers(model, layers)
        matches = {n: m for n, m in matches.items() if block_index(n) in wanted}
    if not matches:
        examples = sorted({n.rsplit(".", 1)[-1] for n, m in base_named_modules(model) if isinstance(m, kinds)})
        raise UserError(
            f"recipe key 'delta.target_modules': {spec!r}"
            f"{f' with delta.layers={layers}' if layers is not None else ''} matches no module of this model; "
            f"its {'/'.join(k.__name__ for k in kinds)} modules are named: {', '.join(examples[:12])}"
        )
    return matches


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise UserError(
            f"no default target modules for model type '{model_type}': set delta.target_modules "
            f"(a list of module names, a regex, or 'all-linear')"
        )
    return DEFAULT_TARGETS[model_type]


def _check_regex(spec) -> None:
    if isinstance(spec, str) and spec != "all-linear":
        try:
            re.compile(spec)
        except re.error as e:
            raise UserError(f"recipe key 'delta.target_modules': {spec!r} is not a valid regex ({e})") from None


def _matches(name: str, spec: Union[str, list[str]]) -> bool:
    if spec == "all-linear":
        return not any(name == h or name.endswith("." + h) for h in HEAD_NAMES)
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _normalize_layers(model: nn.Module, layers: list[int]) -> set[int]:
    total = num_blocks(model)
    bad = [i for i in layers if not -total <= i < total]
    if bad:
        raise UserError(f"recipe key 'delta.layers': {bad} out of range for a model with {total} blocks "
                        f"(valid: 0..{total - 1} or negative)")
    return {i % total for i in layers}


# -- sizes the model can use (called from the methods' `check_fits`, before anything is allocated) --


def refuse_above(key: str, value: int, limit: int, why: str) -> None:
    """The one message of every size check: recipe key, value, why it cannot fit, the valid range."""
    if value > limit:
        raise UserError(f"recipe key '{key}': {value} {why}; valid: 1..{limit}")


def shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like target, read off its attributes or its weight
    (a Conv1D's weight is in x out)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    out, in_ = module.weight.shape[:2]
    return (int(in_), int(out)) if is_transposed(module) else (int(out), int(in_))


def in_features(module: nn.Module) -> int:
    return shape(module)[1]


def out_features(module: nn.Module) -> int:
    return shape(module)[0]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The target's weight as out x in, whatever its storage (a view of a Conv1D's in x out weight)."""
    return module.weight.t() if is_transposed(module) else module.weight


def check_rank(targets: dict[str, nn.Module], r: int, key: str = "delta.r") -> None:
    """Refuse a rank above min(in_features, out_features) of a target: a low-rank update of such a layer
    is at most that rank, so a larger r adds parameters but no expressiveness. Names the narrowest
    target and the largest useful value."""
    if not targets:
        return
    name = min(targets, key=lambda n: min(shape(targets[n])))
    out, in_ = shape(targets[name])
    limit = min(out, in_)
    refuse_above(key, r, limit, f"is above the rank '{name}' can take ({out} x {in_}: at most {limit}); "
                                f"a larger rank adds parameters but no expressiveness")


def check_within_base(model: nn.Module, key: str, value: int, numbers_per_unit: int, what: str) -> None:
    """Refuse `value` when it would give `what` value * numbers_per_unit numbers, more than the base
    model's own parameter count: a sane bound for sizes no rank limit covers (VeRA's shared rank,
    which the paper sets above small layers' dimensions)."""
    base = sum(p.numel() for _, p in base_named_parameters(model))
    refuse_above(key, value, max(1, base // numbers_per_unit),
                 f"would give {what} {value * numbers_per_unit:,} numbers, more than the whole base model "
                 f"({base:,} parameters)")
