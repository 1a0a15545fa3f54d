"""What the machine can do: the precision and the loader workers that fit it, chosen once.

``auto_precision`` is what ``emimimic fit`` uses when the config leaves ``trainer.precision``
null, and ``emimimic extract`` when ``--engine.precision auto``; ``auto_workers`` what the data
module uses when ``num_workers`` is null. Both say why in one line. ``side_by_side_env`` is
the environment of runs that ``table --jobs`` and ``tune --workers`` start side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

#: CPU flags (Linux /proc/cpuinfo) of instructions that compute in bfloat16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """Returns the bfloat16 instruction flags this CPU reports (empty where unknown).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (default: read it; not Linux: none).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    text = cpuinfo
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return tuple(f for f in BF16_FLAGS if f in flags)


def auto_precision(accelerator: str = "auto") -> tuple[str, str]:
    """Returns (the fastest safe Trainer precision here, why).

    On a CUDA GPU: ``bf16-mixed`` where the GPU has bfloat16, else ``16-mixed``. On a CPU:
    ``bf16-mixed`` only where the CPU has bfloat16 instructions (AVX512-BF16 or AMX; e.g. Intel
    Cooper Lake and later Xeons, AMD Zen 4 and later); without them bfloat16 is emulated and
    several times slower than ``32-true``.
    """
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "this GPU computes in bfloat16"
        return "16-mixed", "this GPU has no bfloat16: float16 with loss scaling"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16-mixed", f"this CPU has bfloat16 instructions ({', '.join(flags)})"
    return "32-true", ("this CPU has no bfloat16 instructions (no avx512_bf16 or amx_bf16): "
                       "bfloat16 would be emulated, several times slower than float32")


def side_by_side_env(jobs: int) -> dict[str, str] | None:
    """Returns the environment of a child run started beside ``jobs - 1`` others: each gets an
    equal share of the cores as its CPU threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), so
    that the runs do not oversubscribe the machine (on 2 cores, a 12-epoch trial of two run side
    by side took 331 s with 2 threads each, 42 s with 1, and scored the same). None (inherit as
    it is) for a single run, or where the user set ``OMP_NUM_THREADS``."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def auto_workers(limit: int = 4) -> int:
    """Returns the DataLoader workers that fit this machine: at most ``limit``, and one core
    left for the main process (which reads the batches)."""
    return max(0, min(limit, (os.cpu_count() or 1) - 1))


__all__ = ["BF16_FLAGS", "auto_precision", "auto_workers", "cpu_bf16_flags", "side_by_side_env"]
