"""Recipe values that cannot fit the chosen model, refused before any work is done.

`check_recipe_fits(recipe, model_config, label_names)` is called by `deltafit validate` (plan.py,
with the weightless model's config and the labels `describe_data` found) and by `deltafit train`
(before the base weights are loaded). Sizes that depend on the delta's targets (ranks, VeRA's
shared rank, SAID's dimension) are the methods' own `Delta.check_fits`, run by `attach`.

- Positions: `data.max_length` tokens, plus `delta.num_virtual_tokens` for methods that put extra
  tokens in front of each input (prompt, prefix), must fit `config.max_position_embeddings` (also
  for rotary models, which have no hard table but were trained up to it). A `data.max_length` left
  at its default is not held against the model: only values the recipe sets are refused.
- Classes: a `model.num_labels` other than the number of labels in the data.

No torch or transformers import: the config is only read.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from deltafit.errors import UserError

# Models that number positions from padding_idx + 1 (RoBERTa's embeddings): that many rows of the
# position table are never used by a token.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}
MIN_TEXT_TOKENS = 8  # the smallest data.max_length a recipe may set
LABELS_SHOWN = 10


def check_recipe_fits(recipe, model_config, label_names: Optional[Sequence[str]] = None) -> None:
    """Raise a one-line UserError for a recipe value the model cannot take: positions
    (`data.max_length`, `delta.num_virtual_tokens`) beyond the model's limit, or `model.num_labels`
    other than the number of classes in `label_names` (the data's labels; None: not known yet, not checked)."""
    check_positions(recipe, model_config)
    check_labels(recipe, label_names)


def position_limit(model_config) -> Optional[int]:
    """How many positions one input may use: config.max_position_embeddings (less the rows RoBERTa-style
    models skip), or None where the config states no limit (relative positions, e.g. T5)."""
    getter = getattr(model_config, "get_text_config", None)
    config = getter() if callable(getter) else model_config
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_positions(recipe, model_config) -> None:
    limit = position_limit(model_config)
    if limit is None:
        return
    where = f"the {limit} positions the model takes (its config.max_position_embeddings)"
    set_length = "max_length" in recipe.data.model_fields_set
    length = recipe.data.max_length
    if set_length and length > limit:
        raise UserError(f"recipe key 'data.max_length': {length} is more than {where}; "
                        f"valid: {MIN_TEXT_TOKENS}..{limit}")
    tokens = _virtual_tokens(recipe.delta)
    if not tokens:
        return
    if not set_length:  # the default length is not held against the model: the tokens must leave room for text
        if tokens + MIN_TEXT_TOKENS > limit:
            raise UserError(f"recipe key 'delta.num_virtual_tokens': {tokens} leaves fewer than {MIN_TEXT_TOKENS} of "
                            f"{where} for the text; valid: 1..{limit - MIN_TEXT_TOKENS}")
        return
    if tokens + length > limit:
        fixes = [f"delta.num_virtual_tokens to at most {limit - length}" if limit - length >= 1 else None,
                 f"data.max_length to at most {limit - tokens}" if limit - tokens >= MIN_TEXT_TOKENS else None]
        fix = " or ".join(f for f in fixes if f) or "both"
        raise UserError(f"recipe key 'delta.num_virtual_tokens': {tokens} virtual tokens + data.max_length {length} "
                        f"= {tokens + length} positions, more than {where}; lower {fix}")


def _virtual_tokens(delta_config: Any) -> int:
    """Extra positions the method puts in front of every input (prompt and prefix tuning)."""
    return int(getattr(delta_config, "num_virtual_tokens", None) or 0)


def check_labels(recipe, label_names: Optional[Sequence[str]]) -> None:
    wanted = recipe.model.num_labels
    if recipe.model.task != "seq-cls" or wanted is None or not label_names or wanted == len(label_names):
        return
    names = [_show(n) for n in label_names[:LABELS_SHOWN]]
    more = f", ... ({len(label_names) - LABELS_SHOWN} more)" if len(label_names) > LABELS_SHOWN else ""
    # More outputs than classes would be outputs with no label to name them, never trained toward.
    relation = "is fewer than" if wanted < len(label_names) else "is more than"
    raise UserError(f"recipe key 'model.num_labels': {wanted} {relation} the {len(label_names)} classes in the "
                    f"data ({', '.join(names)}{more}); set model.num_labels: {len(label_names)} or leave it out "
                    f"(it is inferred from the labels)")


def _show(label) -> str:
    text = str(label)
    return text if text.isprintable() else repr(text)
