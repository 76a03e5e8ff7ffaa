"""Where the benchmark scripts find their data, and the one line that says so.

Local files under `../shared/data` (beside the project: a checkout prepared for offline runs) when
they are there, else the hub dataset the recipes name, as a user with a network would train on:

    name     local (under the data directory)              hub
    alpaca   alpaca_small/alpaca_small.json                 tatsu-lab/alpaca, first 2,000 rows
    sst2     glue_sst2/train.tsv + glue_sst2/dev.tsv        nyu-mll/glue sst2, train + validation
    rte      glue_rte/train.tsv + glue_rte/dev.tsv          nyu-mll/glue rte, train + validation

`--data DIR` (see `add_data_option`) points at another directory of the same layout; `--data hub`
uses the hub even when local files exist. A `Source` gives the recipe's data keys, the same as
`--set` overrides, or the rows themselves, and `line` ("data: ... (local)" / "data: hub ...") for
the script to print.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HUB = "hub"

# Every source sets all five of the recipe's source keys, so it replaces whatever the recipe had.
_NO_EVAL = {"eval": None, "eval_split": None}
LOCAL = {
    "alpaca": {"train": "alpaca_small/alpaca_small.json", "config": None, "split": "train", **_NO_EVAL},
    "sst2": {"train": "glue_sst2/train.tsv", "config": None, "split": "train", "eval": "glue_sst2/dev.tsv",
             "eval_split": None},
    "rte": {"train": "glue_rte/train.tsv", "config": None, "split": "train", "eval": "glue_rte/dev.tsv",
            "eval_split": None},
}
HUB_SOURCES = {
    # The local file's size: tokenizing all 52k rows would take longer than a short benchmark run.
    "alpaca": {"train": "tatsu-lab/alpaca", "config": None, "split": "train", **_NO_EVAL, "max_train_examples": 2000},
    "sst2": {"train": "nyu-mll/glue", "config": "sst2", "split": "train", "eval": None, "eval_split": "validation"},
    "rte": {"train": "nyu-mll/glue", "config": "rte", "split": "train", "eval": None, "eval_split": "validation"},
}
EVAL_FILES = ("train", "eval")  # the keys that name local files


@dataclass(frozen=True)
class Source:
    keys: dict  # the recipe's `data` keys naming the rows (train, config, split, eval, eval_split, ...)
    origin: str  # "local", "hub", or the command-line option that named the file

    @property
    def line(self) -> str:
        """What to print: `data: <file> (local)` or `data: hub <dataset> (<splits>)`."""
        k = self.keys
        if self.origin == HUB:
            splits = " + ".join(s for s in (k["split"], k["eval_split"]) if s)
            cap = f", first {k['max_train_examples']} rows" if k.get("max_train_examples") else ""
            return f"data: hub {k['train']}{' ' + k['config'] if k['config'] else ''} ({splits}{cap})"
        return f"data: {' + '.join(_shown(Path(k[key])) for key in EVAL_FILES if k[key])} ({self.origin})"

    def train_only(self) -> Source:
        """The same rows without an evaluation source (for runs that only train)."""
        return replace(self, keys={**self.keys, "eval": None, "eval_split": None})

    def sets(self) -> list[str]:
        """The keys as `--set data.key=value` items (values are YAML: None is null)."""
        return [f"data.{k}={'null' if v is None else v}" for k, v in self.keys.items()]

    def records(self, limit: int) -> list[dict]:
        """The first `limit` training rows as dicts, read the way deltafit reads them."""
        from deltafit.data import load_rows

        rows = load_rows(self.keys["train"], self.keys["config"], self.keys["split"])
        rows = rows.select(range(min(limit, len(rows), self.keys.get("max_train_examples") or limit)))
        columns = {name: list(rows[name]) for name in rows.column_names}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"directory of local data files (default: {_shown(SHARED_DATA)} when present, else the "
                             f"hub datasets); '{HUB}': the hub datasets even when local files exist")


def find(name: str, data: Optional[str] = None) -> Source:
    """The source of dataset `name` ('alpaca', 'sst2'): `data` is --data's value (None, a directory or 'hub')."""
    if data != HUB:
        directory = Path(data) if data else SHARED_DATA
        keys = {k: str(directory / v) if k in EVAL_FILES and v else v for k, v in LOCAL[name].items()}
        missing = [keys[k] for k in EVAL_FILES if keys[k] and not Path(keys[k]).is_file()]
        if not missing:
            return Source(keys, "local")
        if data:  # a directory asked for by name: a missing file is an error, not a silent download
            raise SystemExit(f"--data {data}: {', '.join(missing)} not found")
    return Source(dict(HUB_SOURCES[name]), HUB)


def given_file(path: str, option: str) -> Source:
    """A training file named on the command line (e.g. --llm-data), used as it is."""
    return Source({"train": path, "config": None, "split": "train", **_NO_EVAL}, option)


def _shown(path: Path) -> str:
    """A path beside the project relative to its root (../shared/data/...), any other as given."""
    if ROOT.parent in Path(os.path.abspath(path)).parents:
        return os.path.relpath(path, ROOT)
    return str(path)
