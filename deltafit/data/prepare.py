"""The data pipeline, top to bottom: `prepare_data` (for training and evaluation) and
`describe_data` (for `deltafit validate`); see the package docstring for the modules it calls."""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Optional

from deltafit.data.cache import _cache_key, _read_cache, _write_cache, data_cache_root
from deltafit.data.formats import (
    _as_number,
    _conversations,
    _encode_causal,
    _encode_classification,
    _encode_split,
    _label_names_from,
    _labels_of,
    _texts,
)
from deltafit.data.mixture import mix, mixture_counts, shares
from deltafit.data.packing import (
    _lengths,
    _packing_pays,
    _padding_fraction,
    pack_examples,
    padding_stats,
    resolve_packing,
)
from deltafit.data.splits import _load_splits, check_task
from deltafit.errors import UserError


@dataclass
class Prepared:
    """Tokenized examples ready for `make_collator`, plus what the checkpoint and logs need."""

    train: Optional[list[dict]]
    eval: Optional[list[dict]]
    label_names: Optional[list[str]]  # classification: id -> original label (as str)
    stats: dict = field(default_factory=dict)

    def train_digest(self) -> str:
        """A hash of the training rows in their order (tokens, labels, masks): a resumed run checks
        that it continues on the very rows its checkpoint was trained on."""
        digest = hashlib.sha256()
        for row in self.train or []:
            for key in sorted(row):
                value = row[key]
                digest.update(key.encode() + b"\0")
                digest.update(array("q", value).tobytes() if isinstance(value, list) else repr(value).encode())
        return digest.hexdigest()

    @property
    def packed(self) -> bool:
        """Training rows hold several examples each (see `pack_examples`)."""
        return bool(self.train) and "position_ids" in self.train[0]


def prepare_data(spec, tokenizer, task: str, seed: int, label_names: Optional[list[str]] = None,
                 want_train: bool = True, batch_size: Optional[int] = None) -> Prepared:
    """Load, format, tokenize, mask and pack the recipe's data (`spec` is the recipe's `DataSpec`),
    or read the same result from the cache. `batch_size` only adds padding figures to the stats."""
    check_task(spec, task)
    packing = resolve_packing(spec, task)
    args = (tokenizer, task, seed, label_names, want_train)
    prepared = _cached(spec.model_copy(update={"packing": bool(packing)}), *args)
    if packing is None and want_train and prepared.train:
        prepared = _pack_if_it_pays(prepared, spec, args, batch_size or 8)
    if batch_size and prepared.train:
        prepared.stats.update(padding_stats(prepared.train, batch_size, seed))
    return prepared


def describe_data(spec) -> dict:
    """Row counts and columns without a tokenizer, for `deltafit validate` (checks columns too)."""
    splits = _load_splits(spec, seed=0, want_train=True)  # the seed changes which rows, not how many
    parts = splits.parts or [("data.train", spec, splits.train, 1.0)]
    info = {
        "train_rows": sum(len(rows) for _, _, rows, _ in parts),
        "eval_rows": None if splits.eval is None else len(splits.eval),
        "eval_source": splits.eval_source,
        "columns": list(parts[0][2].column_names),
    }
    if splits.parts:
        info["train_rows"] = sum(_mixture_table(splits.parts, spec.max_train_examples, info))
    if any(s.format == "classification" for _, s, _, _ in parts):
        info["labels"] = _labels_of_parts(parts)  # sizes the head in `validate`
    checks = [(rows, s, key) for key, s, rows, _ in parts] + [(splits.eval, spec, splits.eval_key)]
    for rows, s, key in checks:
        _check_text_columns(rows, s, key)  # a list or NaN cell is refused by validate, not only by train
    return info


def _mixture_table(parts, cap, info: dict) -> list[int]:
    """Each source's rows, weight, share and the rows it would supply (`info['mixture']`); those counts."""
    weights = [w for _, _, _, w in parts]
    counts = mixture_counts([len(rows) for _, _, rows, _ in parts], weights, cap)
    info["mixture"] = [{"key": key, "source": s.train, "format": s.format, "rows": len(rows), "weight": w,
                        "share": share, "drawn": n}
                       for (key, s, rows, w), share, n in zip(parts, shares(weights), counts)]
    return counts


def _labels_of_parts(parts) -> list[str]:
    """Label names over every training source (one source: exactly `_label_names_from`'s)."""
    if len(parts) == 1:
        return _label_names_from(parts[0][2], parts[0][1], parts[0][0])
    # One source of a mixture may hold a single class; the mixture needs two.
    distinct = {name for key, s, rows, _ in parts for name in _labels_of(rows, s, key)}
    if len(distinct) < 2:
        raise UserError(f"recipe key 'data.label_column': the training sources have only one distinct label "
                        f"({', '.join(distinct)}); classification needs at least two classes")
    if all(_as_number(label) is not None for label in distinct):
        return sorted(distinct, key=float)
    return sorted(distinct)


def _check_text_columns(rows, spec, key: str) -> None:
    if rows is None:
        return
    if spec.format == "chat":
        _conversations(rows, spec)  # each row's shape and ShareGPT roles (rendering needs the tokenizer)
    for option in TEXT_OPTIONS[spec.format]:
        if getattr(spec, option, None) and getattr(spec, option) in rows.column_names:
            _texts(rows, spec, option, key)


# The columns each format reads as text (chat's messages are checked above, and by their template when rendered).
TEXT_OPTIONS = {"alpaca": ["instruction_column", "input_column", "output_column"], "chat": [],
                "completion": ["text_column", "prompt_column"],
                "classification": ["text_column", "text_pair_column"]}


def _cached(spec, tokenizer, task: str, seed: int, label_names, want_train: bool, build=None) -> Prepared:
    """The prepared data from the cache, else built (by `build`, default: from the rows) and cached."""
    key = _cache_key(spec, tokenizer, task, seed, label_names, want_train) if spec.cache else None
    entry = _read_cache(key) if key else None
    prepared, status = (Prepared(*entry) if entry else None), "hit"
    if prepared is None:
        prepared, status = (build or (lambda: _build(spec, tokenizer, task, seed, label_names, want_train)))(), "built"
        if key:
            _write_cache(key, prepared)
    prepared.stats["data_cache"] = f"{status} {data_cache_root() / key}" if key else "off"
    return prepared


def _build(spec, tokenizer, task: str, seed: int, label_names: Optional[list[str]], want_train: bool) -> Prepared:
    """The prepared data from the rows: splits, label ids, encoded examples, then packed rows."""
    splits = _load_splits(spec, seed, want_train)
    classification = task == "seq-cls"  # check_task: every source's format then is classification
    if classification and not label_names:
        # Ids come from the training labels, so the model's head and every later eval agree.
        if splits.parts:
            label_names = _labels_of_parts(splits.parts)
        else:
            rows, key = (splits.train, "data.train") if splits.train is not None else (splits.eval, splits.eval_key)
            label_names = _label_names_from(rows, spec, key)

    def encode(ds, key, s=spec):
        if classification:
            return _encode_classification(ds, s, tokenizer, label_names, key)
        return _encode_causal(ds, s, tokenizer)

    stats = {"eval_source": splits.eval_source if splits.eval is not None else None}
    if splits.parts:
        train = _encode_mixture(splits.parts, encode, stats, seed, spec.max_train_examples)
    else:
        train = _encode_split(splits.train, "train", "data.train", encode, stats)
    evaluation = _encode_split(splits.eval, "eval", splits.eval_key, encode, stats)
    if spec.packing and train:
        train = pack_examples(train, spec.max_length)
        stats["train_packed_rows"] = len(train)
    return Prepared(train, evaluation, label_names if classification else None, stats)


def _encode_mixture(parts, encode, stats: dict, seed: int, cap) -> list[dict]:
    """Each source encoded with its own data keys, then mixed by weight (`mixture.mix`); the counts
    under `train_*` in stats cover the mixture, and `train_mixture` has one entry per source."""
    pools, totals = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for key, s, rows, _ in parts:
        examples, truncated, dropped = encode(rows, key, s)
        pools.append(examples)
        totals = {"rows": totals["rows"] + len(rows), "truncated": totals["truncated"] + truncated,
                  "dropped": totals["dropped"] + dropped}
    weights = [w for _, _, _, w in parts]
    train, counts = mix(pools, weights, seed, cap, keys=[key for key, _, _, _ in parts])
    stats.update({f"train_{k}": v for k, v in totals.items()})
    stats.update(train_examples=len(train), train_tokens=sum(len(ex["input_ids"]) for ex in train))
    stats["train_mixture"] = [{"key": key, "source": s.train, "format": s.format, "rows": len(rows),
                               "examples": len(pool), "weight": w, "share": share, "drawn": n}
                              for (key, s, rows, w), pool, share, n in zip(parts, pools, shares(weights), counts)]
    return train


def _pack_if_it_pays(unpacked: Prepared, spec, args: tuple, batch_size: int) -> Prepared:
    """`data.packing` unset: the packed data when packing saves enough compute (`_packing_pays`), else the
    unpacked data, with the padding packing would have left in its stats."""
    seed = args[2]
    rows = pack_examples(unpacked.train, spec.max_length)
    if _packing_pays(unpacked.train, rows, batch_size, seed):
        return _cached(spec.model_copy(update={"packing": True}), *args, build=lambda: _with_rows(unpacked, rows))
    unpacked.stats["train_padding_if_packed"] = _padding_fraction(_lengths(rows), batch_size, seed)
    return unpacked


def _with_rows(prepared: Prepared, rows: list[dict]) -> Prepared:
    stats = {k: v for k, v in prepared.stats.items() if k != "data_cache"}
    return Prepared(rows, prepared.eval, prepared.label_names, {**stats, "train_packed_rows": len(rows)})
