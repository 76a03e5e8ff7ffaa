"""Without a network, a hub model or dataset fails at once with one clear line (or loads from the
local hub cache), instead of huggingface_hub's five retries with backoff per file (about a minute).

The network's absence is simulated (the hub's host name does not resolve), so these tests behave
the same on a machine that has one."""

from __future__ import annotations

import socket

import pytest

from deltafit import hub
from tests.helpers import assert_one_clean_line, run_cli, write_recipe


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    def unresolvable(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    hub._resolves.cache_clear()
    # Whatever the tests switch is put back: the module globals and the variable for child processes.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))
    yield
    hub._resolves.cache_clear()


def test_an_unresolvable_hub_switches_the_hub_libraries_offline(no_network):
    import os

    import datasets.config
    import huggingface_hub.constants

    assert hub.offline_if_unreachable()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_resolvable_hub_changes_nothing(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_resolves", lambda host: True)
    assert not hub.offline_if_unreachable()
    assert not huggingface_hub.constants.HF_HUB_OFFLINE


def test_a_hub_model_offline_is_one_line_naming_model_name(no_network, tmp_path, alpaca_file, capsys):
    """The key is model.name (the recipe sets no model.tokenizer), and no retry line is printed."""
    data = {"train": str(alpaca_file), "format": "alpaca"}
    recipe = write_recipe(tmp_path / "r.yaml", "SomeOrg/not-cached-model", data)
    code, out, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    line = assert_one_clean_line(code, err, "recipe key 'model.name'", "SomeOrg/not-cached-model")
    assert "model.tokenizer" not in line and "Retry" not in err


def test_a_hub_dataset_offline_is_one_line_naming_data_train(no_network, tmp_path, tiny_llama, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": "SomeOrg/not-cached-data", "format": "alpaca"})
    code, out, err = run_cli(capsys, "validate", recipe)
    assert_one_clean_line(code, err, "recipe key 'data.train'", "SomeOrg/not-cached-data", "OfflineModeIsEnabled")
    assert "Retry" not in err
