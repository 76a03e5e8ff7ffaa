"""Packing (`data.packing`, on by default for causal-LM training data when it saves compute).

`pack_examples` puts several examples into each row of at most `max_length` tokens. Each example
keeps its own positions (position_ids restart at 0) and the collator gives packed batches no
attention mask, which is how transformers is told to build a block-diagonal causal mask: no token
attends across an example boundary (`use_packed_attention` checks that on the real model before
training). The first label of every example is masked, so no example's first token is predicted
from the one before it: a packed row has exactly the targets of its examples unpacked. Evaluation
data is never packed.
"""

from __future__ import annotations

import bisect
import random
from typing import Optional

from deltafit.data.formats import IGNORE_INDEX
from deltafit.errors import UserError

# Automatic packing must save at least this share of batch positions: packed batches need an
# explicit block-diagonal mask, which rules out the fastest (plain causal) attention kernels.
PACKING_MIN_SAVING = 0.1


def _packing_pays(examples: list[dict], rows: list[dict], batch_size: int, seed: int) -> bool:
    """`data.packing` unset: pack when that saves batch positions (compute). It does not when the
    examples are about equally long and over half of max_length: few pairs fit, and rows of one
    and of two examples batched together pad more than the examples alone."""
    before, after = (_batch_positions(_lengths(r), batch_size, seed) for r in (examples, rows))
    return after <= (1 - PACKING_MIN_SAVING) * before


def resolve_packing(spec, task: str, method=None) -> Optional[bool]:
    """Whether training rows are packed: True, False, or None for "when it saves compute" (decided
    on the data). `data.packing` unset means the latter for causal-LM data, unless the delta method
    (a Delta class or instance, when known) cannot train on packed rows."""
    supported = method is None or method.supports_packing
    if spec.packing is None:
        return None if task == "causal-lm" and supported else False
    if spec.packing and task != "causal-lm":
        raise UserError("recipe key 'data.packing': only causal-LM examples can be packed; classification "
                        "(model.task seq-cls) keeps one example per row, so leave data.packing unset or false")
    if spec.packing and not supported:
        blocker = getattr(method, "packing_blocker", None)  # a composition names its part
        who = (blocker() if callable(blocker) else None) or f"method '{method.name}'"
        raise UserError(f"recipe key 'data.packing': {who} cannot train on packed rows (it adds "
                        f"inputs in front of each sequence); leave data.packing unset or set it to false")
    return spec.packing


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Best-fit decreasing: each example, longest first, goes into the fullest row it still fits.

    Rows keep their examples in data order. Examples are at most `capacity` tokens (truncation
    comes first), so every one fits somewhere.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of rows with space left, sorted
    for i in order:
        size = len(examples[i]["input_ids"])
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            free, row = room.pop(at)
            rows[row].append(i)
        else:
            free, row = capacity, len(rows)
            rows.append([i])
        if free - size > 0:
            bisect.insort(room, (free - size, row))
    return [_join([examples[i] for i in sorted(row)]) for row in rows]


def _join(examples: list[dict]) -> dict:
    """One packed row; the first label of each example is masked (it would be predicted from the
    previous example's last token; unpacked, no label at position 0 is ever used either)."""
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        row["position_ids"] += list(range(len(ex["input_ids"])))
    return row


def example_lengths(rows: list[dict]) -> list[int]:
    """Token count of every example in `rows`, packed or not (packed examples start at position 0)."""
    lengths = []
    for row in rows:
        if "position_ids" not in row:
            lengths.append(len(row["input_ids"]))
            continue
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return lengths


def padding_stats(rows: list[dict], batch_size: int, seed: int) -> dict:
    """Share of batch positions that are padding, for rows batched in a seeded random order as the
    trainer does; for packed rows also what it would have been with the examples unpacked."""
    stats = {"train_padding": _padding_fraction(_lengths(rows), batch_size, seed)}
    if rows and "position_ids" in rows[0]:
        stats["train_padding_unpacked"] = _padding_fraction(example_lengths(rows), batch_size, seed)
    return stats


def _lengths(rows: list[dict]) -> list[int]:
    return [len(row["input_ids"]) for row in rows]


def _padding_fraction(lengths: list[int], batch_size: int, seed: int) -> float:
    positions = _batch_positions(lengths, batch_size, seed)
    return round(1 - sum(lengths) / positions, 4) if positions else 0.0


def _batch_positions(lengths: list[int], batch_size: int, seed: int) -> int:
    """Token slots (real + padding) of one epoch's batches of rows of these lengths, seeded order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = (order[start: start + batch_size] for start in range(0, len(order), batch_size))
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def use_packed_attention(model) -> None:
    """Make `model` keep the examples of a packed row apart, and check on a probe that it does.

    transformers builds a block-diagonal causal mask from position_ids that restart at 0, but only
    with no attention mask and no cache; a causal LM makes an (empty) cache in every forward
    unless `use_cache` is off. A model whose attention ignores all this would let examples see
    each other: refused, naming data.packing.
    """
    import torch

    model.config.use_cache = False
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4, 5]], device=device) % model.config.get_text_config().vocab_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]], device=device)).logits[0, 3:]
        alone = model(input_ids=ids[:, 3:]).logits[0]
    model.train(was_training)
    packed, alone = packed.float(), alone.float()
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if (packed - alone).abs().max() > tolerance * max(1.0, float(alone.abs().max())):
        raise UserError(f"recipe key 'data.packing': {type(model).__name__} lets the examples of a packed row attend "
                        f"to each other (its attention does not follow restarting position_ids); "
                        f"set data.packing: false")
