"""deltafit.data is a package: every public name the former deltafit/data.py defined is importable from
`deltafit.data`, and importing it stays cheap (no torch, datasets, pyarrow or transformers)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

# Every name without a leading underscore that deltafit/data.py defined before the split.
PUBLIC = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "ArrowRows", "BUILTIN_PREFIX", "CAUSAL_FORMATS", "Collator",
    "IGNORE_INDEX", "LOCAL_EXTENSIONS", "PACKING_MIN_SAVING", "Prepared", "SPLITS", "batch_tokens",
    "data_cache_root", "describe_data", "example_lengths", "load_rows", "make_collator", "pack_examples",
    "padding_stats", "prepare_data", "resolve_packing", "use_packed_attention",
]
HEAVY = ("torch", "datasets", "pyarrow", "transformers")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_importable_from_the_package(name):
    namespace: dict = {}
    exec(f"from deltafit.data import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module("deltafit.data"), name)


def test_star_import_gives_exactly_the_public_names():
    import deltafit.data

    assert sorted(deltafit.data.__all__) == sorted(PUBLIC)


def test_the_values_are_unchanged():
    from deltafit import data

    assert data.IGNORE_INDEX == -100 and data.SPLITS == ("train", "eval") and data.PACKING_MIN_SAVING == 0.1
    assert data.LOCAL_EXTENSIONS == (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
    assert data.CAUSAL_FORMATS == ("alpaca", "chat", "completion") and data.BUILTIN_PREFIX == "builtin:"
    assert data.ALPACA_PROMPT.startswith("Below is an instruction") and "{input}" in data.ALPACA_PROMPT
    assert "{input}" not in data.ALPACA_PROMPT_NO_INPUT


def test_importing_the_package_imports_nothing_heavy():
    code = f"import sys, deltafit.data; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
