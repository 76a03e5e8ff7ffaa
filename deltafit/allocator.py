"""Where training's memory comes from: tcmalloc when the machine has it, a tuned glibc malloc otherwise.

A CPU training step allocates and frees the same activation-sized tensors again and again (about
8 GB of them per step for SmolLM2-135M at 8 x 256 tokens). glibc's malloc serves them one of two
ways, both bad here (measured with `scripts/bench.py` workers, q/v LoRA, same batches):
- from its heap (the default): holes left by freed tensors fragment it, and it keeps them: peak
  RSS 4.5 GB where 2.8 GB is live; 4.1 s/step;
- each from its own mmap (a low M_MMAP_THRESHOLD, `tune_glibc`): compact, 2.8 GB, but every
  tensor is fresh memory, one page fault per 4 KiB: 14 M faults, 6.6 s/step.
gperftools' tcmalloc keeps freed blocks in size classes and hands them back whole: 2.98 GB and
3.9 s/step, the best of both. An allocator can only be swapped before the process starts, so
`deltafit train` re-executes itself once with the library in LD_PRELOAD (what PyTorch's own
`torch.backends.xeon.run_cpu` launcher does). `make install` unpacks Debian's tcmalloc package
into the virtualenv when apt is there; a system-wide libtcmalloc_minimal.so.4 is found too.

DELTAFIT_ALLOCATOR: `auto` (default: tcmalloc if found), `system` (no preload; glibc tuned), or
the path of a malloc library to preload.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

ENV = "DELTAFIT_ALLOCATOR"
TRIED = "DELTAFIT_ALLOCATOR_TRIED"  # set before re-executing: a second start never re-executes again
LIBRARY = "libtcmalloc_minimal.so.4"
DEBIAN_PACKAGE = "libtcmalloc-minimal4"
PRELOADED_NAMES = ("libtcmalloc", "libjemalloc", "libmimalloc")  # a user's own LD_PRELOAD is respected
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 2**10


def find_library(environ: Optional[dict] = None) -> Optional[str]:
    """The malloc library `deltafit train` would preload, or None."""
    choice = (os.environ if environ is None else environ).get(ENV, "auto")
    if choice == "system":
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            from deltafit.errors import UserError

            raise UserError(f"{ENV}='{choice}' is not a file; use auto (tcmalloc when found), system (the C "
                            f"library's malloc) or the path of a malloc library such as {LIBRARY}")
        return choice
    local = Path(sys.prefix) / "lib" / LIBRARY  # where `make install` unpacks it
    if local.is_file():
        return str(local)
    import ctypes.util

    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def loaded() -> Optional[str]:
    """The replacement malloc mapped into this process (by path), or None for the C library's own."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if any(Path(path).name.startswith(name) for name in PRELOADED_NAMES):
            return path
    return None


def launch_env(environ: Optional[dict] = None) -> Optional[dict]:
    """The environment to start training in with the allocator preloaded, or None to start as is."""
    environ = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux") or environ.get(TRIED) or loaded():
        return None
    if any(name in environ.get("LD_PRELOAD", "") for name in PRELOADED_NAMES):
        return None
    library = find_library(environ)
    if library is None:
        return None
    environ["LD_PRELOAD"] = ":".join(filter(None, (library, environ.get("LD_PRELOAD"))))
    environ[TRIED] = "1"
    # gperftools prints a line for every allocation over 1 GB (a large model's embedding can be one).
    environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    return environ


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m deltafit ARGV` with the allocator preloaded, when there is one."""
    env = launch_env()
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", "deltafit", *argv], env)
    except OSError:
        pass  # training still works with the C library's malloc: tune_glibc takes over


def tune_glibc() -> bool:
    """Under glibc's malloc, give every allocation of 256 KiB or more its own mmap, returned to the OS when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    activation-sized tensors come from the heap, whose freed holes are kept by the process and grow
    step after step. A fixed threshold stops the ratchet (peak RSS 4.5 -> 2.8 GB on SmolLM2 q/v) at
    the price of a page fault per 4 KiB of every large tensor (about 1.6x the step time there, and
    on MiniLM SST-2). Memory wins in this fallback: a machine without tcmalloc is more often short
    of memory than of patience. It changes where memory comes from, never a computed value. No-op
    under another allocator, and off glibc (macOS, musl, Windows). Done once per process.
    """
    global _glibc_tuned
    if _glibc_tuned is None:
        _glibc_tuned = sys.platform.startswith("linux") and not loaded() and _set_mmap_threshold()
    return _glibc_tuned


_glibc_tuned: Optional[bool] = None


def _set_mmap_threshold() -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def describe() -> str:
    """Which malloc this process runs on, in a few words (for logs and benchmark tables)."""
    path = loaded()
    if path:
        return Path(path).name.split(".so")[0].removeprefix("lib")
    return "glibc, mmap >= 256 KiB" if _glibc_tuned else "system malloc"


def fetch_into(directory: Path) -> str:
    """Unpack Debian's tcmalloc package into `directory` (no root needed). Returns what happened, in words."""
    import shutil
    import subprocess
    import tempfile

    if (directory / LIBRARY).is_file():
        return f"{directory / LIBRARY} is already there"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return f"no apt-get here: {LIBRARY} not fetched (install gperftools' tcmalloc to train faster)"
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            return f"apt-get download {DEBIAN_PACKAGE} failed: {(got.stderr or got.stdout).strip()[-200:]}"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        found = sorted((Path(tmp) / "x").rglob(LIBRARY + "*"))
        real = next((p for p in found if not p.is_symlink()), None)
        if real is None:
            return f"{DEBIAN_PACKAGE} holds no {LIBRARY}"
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, directory / LIBRARY)
    return f"{LIBRARY} unpacked into {directory}"


if __name__ == "__main__":  # `python -m deltafit.allocator`: what make install runs
    print("allocator:", fetch_into(Path(sys.prefix) / "lib"))
