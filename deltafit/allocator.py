"""Where training's memory comes from: tcmalloc when the machine has it, the C library's malloc otherwise.

A CPU training step allocates and frees the same activation-sized tensors again and again (about
8 GB of them per step for SmolLM2-135M at 8 x 256 tokens). Measured with `scripts/bench.py` workers
(q/v LoRA, same batches, fp32; the reference is Trainer + PEFT on glibc's malloc at 5.6 GB):
- glibc's malloc as it comes: freed tensors leave holes in its heap that it keeps, so peak RSS is
  4.4 GB where 2.8 GB is live (0.8-0.9x the reference's), at 1.1-1.2x the reference's tokens/s. On
  MiniLM SST-2 (batch 32 x 64) it is at the reference's speed and memory (1.24 GB each; tcmalloc:
  0.90 GB). Fixed mmap thresholds of 1-16 MiB, one arena, oneTBB's malloc and a malloc_trim per step
  each cost 10-45% of the speed for less memory; a high trim threshold with a 32 MiB mmap threshold
  changed neither figure beyond the noise (measured);
- glibc with a low mmap threshold (each large tensor its own mmap, which deltafit used to set):
  compact, 2.8 GB, but every tensor is fresh memory, a page fault per 4 KiB: 0.75x the reference's
  speed. Slower than the reference is worse than fatter than deltafit could be, so it is gone;
  transparent huge pages for glibc's chunks (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) did not
  change either figure beyond the noise.
- glibc with PyTorch's own huge-page switch (`THP_MEM_ALLOC_ENABLE=1`: every tensor of 2 MiB or
  more is aligned to 2 MiB and advised MADV_HUGEPAGE): the large tensors then sit in whole huge pages
  of the heap, which freed and reused tensors of other sizes fragment less. MiniLM 1.09-1.13 GB
  instead of 1.23-1.26 at the same speed (7 interleaved runs each); SmolLM2 3.8 GB instead of 4.5,
  at 1.11x the reference's tokens/s and 0.73x its memory (`scripts/bench.py`'s
  `deltafit-system-malloc` runs, README). This is what `deltafit train` sets on the C library's
  malloc, on Linux where transparent huge pages are not `never`: an environment variable PyTorch
  reads when it first allocates, so it is set in-process before torch is imported, no restart.
  With it, a 2 MiB mmap threshold as well was compact (3.1 GB) but 1.36x slower per step on SmolLM2:
  each large tensor fresh memory again.
gperftools' tcmalloc keeps freed blocks in size classes and hands them back whole: 2.97 GB at the
speed of glibc's heap, the best of both. An allocator can only be swapped before the process starts,
so `deltafit train` re-executes itself once with the library in LD_PRELOAD (what PyTorch's own
`torch.backends.xeon.run_cpu` launcher does). `make install` unpacks Debian's tcmalloc package
into the virtualenv when apt is there; a system-wide libtcmalloc_minimal.so.4 is found too.

DELTAFIT_ALLOCATOR: `auto` (default: tcmalloc if found, else as `system`), `system` (no preload: the C
library's malloc, with huge pages for large tensors where Linux offers them), `plain` (the C
library's malloc as it comes, no huge pages either), or the path of a malloc library to preload.
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
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # PyTorch's CPU allocator: tensors >= 2 MiB on transparent huge pages
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def find_library(environ: Optional[dict] = None) -> Optional[str]:
    """The malloc library `deltafit train` would preload, or None."""
    choice = (os.environ if environ is None else environ).get(ENV, "auto")
    if choice in ("system", "plain"):
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            from deltafit.errors import UserError

            raise UserError(f"{ENV}='{choice}' is not a file; use auto (tcmalloc when found), system (the C "
                            f"library's malloc, large tensors on huge pages), plain (the C library's malloc "
                            f"as it comes) or the path of a malloc library such as {LIBRARY}")
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
    if _malloc_preloaded(environ):
        return None
    library = find_library(environ)
    if library is None:
        return None
    environ["LD_PRELOAD"] = ":".join(filter(None, (library, environ.get("LD_PRELOAD"))))
    environ[TRIED] = "1"
    # gperftools prints a line for every allocation over 1 GB (a large model's embedding can be one).
    environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    return environ


def _malloc_preloaded(environ: dict) -> bool:
    """The environment's LD_PRELOAD already names a replacement malloc (ours, or the user's own)."""
    return any(name in environ.get("LD_PRELOAD", "") for name in PRELOADED_NAMES)


def reexec_with_allocator(argv: list[str]) -> None:
    """Replace this process by `python -m deltafit ARGV` with the allocator preloaded, when there is one."""
    env = launch_env()
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, "-m", "deltafit", *argv], env)
    except OSError:
        pass  # training still works with the C library's malloc


def huge_pages_env(environ: Optional[dict] = None) -> Optional[dict]:
    """The environment to train in on the C library's malloc with large tensors on huge pages, or None
    where that does not apply: another malloc preloaded, `plain` chosen, the user's own setting, or no
    transparent huge pages (off, or not Linux)."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(ENV, "auto") == "plain" or HUGE_PAGES in environ or not _transparent_huge_pages():
        return None
    if environ.get(TRIED) or _malloc_preloaded(environ):
        return None  # tcmalloc (or the user's malloc) keeps its own pages
    environ[HUGE_PAGES] = "1"
    return environ


def use_huge_pages() -> bool:
    """Switch PyTorch's huge pages on for this process when `huge_pages_env` says so. Only before torch
    is imported: PyTorch reads the variable once. True when switched on."""
    env = huge_pages_env()
    if env is None or loaded() or "torch" in sys.modules:
        return False
    os.environ[HUGE_PAGES] = env[HUGE_PAGES]
    return True


def _transparent_huge_pages() -> bool:
    """Linux offers transparent huge pages to a process that asks (the setting is `always` or `madvise`)."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def describe() -> str:
    """Which malloc this process runs on, in a few words (for logs and benchmark tables)."""
    path = loaded()
    if path:
        return Path(path).name.split(".so")[0].removeprefix("lib")
    return "system malloc" + (" + huge pages" if os.environ.get(HUGE_PAGES) == "1" else "")


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
