"""Training mixtures: `data.train` as a list of {source, weight, ...} entries.

Each source is loaded, checked and encoded with its own data keys (the data section's, overridden
by what its entry sets: format, columns...), so alpaca rows and chat conversations can train
together. The encoded examples are then mixed:

    size    = examples of all sources together, at most data.max_train_examples
    count_i = size * weight_i / sum(weights)       (largest remainder: the counts add up to size)
    source i: its examples in a seeded shuffle, count_i of them; past its end a new shuffle follows
              (upsampling repeats examples, downsampling leaves some out, none repeated while they last)
    mixture = the drawn examples of all sources, shuffled once more

Every shuffle is seeded by train.seed and the source's position, so a run and its `--resume` see the
same mixture in the same order, and the data cache key includes every entry.
"""

from __future__ import annotations

import math
import random
from typing import Optional

from deltafit.errors import UserError


def is_mixture(spec) -> bool:
    return isinstance(spec.train, list)


def source_specs(spec) -> list[tuple[str, object, float]]:
    """(recipe key, the data section as this source alone sees it, weight) for each training source."""
    if not is_mixture(spec):
        return [("data.train", spec, 1.0)]
    return [(f"data.train.{i}", spec.model_copy(update={"train": entry.source, **entry.overrides()}), entry.weight)
            for i, entry in enumerate(spec.train)]


def check_mixture(spec) -> None:
    """The options a mixture cannot take: its evaluation rows come from data.eval (or there are none)."""
    if not is_mixture(spec):
        return
    if spec.eval_fraction:
        raise UserError("recipe key 'data.eval_fraction': a mixture of training sources holds nothing out; set "
                        "data.eval to an evaluation file or dataset")
    if spec.eval_split and not spec.eval:
        raise UserError("recipe key 'data.eval_split': with a mixture of training sources, name the evaluation "
                        "dataset in data.eval (data.eval_split is its split)")


def mixture_counts(sizes: list[int], weights: list[float], cap: Optional[int] = None) -> list[int]:
    """How many examples each source supplies: shares of sum(sizes) (at most `cap`) by weight."""
    total = sum(sizes) if cap is None else min(cap, sum(sizes))
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(n: int, size: int, rng: random.Random) -> list[int]:
    """n indices into `size` items: seeded permutations one after another (repeats only past the end)."""
    out: list[int] = []
    while len(out) < n:
        order = list(range(size))
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def mix(pools: list[list], weights: list[float], seed: int, cap: Optional[int] = None,
        keys: Optional[list[str]] = None) -> tuple[list, list[int]]:
    """(the mixed examples in their seeded order, the count drawn from each pool)."""
    counts = mixture_counts([len(pool) for pool in pools], weights, cap)
    mixed = []
    for i, (pool, n) in enumerate(zip(pools, counts)):
        if n and not pool:
            key = keys[i] if keys else f"data.train.{i}"
            raise UserError(f"recipe key '{key}': the source gave no examples (each lost its trained tokens, e.g. "
                            f"to truncation at data.max_length), but its weight asks for {n}")
        # str seeds are hashed with SHA-512 by `random`: the same in every process and Python version.
        mixed += [pool[j] for j in draw(n, len(pool), random.Random(f"deltafit-mixture:{seed}:{i}"))]
    random.Random(f"deltafit-mixture:{seed}").shuffle(mixed)
    return mixed, counts


def shares(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]
