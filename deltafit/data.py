"""Data: load rows, turn them into examples, tokenize, mask and truncate.

The flow is `load_rows` (hub dataset -> `datasets.Dataset`, local file -> `ArrowRows`) -> `_load_splits`
(train / eval rows, held-out fraction, caps) -> one encoder per `data.format` -> `Prepared`.

Causal-LM formats are built from segments: (text, trained) pairs tokenized separately and joined,
so the prompt/response boundary is exact in token space (no offset mapping or re-tokenizing of
prefixes). Prompt segments get label -100 unless `data.train_on_inputs`; EOS ends every response
(chat responses end with whatever the chat template closes an assistant turn with).

Packing (`data.packing`, on by default for causal-LM training data): `pack_examples` puts several
examples into each row of at most `max_length` tokens. Each example keeps its own positions
(position_ids restart at 0) and the collator gives packed batches no attention mask, which is how
transformers is told to build a block-diagonal causal mask: no token attends across an example
boundary (`use_packed_attention` checks that on the real model before training). The first label
of every example is masked, so no example's first token is predicted from the one before it: a
packed row has exactly the targets of its examples unpacked. Evaluation data is never packed.

The tokenized result is cached (`data.cache`) under `<DELTAFIT_CACHE>/data/<key>/` as Arrow IPC
files plus JSON (no pickle), written to a temporary folder renamed into place. The key is a hash
of everything that changes the content: the bytes of the data files (a hub dataset's fingerprint),
the tokenizer (its full serialized state and behaviour) and chat template, every data option
(format, columns, max_length, packing, train_on_inputs...), and this module's own source.

Every problem a user can fix (a missing file or column, bad bytes, an unknown label) is a
`UserError` naming the recipe key. torch and datasets are imported inside functions so that
importing this module (e.g. for `deltafit --help`) costs nothing.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from deltafit.errors import UserError, did_you_mean
from deltafit.tasks import load_builtin

LOCAL_EXTENSIONS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss ignore_index)
CAUSAL_FORMATS = ("alpaca", "chat", "completion")

# The Stanford Alpaca prompts, verbatim, so models tuned here match the usual Alpaca inference prompt.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Prepared:
    """Tokenized examples ready for `make_collator`, plus what the checkpoint and logs need."""

    train: Optional[list[dict]]
    eval: Optional[list[dict]]
    label_names: Optional[list[str]]  # classification: id -> original label (as str)
    stats: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        """Training rows hold several examples each (see `pack_examples`)."""
        return bool(self.train) and "position_ids" in self.train[0]


# ----------------------------------------------------------------------------------------------
# Public entry points


def prepare_data(spec, tokenizer, task: str, seed: int, label_names: Optional[list[str]] = None,
                 want_train: bool = True, batch_size: Optional[int] = None) -> Prepared:
    """Load, format, tokenize, mask and pack the recipe's data (`spec` is the recipe's `DataSpec`),
    or read the same result from the cache. `batch_size` only adds padding figures to the stats."""
    _check_task(spec, task)
    packing = resolve_packing(spec, task)
    args = (tokenizer, task, seed, label_names, want_train)
    prepared = _cached(spec.model_copy(update={"packing": bool(packing)}), *args)
    if packing is None and want_train and prepared.train:
        prepared = _pack_if_it_pays(prepared, spec, args, batch_size or 8)
    if batch_size and prepared.train:
        prepared.stats.update(padding_stats(prepared.train, batch_size, seed))
    return prepared


# Automatic packing must save at least this share of batch positions: packed batches need an
# explicit block-diagonal mask, which rules out the fastest (plain causal) attention kernels.
PACKING_MIN_SAVING = 0.1


def _pack_if_it_pays(unpacked: Prepared, spec, args: tuple, batch_size: int) -> Prepared:
    """`data.packing` unset: pack when that saves batch positions (compute). It does not when the
    examples are about equally long and over half of max_length: few pairs fit, and rows of one
    and of two examples batched together pad more than the examples alone."""
    seed = args[2]
    rows = pack_examples(unpacked.train, spec.max_length)
    before, after = (_batch_positions(_lengths(r), batch_size, seed) for r in (unpacked.train, rows))
    if after <= (1 - PACKING_MIN_SAVING) * before:
        return _cached(spec.model_copy(update={"packing": True}), *args, build=lambda: _with_rows(unpacked, rows))
    unpacked.stats["train_padding_if_packed"] = _padding_fraction(_lengths(rows), batch_size, seed)
    return unpacked


def _cached(spec, tokenizer, task: str, seed: int, label_names, want_train: bool, build=None) -> Prepared:
    """The prepared data from the cache, else built (by `build`, default: from the rows) and cached."""
    key = _cache_key(spec, tokenizer, task, seed, label_names, want_train) if spec.cache else None
    prepared, status = (_read_cache(key) if key else None), "hit"
    if prepared is None:
        prepared, status = (build or (lambda: _build(spec, tokenizer, task, seed, label_names, want_train)))(), "built"
        if key:
            _write_cache(key, prepared)
    prepared.stats["data_cache"] = f"{status} {data_cache_root() / key}" if key else "off"
    return prepared


def _with_rows(prepared: Prepared, rows: list[dict]) -> Prepared:
    stats = {k: v for k, v in prepared.stats.items() if k != "data_cache"}
    return Prepared(rows, prepared.eval, prepared.label_names, {**stats, "train_packed_rows": len(rows)})


def resolve_packing(spec, task: str, method=None) -> Optional[bool]:
    """Whether training rows are packed: True, False, or None for "when it saves compute" (decided
    on the data). `data.packing` unset means the latter for causal-LM data, unless the delta method
    (a Delta class, when known) cannot train on packed rows."""
    supported = method is None or method.supports_packing
    if spec.packing is None:
        return None if task == "causal-lm" and supported else False
    if spec.packing and task != "causal-lm":
        raise UserError("recipe key 'data.packing': only causal-LM examples can be packed; classification "
                        "(model.task seq-cls) keeps one example per row, so leave data.packing unset or false")
    if spec.packing and not supported:
        raise UserError(f"recipe key 'data.packing': method '{method.name}' cannot train on packed rows (it adds "
                        f"inputs in front of each sequence); leave data.packing unset or set it to false")
    return spec.packing


def _build(spec, tokenizer, task: str, seed: int, label_names: Optional[list[str]], want_train: bool) -> Prepared:
    splits = _load_splits(spec, seed, want_train)
    classification = spec.format == "classification"
    if classification and not label_names:
        # Ids come from the training labels, so the model's head and every later eval agree.
        rows, key = (splits.train, "data.train") if splits.train is not None else (splits.eval, splits.eval_key)
        label_names = _label_names_from(rows, spec, key)

    def encode(ds, key):
        if classification:
            return _encode_classification(ds, spec, tokenizer, label_names, key)
        return _encode_causal(ds, spec, tokenizer)

    stats = {"eval_source": splits.eval_source if splits.eval is not None else None}
    train = _encode_split(splits.train, "train", "data.train", encode, stats)
    evaluation = _encode_split(splits.eval, "eval", splits.eval_key, encode, stats)
    if spec.packing and train:
        train = pack_examples(train, spec.max_length)
        stats["train_packed_rows"] = len(train)
    return Prepared(train, evaluation, label_names if classification else None, stats)


def describe_data(spec) -> dict:
    """Row counts and columns without a tokenizer, for `deltafit validate` (checks columns too)."""
    splits = _load_splits(spec, seed=0, want_train=True)  # the seed changes which rows, not how many
    info = {
        "train_rows": len(splits.train),
        "eval_rows": None if splits.eval is None else len(splits.eval),
        "eval_source": splits.eval_source,
        "columns": list(splits.train.column_names),
    }
    if spec.format == "classification":
        info["labels"] = _label_names_from(splits.train, spec, "data.train")  # sizes the head in `validate`
    return info


BUILTIN_PREFIX = "builtin:"  # datasets deltafit generates itself (deltafit/tasks.py)


def load_rows(source: str, config: Optional[str] = None, split: str = "train", key: str = "data.train"):
    """Rows of a local file (by extension, as `ArrowRows`) or a hub dataset (`datasets.Dataset`); never empty."""
    path = Path(source).expanduser()
    if source.startswith(BUILTIN_PREFIX):
        ds = _from_records(load_builtin(source[len(BUILTIN_PREFIX):], key))
    elif _looks_local(source, path):
        ds = _load_local(path, split, key)
    else:
        ds = _load_hub(source, config, split, key)
    if len(ds) == 0:
        raise UserError(f"recipe key '{key}': '{source}' has no rows")
    return ds


def make_collator(pad_token_id: Optional[int], task: str) -> "Collator":
    """Batch examples (or packed rows) with dynamic right-padding to the longest one in the batch."""
    return Collator(pad_token_id, task)


class Collator:
    """A class rather than a closure so DataLoader workers can pickle it."""

    def __init__(self, pad_token_id: Optional[int], task: str):
        # Padded positions are hidden by the attention mask and ignored by the loss, so any id
        # works when the tokenizer has no pad token.
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.classification = task == "seq-cls"

    def __call__(self, batch: list[dict]) -> dict:
        if "position_ids" in batch[0]:
            return self._packed(batch)
        import torch

        width = max(len(ex["input_ids"]) for ex in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = torch.tensor(ex["attention_mask"], dtype=torch.long)
            if not self.classification:
                labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if self.classification:
            labels = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _packed(self, batch: list[dict]) -> dict:
        """Packed rows: position_ids and no attention mask (transformers then keeps examples apart).
        Padding gets position 0 at every slot, so each padding token is a one-token sequence of its
        own; real examples are never shorter than 2 tokens, which `batch_tokens` relies on."""
        import torch

        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
            position_ids[i, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a collated batch, packed or not."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    # Packed: padding is the run of position 0s at the end of a row (see Collator._packed).
    positions = batch["position_ids"]
    trailing_zeros = (positions.flip(-1) != 0).int().argmax(-1)
    return int(positions.shape[1] * positions.shape[0] - trailing_zeros.sum())


# ----------------------------------------------------------------------------------------------
# Loading: local files and hub datasets


class _BadFile(Exception):
    """A problem with a local file's content; `_load_local` adds the recipe key and the path."""


def _looks_local(source: str, path: Path) -> bool:
    # Hub ids look like 'name' or 'org/name'; anything else with a path shape is meant as a file,
    # so a typo in it should say "does not exist" instead of trying (and failing on) the hub.
    return (path.exists() or path.suffix.lower() in LOCAL_EXTENSIONS or source.startswith((".", "/", "~"))
            or source.count("/") > 1 or "\\" in source)


def _load_local(path: Path, split: str, key: str):
    if not path.exists():
        raise UserError(f"recipe key '{key}': file '{path}' does not exist (expected a local "
                        f"{'/'.join(LOCAL_EXTENSIONS)} file or a hub dataset name)")
    if path.is_dir():
        # A folder of data files (or a dataset repo clone): the datasets library knows those layouts.
        return _load_hub(str(path), None, split, key)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"recipe key '{key}': '{path}' has an unsupported extension "
                        f"(use one of {', '.join(LOCAL_EXTENSIONS)})")
    try:
        return reader(path)
    except UnicodeDecodeError as e:
        raise UserError(f"recipe key '{key}': file '{path}' is not UTF-8 text (invalid byte at offset {e.start})") from None
    except _BadFile as e:
        raise UserError(f"recipe key '{key}': file '{path}' {e}") from None


def _load_hub(source: str, config: Optional[str], split: str, key: str):
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # network, auth, unknown name/config/split: all reported the same way
        what = f"'{source}'" + (f" (config '{config}')" if config else "") + f" split '{split}'"
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"recipe key '{key}': hub dataset {what} could not be loaded (offline? for a local file use a "
                        f"{'/'.join(LOCAL_EXTENSIONS)} path): {type(e).__name__}: {reason}") from None


def _read_json(path: Path):
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise _BadFile("is empty (expected [{...}, ...] or one {...} per line)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise _BadFile(f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        data = _json_lines(text)  # more than one value: JSON lines
    if isinstance(data, dict) and path.suffix.lower() == ".jsonl":
        data = [data]  # a JSON-lines file with a single record
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        got = type(data).__name__ if not isinstance(data, list) else "a list with non-object items"
        raise _BadFile(f"is not a list of records (got {got}; expected [{{...}}, ...] or one {{...}} per line)")
    return _from_records(data)


def _json_lines(text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _BadFile(f"line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise _BadFile(f"line {lineno} is not a record (a JSON object)")
        records.append(record)
    return records


class ArrowRows:
    """A local file's rows as an Arrow table, answering the few `datasets.Dataset` calls deltafit makes.

    Importing `datasets` (and the pandas it pulls in) costs about 0.5 s, a tenth of `deltafit
    validate`; local files need none of it. Arrow types the columns as `Dataset.from_dict` does.
    """

    def __init__(self, table):
        self.table = table

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, column: str) -> list:
        return self.table[column].to_pylist()

    def select(self, indices) -> "ArrowRows":
        return ArrowRows(self.table.take(list(indices)))

    def with_format(self, kind: str):
        if kind != "arrow":
            raise ValueError(f"ArrowRows has only the arrow format, not {kind!r}")
        return self.table


def _from_records(records: list[dict]):
    import pyarrow

    # Columns are the union of every record's keys (Dataset.from_list looks at the first only).
    columns = dict.fromkeys(k for r in records for k in r)
    try:
        return ArrowRows(pyarrow.Table.from_pydict({c: [r.get(c) for r in records] for c in columns}))
    except pyarrow.lib.ArrowException as e:
        raise _BadFile(f"has a column whose values mix types: {_mixed_column(records, columns) or e} "
                       f"(every row must give a column the same kind of value)") from None


def _mixed_column(records: list[dict], columns) -> str:
    """Which column Arrow could not type, e.g. "column 'output' (str and dict)"."""
    import pyarrow

    for c in columns:
        try:
            pyarrow.array([r.get(c) for r in records])
        except pyarrow.lib.ArrowException:
            kinds = dict.fromkeys(type(r[c]).__name__ for r in records if r.get(c) is not None)
            return f"column '{c}' ({' and '.join(kinds)})"
    return ""


def _read_delimited(path: Path, delimiter: str, quoting: int):
    import pyarrow

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None) or []
        if not header:
            raise _BadFile("is empty: it has no rows and no header (expected a header line naming the columns, "
                           "then one row per line)")
        if len(set(header)) != len(header):
            raise _BadFile(f"has a repeated column name in its header ({', '.join(header)})")
        columns = [[] for _ in header]
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise _BadFile(f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}")
            for column, value in zip(columns, row):
                column.append(value)
    return ArrowRows(pyarrow.Table.from_pydict(dict(zip(header, columns))))


def _read_parquet(path: Path):
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.lib.ArrowException as e:
        raise _BadFile(f"is not a readable Parquet file ({e})") from None
    return ArrowRows(table)


_READERS = {
    ".json": _read_json,
    ".jsonl": _read_json,
    ".csv": lambda p: _read_delimited(p, ",", csv.QUOTE_MINIMAL),
    # GLUE-style TSVs are unquoted and contain stray double quotes: quotes are plain characters.
    ".tsv": lambda p: _read_delimited(p, "\t", csv.QUOTE_NONE),
    ".parquet": _read_parquet,
}


# ----------------------------------------------------------------------------------------------
# Splits: which rows train, which evaluate


@dataclass
class _Splits:
    train: object  # ArrowRows, datasets.Dataset or None
    eval: object
    eval_source: str
    eval_key: str = "data.eval"


def _load_splits(spec, seed: int, want_train: bool) -> _Splits:
    _check_eval_options(spec)
    train = None
    if want_train or spec.eval_fraction:
        train = load_rows(spec.train, spec.config, spec.split, key="data.train")
        _check_columns(train, spec, "data.train", spec.train)
    evaluation, source, key = _load_eval(spec)
    train, held_out = _select_train(train, spec, seed)
    if held_out is not None:
        evaluation, source, key = held_out, f"{spec.eval_fraction:g} of data.train held out (seeded shuffle)", "data.train"
    if evaluation is not None and spec.max_eval_examples:
        evaluation = evaluation.select(range(min(spec.max_eval_examples, len(evaluation))))
    return _Splits(train if want_train else None, evaluation, source, key)


def _check_eval_options(spec) -> None:
    if spec.eval_fraction and (spec.eval or spec.eval_split):
        raise UserError("recipe key 'data.eval_fraction': set either eval_fraction or data.eval / data.eval_split, not both")
    if spec.eval_split and not spec.eval and Path(spec.train).suffix.lower() in LOCAL_EXTENSIONS:
        raise UserError(f"recipe key 'data.eval_split': '{spec.train}' is a single file with no named splits; "
                        f"put the evaluation rows in their own file and set data.eval")


def _load_eval(spec):
    """(rows, description, recipe key) of a named eval split or separate eval source, else (None, 'none', ...)."""
    if spec.eval:
        # data.eval names a whole dataset: its split is eval_split, else 'train' (a file's only split).
        split = spec.eval_split or "train"
        config = spec.config if spec.eval == spec.train else None
        rows = load_rows(spec.eval, config, split, key="data.eval")
        _check_columns(rows, spec, "data.eval", spec.eval)
        return rows, f"{spec.eval} (split {split})", "data.eval"
    if spec.eval_split:
        rows = load_rows(spec.train, spec.config, spec.eval_split, key="data.eval_split")
        _check_columns(rows, spec, "data.eval_split", f"{spec.train} split {spec.eval_split}")
        return rows, f"{spec.train} (split {spec.eval_split})", "data.eval_split"
    return None, "none", "data.eval"


def _select_train(train, spec, seed: int):
    """(training rows, held-out rows or None): one seeded shuffle serves both the hold-out and the cap."""
    if train is None or not (spec.eval_fraction or spec.max_train_examples):
        return train, None
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = None
    if spec.eval_fraction:
        k = max(1, round(len(train) * spec.eval_fraction))
        if k >= len(train):
            raise UserError(f"recipe key 'data.eval_fraction': holding out {k} of {len(train)} rows leaves none to train on")
        held_out, order = train.select(order[:k]), order[k:]
    return train.select(order[: spec.max_train_examples or len(order)]), held_out


def _required_columns(spec) -> list[tuple[str, str]]:
    """(recipe key, column) pairs the format reads."""
    needed = {
        "alpaca": ["instruction_column", "output_column"],
        "chat": ["messages_column"],
        "completion": ["text_column"] + (["prompt_column"] if spec.prompt_column else []),
        "classification": ["text_column", "label_column"] + (["text_pair_column"] if spec.text_pair_column else []),
    }[spec.format]
    # Alpaca data often has no input column at all; only a column the user named must exist.
    if spec.format == "alpaca" and "input_column" in spec.model_fields_set:
        needed.append("input_column")
    return [(f"data.{name}", getattr(spec, name)) for name in needed]


def _check_columns(ds, spec, key: str, source: str) -> None:
    available = list(ds.column_names)
    for recipe_key, column in _required_columns(spec):
        if column not in available:
            raise UserError(f"recipe key '{recipe_key}': column '{column}' is not in {key} '{source}'"
                            f"{did_you_mean(column, available)}; available columns: {', '.join(available)}")


def _check_task(spec, task: str) -> None:
    wants = "seq-cls" if spec.format == "classification" else "causal-lm"
    if task != wants:
        hint = "classification" if task == "seq-cls" else f"one of {', '.join(CAUSAL_FORMATS)}"
        raise UserError(f"recipe key 'data.format': '{spec.format}' makes {wants} examples but model.task is "
                        f"'{task}' (use data.format {hint})")


# ----------------------------------------------------------------------------------------------
# Encoding: rows -> tokenized examples


def _encode_split(ds, name: str, key: str, encode, stats: dict) -> Optional[list[dict]]:
    """Encode one split, then truncate and drop, recording the counts under `<name>_*` in stats."""
    for suffix in ("rows", "examples", "truncated", "dropped", "tokens"):
        stats[f"{name}_{suffix}"] = None
    if ds is None:
        return None
    examples, truncated, dropped = encode(ds, key)
    stats.update({f"{name}_rows": len(ds), f"{name}_examples": len(examples), f"{name}_truncated": truncated,
                  f"{name}_dropped": dropped, f"{name}_tokens": sum(len(ex["input_ids"]) for ex in examples)})
    return examples


def _encode_causal(ds, spec, tokenizer):
    """Rows -> (examples, truncated count, dropped count) for the alpaca, chat and completion formats."""
    rows = _segments(ds, spec, tokenizer)
    texts = [text for segments in rows for text, _ in segments]
    flat = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    bos, eos = _bos_prefix(tokenizer), tokenizer.eos_token_id
    examples, truncated, dropped, at = [], 0, 0, 0
    for segments in rows:
        ids, labels = [], []
        for _, trained in segments:
            piece, at = flat[at], at + 1
            ids += piece
            labels += piece if (trained or spec.train_on_inputs) else [IGNORE_INDEX] * len(piece)
        if spec.format != "chat" and eos is not None:
            ids, labels = ids + [eos], labels + [eos]  # the response ends: teach the model to stop
        if bos and ids[: len(bos)] != bos:  # chat templates often write BOS themselves
            ids, labels = bos + ids, [IGNORE_INDEX] * len(bos) + labels
        if len(ids) > spec.max_length:
            truncated += 1
            ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        # Position 0 is never a target (the model shifts labels by one), so it alone does not count.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples, truncated, dropped


def _bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before text by default (usually [BOS] or nothing)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def _segments(ds, spec, tokenizer) -> list[list[tuple[str, bool]]]:
    """Per row, the (text, trained) pieces of the example in order."""
    if spec.format == "alpaca":
        return _alpaca_segments(ds, spec)
    if spec.format == "chat":
        _require_chat_template(tokenizer)
        return [_chat_segments(tokenizer, messages, spec) for messages in _column(ds, spec.messages_column)]
    texts = [_text(t) for t in _column(ds, spec.text_column)]
    if not spec.prompt_column:
        return [[(text, True)] for text in texts]
    return [[(_text(p), False), (text, True)] for p, text in zip(_column(ds, spec.prompt_column), texts)]


def _alpaca_segments(ds, spec) -> list[list[tuple[str, bool]]]:
    instructions = [_text(v) for v in _column(ds, spec.instruction_column)]
    outputs = [_text(v) for v in _column(ds, spec.output_column)]
    has_input = spec.input_column in ds.column_names
    inputs = [_text(v) for v in _column(ds, spec.input_column)] if has_input else [""] * len(ds)
    rows = []
    for instruction, inp, output in zip(instructions, inputs, outputs):
        if inp.strip():
            prompt = ALPACA_PROMPT.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        rows.append([(prompt, False), (output, True)])
    return rows


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model's tokenizer"
        raise UserError(f"recipe key 'data.format': 'chat' needs a tokenizer with a chat template and '{name}' has "
                        f"none (use data.format completion or alpaca, or set model.tokenizer to one with a template)")


def _chat_segments(tokenizer, messages, spec) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt pieces and assistant turns.

    Each assistant turn spans from the end of render(turns before it, add_generation_prompt) to
    the end of render(turns up to and including it): exactly the text the model must write,
    including the template's end-of-turn marker.
    """
    messages = _clean_messages(messages, spec)
    whole = _render(tokenizer, messages, False)
    if spec.train_on_inputs:
        return [(whole, True)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else _render_start(tokenizer, messages)
        reply = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and reply.startswith(prompt) and whole.startswith(reply)):
            raise UserError("recipe key 'data.format': the tokenizer's chat template does not render conversations "
                            "prefix by prefix, so assistant turns cannot be located; set data.train_on_inputs: true")
        segments += [(prompt[len(done):], False), (reply[len(prompt):], True)]
        done = reply
    return segments + [(whole[len(done):], False)]


def _render_start(tokenizer, messages) -> str:
    # A conversation opening with an assistant turn: some templates refuse an empty list.
    try:
        return _render(tokenizer, [], True)
    except UserError:
        return ""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate") for bad conversations
        raise UserError(f"recipe key 'data.messages_column': the chat template rejected a conversation "
                        f"({type(e).__name__}: {str(e)[:200]}): {str(messages)[:120]}") from None


def _clean_messages(messages, spec) -> list[dict]:
    if isinstance(messages, str):  # CSV/TSV cells can only hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            pass
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise UserError(f"recipe key 'data.messages_column': column '{spec.messages_column}' must hold lists of "
                        f"{{role, content}} messages, got {str(messages)[:120]}")
    # Arrow gives every message every key seen in the column, with None where it had none.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _column(ds, name: str) -> list:
    # Through Arrow: iterating a datasets Column formats row by row (seconds for SST-2's 67k rows).
    return ds.with_format("arrow")[name].to_pylist()


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


# ----------------------------------------------------------------------------------------------
# Classification


def _label_key(value) -> str:
    """A label as the string stored in label_names; numbers are normalized so 1, 1.0 and '1' agree."""
    if isinstance(value, bool):
        return str(value)
    text = value.strip() if isinstance(value, str) else str(value)
    number = _as_number(text)
    if number is not None and number.is_integer():
        return str(int(number))
    return text


def _as_number(text: str) -> Optional[float]:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _labels_of(ds, spec, key: str) -> list[str]:
    values = _column(ds, spec.label_column)
    empty = [i for i, v in enumerate(values) if v is None or v == ""]
    if empty:
        # Rows may be shuffled by now, so the row is named by its text rather than its position.
        text = _column(ds, spec.text_column)[empty[0]] if spec.text_column in ds.column_names else None
        example = f" (e.g. the row whose {spec.text_column} is {str(text)[:60]!r})" if text is not None else ""
        raise UserError(f"recipe key 'data.label_column': {len(empty)} row(s) of {key} have no value in column "
                        f"'{spec.label_column}'{example}; every row needs a label")
    return [_label_key(v) for v in values]


def _label_names_from(ds, spec, key: str) -> list[str]:
    """The sorted, deterministic id -> label list: numerically when every label is a number."""
    distinct = set(_labels_of(ds, spec, key))
    if all(_as_number(label) is not None for label in distinct):
        names = sorted(distinct, key=float)
    else:
        names = sorted(distinct)
    if len(names) < 2:
        raise UserError(f"recipe key 'data.label_column': column '{spec.label_column}' has only one distinct "
                        f"value in {key} ({', '.join(names)}); classification needs at least two classes")
    return names


def _encode_classification(ds, spec, tokenizer, label_names: list[str], key: str):
    """Rows -> (examples, truncated count, dropped count); the tokenizer adds its own [CLS]/[SEP]."""
    index = {str(name): i for i, name in enumerate(label_names)}
    labels = []
    for label in _labels_of(ds, spec, key):
        if label not in index:
            raise UserError(f"recipe key 'data.label_column': label '{label}' in {key} is not one of the model's "
                            f"labels ({', '.join(index)}){did_you_mean(label, index)}")
        labels.append(index[label])
    texts = [_text(v) for v in _column(ds, spec.text_column)]
    pairs = [_text(v) for v in _column(ds, spec.text_pair_column)] if spec.text_pair_column else None
    encoded = tokenizer(texts, pairs, verbose=False)["input_ids"]
    # Long rows are re-encoded with the tokenizer's own truncation, which keeps the closing
    # special tokens and trims the longer text of a pair instead of cutting the pair's tail.
    long = [i for i, ids in enumerate(encoded) if len(ids) > spec.max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                        truncation=True, max_length=spec.max_length, verbose=False)["input_ids"]
        for i, ids in zip(long, cut):
            encoded[i] = ids
    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label}
                for ids, label in zip(encoded, labels)]
    return examples, len(long), 0


# ----------------------------------------------------------------------------------------------
# Packing


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
                        f"to each other (its attention does not follow restarting position_ids); set data.packing: false")


# ----------------------------------------------------------------------------------------------
# Cache of tokenized data


def data_cache_root() -> Path:
    from deltafit.model import cache_dir  # the same root as the dequantized-model cache

    return cache_dir() / "data"


def _cache_key(spec, tokenizer, task: str, seed: int, label_names, want_train: bool) -> Optional[str]:
    """Hash of everything that decides the prepared data; None when a source cannot be fingerprinted
    (a missing file: building then reports it properly)."""
    import tokenizers
    import transformers

    sources = _sources(spec, want_train)
    fingerprints = [_source_fingerprint(*source) for source in sources]
    if None in fingerprints:
        return None
    selects = spec.eval_fraction or spec.max_train_examples
    parts = {
        "code": _code_fingerprint(),
        "libraries": [transformers.__version__, tokenizers.__version__],
        # Files are known by their bytes, not their paths: a moved or copied file still hits.
        "sources": [[config, split, key, fingerprint] for (_, config, split, key), fingerprint in zip(sources, fingerprints)],
        "spec": spec.model_dump(mode="json", exclude={"cache", "train", "eval"}),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "task": task, "label_names": label_names, "want_train": want_train,
        "seed": seed if selects else None,  # the seed only picks rows when rows are held out or capped
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _code_fingerprint() -> str:
    """This module's source: any change to how data is prepared invalidates what it cached before."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _sources(spec, want_train: bool) -> list[tuple[str, Optional[str], str, str]]:
    """(source, config, split, recipe key) of every dataset `_load_splits` reads for this spec."""
    sources = []
    if want_train or spec.eval_fraction:
        sources.append((spec.train, spec.config, spec.split, "data.train"))
    if spec.eval:
        config = spec.config if spec.eval == spec.train else None
        sources.append((spec.eval, config, spec.eval_split or "train", "data.eval"))
    elif spec.eval_split:
        sources.append((spec.train, spec.config, spec.eval_split, "data.eval_split"))
    return sources


def _source_fingerprint(source: str, config: Optional[str], split: str, key: str) -> Optional[str]:
    """Content hash of a local file or folder or builtin dataset; a hub dataset's own fingerprint."""
    if source.startswith(BUILTIN_PREFIX):
        rows = load_builtin(source[len(BUILTIN_PREFIX):])
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    path = Path(source).expanduser()
    if path.is_file():
        return _file_digest(path, hashlib.sha256()).hexdigest()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(f for f in path.rglob("*") if f.is_file() and not _hidden(f, path)):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            _file_digest(file, digest)
        return digest.hexdigest()
    if _looks_local(source, path):
        return None
    # Hub datasets: the datasets library fingerprints the prepared files of the revision it loaded.
    return f"hub:{source}:{load_rows(source, config, split, key)._fingerprint}"


def _file_digest(path: Path, digest):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)  # .git, .cache, ...


def _tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's full serialized state (vocab, merges, added tokens, normalizer, templates),
    its chat template, special tokens, and how it encodes a probe (catches e.g. add_bos_token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    probe = "Hello world!\n  2 + 2 = 4"
    parts = [type(tokenizer).__name__, state, getattr(tokenizer, "chat_template", None), str(tokenizer.special_tokens_map),
             tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer(probe)["input_ids"],
             tokenizer(probe, add_special_tokens=False)["input_ids"]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


SPLITS = ("train", "eval")


def _read_cache(key: str) -> Optional[Prepared]:
    """The cached result, or None when absent or unreadable (it is then rebuilt and replaced)."""
    import pyarrow

    directory = data_cache_root() / key
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        splits = {name: _read_table(directory / f"{name}.arrow") if meta["has"][name] else None for name in SPLITS}
    except (OSError, ValueError, KeyError, pyarrow.lib.ArrowException):
        return None
    return Prepared(splits["train"], splits["eval"], meta["label_names"], meta["stats"])


def _read_table(path: Path) -> list[dict]:
    import pyarrow

    with pyarrow.memory_map(str(path)) as source:
        return pyarrow.ipc.open_file(source).read_all().to_pylist()


def _write_cache(key: str, prepared: Prepared) -> None:
    """Arrow IPC files + JSON in a temporary folder, renamed into place: never a half-written entry."""
    import pyarrow

    directory = data_cache_root() / key
    tmp = directory.with_name(f"{key}.tmp{os.getpid()}-{time.time_ns()}")
    try:
        tmp.mkdir(parents=True)
        for name in SPLITS:
            rows = getattr(prepared, name)
            if rows is not None:
                table = pyarrow.Table.from_pylist(rows)
                with pyarrow.OSFile(str(tmp / f"{name}.arrow"), "wb") as sink:
                    with pyarrow.ipc.new_file(sink, table.schema) as writer:
                        writer.write_table(table)
        meta = {"has": {name: getattr(prepared, name) is not None for name in SPLITS},
                "label_names": prepared.label_names, "stats": prepared.stats}
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        shutil.rmtree(directory, ignore_errors=True)  # an unreadable entry being replaced
        tmp.rename(directory)
    except OSError:
        pass  # another process wrote the same entry first, or the cache is not writable: it is optional
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
