"""What the CPU is: its model and the instructions that decide which precision and backend run fastest
(AMX, AVX512-BF16, VNNI), read from /proc/cpuinfo without importing torch (the ONNX path uses it).
Imports nothing of the package."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


@cache
def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    strip = {k.strip(): v.strip() for k, v in fields.items()}
    return strip.get("model name", ""), set(strip.get("flags", "").split())


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on: a second hyperthread per core adds
    contention, not matmul throughput."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, physical = set(), None, "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id" and cpu in allowed:
                cores.add((physical, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


def cpu_description() -> str:
    """What a speed figure was measured on, e.g. "Intel(R) Xeon(R) Processor, 2 cores, AVX512-BF16, VNNI, no AMX"."""
    name, flags = cpuinfo()
    features = [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("avx512_vnni", "VNNI")) if flag in flags]
    features.append("AMX" if cpu_has_amx() else "no AMX")
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores, {', '.join(features)}"


def cpu_has_amx() -> bool:
    """AMX tiles (Sapphire Rapids and later) that this machine exposes: bf16 and int8 matrix units."""
    return "amx_bf16" in cpuinfo()[1]


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 instructions exist (not emulated). Whether they beat fp32 varies by
    CPU, hence `cpu_bf16_speedup`."""
    return cpu_has_amx() or "avx512_bf16" in cpuinfo()[1]
