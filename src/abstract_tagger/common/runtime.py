"""Where the code runs: the processes of a launch (one plain `python` process, or the ranks
`torchrun` / `accelerate launch` started; every entry point runs unchanged under each) and the
reduced precision the hardware computes fast."""

from __future__ import annotations

import logging
import os
import time
from functools import cache

import torch

from abstract_tagger.common.cpu import cpu_has_native_bf16

log = logging.getLogger(__name__)


def cpu_launch() -> bool:
    """Ranks on a machine without CUDA: Accelerate uses gloo across processes only when told it is on CPU."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState`: rank, world size, barriers. Shared with an `Accelerator` built earlier."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_launch())


# bf16 must beat fp32 by this much to be chosen: the probe's noise must not flip the choice (and with
# it the trained weights) from one run to the next.
BF16_MARGIN = 1.2


@cache
def cpu_bf16_speedup() -> float:
    """fp32 time over bf16-autocast time of a transformer-sized matmul, forward and backward (~0.2 s).
    Measured, because CPU flags do not tell: on an AMD EPYC with AVX512-BF16 bf16 trained and embedded
    ~2x faster than fp32; on an Intel Xeon whose AMX is not exposed, 0.5-0.8x."""
    x = torch.randn(512, 384)
    w = torch.randn(384, 1536, requires_grad=True)

    def seconds(bf16: bool) -> float:
        start = time.perf_counter()
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                (x @ w).float().sum().backward()
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up: kernel selection, allocations
    fp32, bf16 = min(seconds(False) for _ in range(3)), min(seconds(True) for _ in range(3))
    return fp32 / bf16


def fast_precision(device_type: str) -> str:
    """What `precision: auto` means on this hardware, in the one vocabulary of every entry point:
    bf16 on CUDA with bf16, fp16 on older CUDA; on CPU, bf16 where the CPU has bf16 instructions and
    they measure at least BF16_MARGIN x fp32's speed, else fp32."""
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return _cpu_precision() if device_type == "cpu" else "fp32"


@cache
def _cpu_precision() -> str:
    if not cpu_has_native_bf16():
        return "fp32"
    speedup = cpu_bf16_speedup()
    choice = "bf16" if speedup >= BF16_MARGIN else "fp32"
    log.info("precision auto on this CPU: %s (bf16 autocast measured at %.2fx fp32)", choice, speedup)
    return choice
