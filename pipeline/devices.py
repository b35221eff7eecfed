"""Choosing the torch device and precision from params and the hardware."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device 'cuda' was asked for but no CUDA GPU is visible")
    return torch.device(name)


def choose_precision(
    requested: str, device: torch.device, capability: tuple[int, int] | None = None
) -> str:
    """Training precision: `auto` -> bf16 on compute capability >= 8.0, fp16 (with a GradScaler)
    on older GPUs such as the paper's V100 (7.0), fp32 on CPU. An explicit choice is checked."""
    if device.type != "cuda":
        if requested in ("fp16",):
            raise PipelineError("fp16 autocast needs a CUDA GPU; use fp32 or bf16 on CPU")
        return "fp32" if requested == "auto" else requested
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if requested == "auto":
        return "bf16" if capability >= (8, 0) else "fp16"
    if requested == "bf16" and capability < (8, 0):
        raise PipelineError(
            f"bf16 needs compute capability 8.0 or newer; this GPU has "
            f"{capability[0]}.{capability[1]}: use fp16 or auto"
        )
    return requested


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping (Linux `MemAvailable`); None
    where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """torch.autocast for bf16/fp16; nothing for fp32."""
    if precision in AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            yield
    else:
        yield
