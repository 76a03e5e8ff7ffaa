"""The registry: the one list of delta methods.

Adding a method = one new file in this folder + one line in METHODS (name -> module and facts). Modules are
imported on first use, so listing names stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from deltafit.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Entry:
    """One method's registry line: where its class lives, and the facts the CLI shows without
    importing it (the class reads them from here too: `Delta.__init_subclass__`)."""

    module: str  # module in deltafit.deltas defining `DELTA`, the method's Delta subclass
    mergeable: bool = False  # the update folds into the base weights (`deltafit merge`)
    peft_type: Optional[str] = None  # the PEFT adapter type it exports to and imports from, if any


METHODS = {
    "full": Entry("full", mergeable=True),
    "lora": Entry("lora", mergeable=True, peft_type="LORA"),
    "bitfit": Entry("bitfit", mergeable=True),
    "adapter": Entry("adapter"),
    "adapter-fusion": Entry("adapter_fusion"),
    "parallel-adapter": Entry("parallel_adapter"),
    "mam": Entry("mam"),
    "unipelt": Entry("unipelt"),
    "prefix": Entry("prefix", peft_type="PREFIX_TUNING"),
    "prompt": Entry("prompt", peft_type="PROMPT_TUNING"),
    "ptuning": Entry("ptuning", peft_type="P_TUNING"),
    "ptuning-v2": Entry("ptuning_v2", peft_type="PREFIX_TUNING"),
    "lamda": Entry("lamda", mergeable=True),
    "lamda-pp": Entry("lamda_pp", mergeable=True),
    "vera": Entry("vera", mergeable=True, peft_type="VERA"),
    "lora-fa": Entry("lora_fa", mergeable=True, peft_type="LORA"),
    "said": Entry("said", mergeable=True),
    "adalora": Entry("adalora", mergeable=True, peft_type="ADALORA"),
    "aflora": Entry("aflora", mergeable=True),
    "qlora": Entry("qlora", mergeable=True, peft_type="LORA"),
    "diff-pruning": Entry("diff_pruning", mergeable=True),
    "masking": Entry("masking", mergeable=True),
    "dora": Entry("dora", mergeable=True, peft_type="LORA"),
    "layernorm": Entry("layernorm", mergeable=True, peft_type="LN_TUNING"),
    "ia3": Entry("ia3", mergeable=True, peft_type="IA3"),
    "partial": Entry("partial", mergeable=True),
    "lisa": Entry("lisa", mergeable=True),
}


# `delta:` as a list: several methods on one base (compose.py). Not a method of its own, so not in
# METHODS (the registry-generated tests and tables list methods); checkpoints record it as 'compose'.
COMPOSE = "compose"


def get(name: str):
    """The Delta class registered under `name`; an unknown name is a user error."""
    if name == COMPOSE:
        return importlib.import_module("deltafit.deltas.compose").DELTA
    if name not in METHODS:
        raise UserError(f"recipe key 'delta.method': unknown method '{name}'{did_you_mean(name, METHODS)}; "
                        f"valid: {', '.join(METHODS)}")
    return importlib.import_module(f"deltafit.deltas.{METHODS[name].module}").DELTA


def config_class(name: str):
    return get(name).Config


def build(config):
    """An un-attached Delta instance for a validated method config."""
    return get(config.method)(config)


def all_methods() -> dict:
    return {name: get(name) for name in METHODS}
