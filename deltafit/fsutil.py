"""Writing files so that nothing half-done is ever seen and nothing a user has is lost.

Three helpers every writer in deltafit shares:
- `atomic_dir(target)`: build a directory under a temporary sibling name, rename it into place
  when the block ends without error. A killed process leaves only a hidden `.<name>.tmp...`
  directory, never a `target` that looks complete. The temporary name carries the process id and
  a timestamp, so two processes writing the same target never share one.
- `sha256_file(path)`: a file's content hash, read in blocks (checkpoint manifests, data cache keys).
- `new_output_dir(path)`: the checks for "write a new directory here" (merge, export), done before
  any work so a mistake costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from deltafit.errors import UserError

TMP_MARK = ".tmp"  # temporary directories are named .<target name>.tmp<pid>-<ns>
# A directory holding one of these is a checkpoint (deltafit's, or a PEFT adapter): never written into.
CHECKPOINT_MARKERS = ("deltafit.json", "adapter_config.json")


@contextmanager
def atomic_dir(target: Path, replace: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`.

    An existing `target` is replaced only with `replace=True` (moved aside first, removed after the
    swap); an empty one is always taken over; any other raises FileExistsError (an OSError, which
    best-effort caches treat as "another process got there first"). `durable` fsyncs every file
    before the rename, for data that must survive a power cut (checkpoints).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        _move_into_place(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def _move_into_place(tmp: Path, target: Path, replace: bool) -> None:
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        tmp.rename(target)
        return
    if not replace:
        raise FileExistsError(f"'{target}' already exists")
    old = target.with_name(f".{target.name}.old{os.getpid()}-{time.time_ns()}")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def sha256_file(path: Path, digest=None):
    """The SHA-256 hex digest of a file; with `digest`, feed the file into it and return it instead."""
    own = digest is None
    digest = hashlib.sha256() if own else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() if own else digest


def new_output_dir(out: Path, source: Optional[Path] = None, option: str = "--output") -> Path:
    """Check that `out` can become a new directory: not inside `source` (the checkpoint being read),
    not an existing file or non-empty directory, and on a writable file system. Raises UserError."""
    out = Path(out)
    if str(out).strip() in ("", "."):
        raise UserError(f"{option} '{out}': give the path of a new directory")
    resolved = out.resolve()
    if source is not None and (resolved == Path(source).resolve() or Path(source).resolve() in resolved.parents):
        raise UserError(f"{option} '{out}' must not be inside the checkpoint '{source}' (choose a new directory)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} '{out}' is an existing file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{option} '{out}' exists and is not empty; choose a new directory")
    check_outside_checkpoints(out, option)
    check_writable_dir(out, option)
    return out


def check_writable_dir(out: Path, option: str = "--output") -> None:
    """`out` (or the nearest folder above it that exists) accepts new files. Probed by creating one,
    since permission bits do not tell for root or for read-only file systems."""
    existing = Path(out).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} '{out}': '{existing}' is a file, so no directory can be made there")
    try:
        probe = existing / f".deltafit-write-test-{os.getpid()}-{time.time_ns()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"{option} '{out}' is not writable ({e.strerror or e}); choose another directory") from None


def check_outside_checkpoints(out: Path, option: str = "--output") -> None:
    """Refuse an output inside a checkpoint directory (or a PEFT adapter's): adding or replacing a
    file there could damage it, and no command writes into a checkpoint."""
    for folder in (Path(out).resolve(), *Path(out).resolve().parents):
        marker = next((m for m in CHECKPOINT_MARKERS if (folder / m).is_file()), None)
        if marker is not None:
            raise UserError(f"{option} '{out}' is inside the checkpoint '{folder}' (it holds {marker}); commands never "
                            f"write into a checkpoint: choose a path outside it")


def beside_checkpoint(directory: Path, output: Optional[str], what: str, suffix: str, base: bool,
                      kind: str = "JSON", inputs: tuple = ()) -> Path:
    """Where a command's results go: --output, else beside the checkpoint
    (`<checkpoint>-<what>[-base]<suffix>`), never inside it, and never over one of the command's
    `inputs` (its data files). Checked before any work."""
    out = Path(output) if output else directory.with_name(f"{directory.name}-{what}{'-base' if base else ''}{suffix}")
    if out.is_dir() or str(output).strip() in ("", "."):
        raise UserError(f"--output '{output}' is a directory; give the path of a {kind} file to write")
    for source in inputs:
        if isinstance(source, str) and source and out.exists() and Path(source).expanduser().exists() \
                and out.resolve() == Path(source).expanduser().resolve():
            raise UserError(f"--output '{output}' is the data file this command reads; writing the results there "
                            f"would replace it: choose another path")
    check_outside_checkpoints(out)
    check_writable_dir(out.parent)
    return out
