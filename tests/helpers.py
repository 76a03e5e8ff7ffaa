"""Test helpers: write recipes and run the CLI in-process, capturing exit code and output."""

from __future__ import annotations

from pathlib import Path

import yaml

from deltafit.cli import main


def write_recipe(path: Path, model: Path, data: dict, delta: dict | None = None, train: dict | None = None,
                 task: str = "causal-lm", **top) -> Path:
    recipe = {
        "model": {"name": str(model), "task": task},
        "data": data,
        "delta": delta or {"method": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, **(train or {})},
        "log": {"progress": False},
        **top,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `deltafit argv...` run in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    out = capsys.readouterr()
    return code, out.out, out.err
