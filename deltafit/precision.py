"""The precision a run trains in: `train.mixed_precision: auto` (the default) picks bf16 where it is fast.

bf16 autocast pays off only where matrix units run it natively: a CUDA GPU with bf16 (Ampere and
later), or a CPU with AMX or AVX-512 BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later),
where a bf16 matmul runs several times faster than fp32. Elsewhere bf16 is emulated and slower
than fp32, so auto keeps fp32 there. The master weights and the optimizer stay fp32 either way
(autocast only lowers the matmuls), which is why bf16 needs no loss scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}  # /proc/cpuinfo name -> what we print


def resolve(requested: str) -> tuple[str, str]:
    """(precision for Accelerate: 'no' | 'bf16' | 'fp16', why): the recipe's choice, or auto's pick."""
    import torch

    if requested == "fp16" and not torch.cuda.is_available():
        # Accelerate autocasts fp16 only on CUDA: elsewhere the run would be fp32 while saying fp16.
        from deltafit.errors import UserError

        raise UserError("recipe key 'train.mixed_precision': fp16 needs a CUDA GPU (elsewhere Accelerate runs it "
                        "as plain fp32); use bf16, no or auto")
    if requested != "auto":
        return requested, "train.mixed_precision says so" + _emulated_warning(requested)

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"auto: {name} runs bf16 natively"
        return "no", f"auto: {name} has no native bf16 (fp16 needs loss scaling: set train.mixed_precision: fp16)"
    if torch.accelerator.is_available():  # MPS and other accelerators: bf16 autocast is not reliably faster there
        return "no", f"auto: bf16 is not known to be faster on {torch.accelerator.current_accelerator()}"
    units = cpu_bf16_units()
    if units:
        return "bf16", f"auto: the CPU has {' and '.join(units)}"
    return "no", "auto: the CPU has neither AMX nor AVX-512 BF16, where bf16 would be emulated and slower than fp32"


def _emulated_warning(requested: str) -> str:
    """A bf16 the recipe asks for where auto would keep fp32 for the hardware's sake: the first log line
    says why. On a CPU that emulates bf16 a matmul is ~100x slower than in fp32 (measured on an AVX2
    EPYC: 1.2 against 170 GFLOP/s); a GPU without native bf16 emulates it too."""
    if requested != "bf16":
        return ""
    pick, why = resolve("auto")  # the same probes, in the same order, as auto itself
    return "" if pick == "bf16" else f"; but {why.removeprefix('auto: ')}, so auto would train in fp32"


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix units, by name ([] when none or unknown)."""
    import torch

    found = []
    probes = {"AMX-BF16": "_is_amx_tile_supported", "AVX-512 BF16": "_is_avx512_bf16_supported"}
    for label, probe in probes.items():  # torch's own checks (cpuinfo, any OS); private, so guarded
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                if check():
                    found.append(label)
                continue
            except Exception:  # noqa: BLE001 - an unknown platform answers "no", never a crash
                pass
        if label in _linux_flags():
            found.append(label)
    return found


def _linux_flags() -> set[str]:
    """CPU_FLAGS found in /proc/cpuinfo (Linux), printed names; empty elsewhere."""
    flags = set((cpuinfo_field("flags") or "").split())
    return {shown for flag, shown in CPU_FLAGS.items() if flag in flags}


def cpuinfo_field(key: str) -> Optional[str]:
    """The value of the first `key` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def line(precision: str, why: str) -> str:
    """The run's first log line."""
    shown = {"no": "fp32", "bf16": "bf16 autocast (fp32 master weights)", "fp16": "fp16 autocast with loss scaling"}
    tail = "; train.mixed_precision: no keeps fp32" if why.startswith("auto") and precision != "no" else ""
    return f"precision: {shown[precision]} ({why}{tail})"
