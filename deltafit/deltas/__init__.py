"""The registry: the one list of delta methods.

Adding a method = one new file in this folder + one line in METHODS (name -> module). Modules are
imported on first use, so listing names stays cheap.
"""

from __future__ import annotations

import importlib

from deltafit.errors import UserError, did_you_mean

# name -> module in deltafit.deltas defining `DELTA`, the method's Delta subclass.
METHODS = {
    "full": "full",
    "lora": "lora",
    "bitfit": "bitfit",
    "adapter": "adapter",
    "prefix": "prefix",
    "prompt": "prompt",
    "lamda": "lamda",
    "lamda-pp": "lamda_pp",
    "vera": "vera",
    "lora-fa": "lora_fa",
    "said": "said",
    "adalora": "adalora",
    "aflora": "aflora",
    "qlora": "qlora",
}


def get(name: str):
    """The Delta class registered under `name`; an unknown name is a user error."""
    if name not in METHODS:
        raise UserError(f"recipe key 'delta.method': unknown method '{name}'{did_you_mean(name, METHODS)}; "
                        f"valid: {', '.join(METHODS)}")
    return importlib.import_module(f"deltafit.deltas.{METHODS[name]}").DELTA


def config_class(name: str):
    return get(name).Config


def build(config):
    """An un-attached Delta instance for a validated method config."""
    return get(config.method)(config)


def all_methods() -> dict:
    return {name: get(name) for name in METHODS}
