"""Where the code runs: the processes of a launch (one plain `python` process, or the ranks
`torchrun` / `accelerate launch` started; every entry point runs unchanged under each) and the
reduced precision the hardware computes fast."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch


def cpu_launch() -> bool:
    """Ranks on a machine without CUDA: Accelerate uses gloo across processes only when told it is on CPU."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState`: rank, world size, barriers. Shared with an `Accelerator` built earlier."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_launch())


@cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are ~2-3x fp32 rather than emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_precision(device_type: str) -> str:
    """What `precision: auto` means on this hardware, in the one vocabulary of every entry point:
    bf16 on CUDA with bf16 and on CPUs with AMX or AVX512-BF16, fp16 on older CUDA, else fp32."""
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"
