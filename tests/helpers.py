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


def assert_one_clean_line(code: int, err: str, *needles: str, out: str = "") -> str:
    """A user error as the CLI promises it: exit 2, one stderr line `error: ...` naming each needle,
    no traceback on either stream. Returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `root`: compare before and after a command."""
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def report_line(request, line: str) -> None:
    """Print a summary line (a corpus or fuzz tally) in pytest's output, past its capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)
