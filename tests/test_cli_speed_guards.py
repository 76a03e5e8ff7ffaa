"""Guards for the CLI's speed work (issue 5): behaviour checks, never timings.

- importing the CLI, and asking any command for --help, loads no torch/transformers/datasets/accelerate;
- a GGUF file's header (its whole vocabulary) is parsed once, then its config comes from the cache;
- the cheaper merged-vs-unmerged check still refuses to save a wrong merge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli, write_recipe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "accelerate")

# Prints, as JSON, the heavy top-level packages in sys.modules after the code before it ran.
_REPORT_HEAVY = (
    "import json, sys\n"
    f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
)


def _heavy_modules_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter (this one has torch loaded already) and list what it imported."""
    done = subprocess.run([sys.executable, "-c", code + "\n" + _REPORT_HEAVY], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_package():
    assert _heavy_modules_after("import deltafit.cli") == []


def test_help_of_every_command_loads_no_heavy_package():
    code = (
        "import contextlib, io\n"
        "import typer\n"
        "from deltafit.cli import app, main\n"
        "names = sorted(typer.main.get_command(app).commands)\n"
        "assert len(names) >= 5, names\n"
        "for argv in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (argv, e.code)\n"
        "    assert 'Usage' in out.getvalue(), argv\n"
    )
    assert _heavy_modules_after(code) == []


def test_commands_that_do_not_quantize_never_import_torchao(tmp_path, tiny_llama, alpaca_file):
    """torchao (QLoRA's NF4) costs ~0.7 s and logs CUDA-kernel warnings when transformers imports it:
    a fresh deltafit process keeps it unloaded unless the method is QLoRA, which still gets it."""
    loaded = {}
    for method in ("lora", "qlora"):
        recipe = write_recipe(tmp_path / f"{method}.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                              delta={"method": method, "r": 4, "alpha": 8})
        argv = ["train", str(recipe), "--output", str(tmp_path / method), "--set", "train.max_steps=1"]
        code = (f"import sys\nfrom deltafit.cli import main\nmain({argv!r})\n"
                "print(sys.modules.get('torchao') is not None)")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Failed to load" not in done.stderr and "Traceback" not in done.stderr
        loaded[method] = done.stdout.strip().splitlines()[-1] == "True"
    assert loaded == {"lora": False, "qlora": True}


# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_gguf(tmp_path) -> Path:
    """A 2-block Llama GGUF file with one tensor: enough for transformers to read its config."""
    import gguf

    path = tmp_path / "model" / "tiny.gguf"
    path.parent.mkdir()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(100)
    writer.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_is_parsed_once_then_its_config_comes_from_the_cache(tiny_gguf, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoConfig

    from deltafit.model import load_config
    from deltafit.recipe import ModelSpec

    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name=str(tiny_gguf))
    reference = AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).to_dict()
    first = load_config(spec)
    assert list((tmp_path / "cache" / "gguf-config").glob("*/config.json")), "the parsed config was not cached"

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF header was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    second = load_config(spec)
    for config in (first, second):
        assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_key_value_heads,
                config.vocab_size, config.tie_word_embeddings) == ("llama", 2, 32, 2, 100, True)
    keep = ("_name_or_path", "transformers_version", "architectures", "dtype")  # bookkeeping, not shape
    assert {k: v for k, v in second.to_dict().items() if k not in keep} == \
        {k: v for k, v in reference.items() if k not in keep}


def test_gguf_config_is_parsed_again_when_the_file_changes(tiny_gguf, tmp_path, monkeypatch):
    import os

    from deltafit.model import load_config
    from deltafit.recipe import ModelSpec

    monkeypatch.setenv("DELTAFIT_CACHE", str(tmp_path / "cache"))
    load_config(ModelSpec(name=str(tiny_gguf)))
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced file, same name
    load_config(ModelSpec(name=str(tiny_gguf)))
    assert len(list((tmp_path / "cache" / "gguf-config").glob("*/config.json"))) == 2


# ----------------------------------------------------------------------------------------------


def test_merge_check_still_refuses_a_wrong_fold(tmp_path, tiny_llama, alpaca_file, capsys, monkeypatch):
    from deltafit.deltas.lora import LoRA
    from deltafit.merge import merge_checkpoint

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, {"train": str(alpaca_file), "format": "alpaca"},
                          delta={"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
                          train={"max_steps": 4})
    code, _, err = run_cli(capsys, "train", recipe, "--output", tmp_path / "run")
    assert code == 0, err

    result = merge_checkpoint(str(tmp_path / "run"), str(tmp_path / "good"))
    assert result["max_abs_logit_diff"] <= 1e-5 and (tmp_path / "good" / "config.json").is_file()

    monkeypatch.setattr(LoRA, "_merge", lambda self: None)  # a merge that forgets to fold the update
    with pytest.raises(RuntimeError, match="differ from unmerged"):
        merge_checkpoint(str(tmp_path / "run"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
