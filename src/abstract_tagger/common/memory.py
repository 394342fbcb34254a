"""Handing freed memory back to the operating system. Imports nothing of the package."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

_M_ARENA_MAX = -8  # mallopt's parameter for the arena cap (glibc's malloc.h)


@cache
def _glibc(name: str):
    """glibc's function `name` (int result, int arguments), or None (another C library, or none found)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    return function


def trim_heap() -> None:
    """Return the heap's free pages to the OS. glibc keeps the blocks a released buffer freed for later
    allocations, so the process's resident memory stays at its peak: a pass that runs after another
    would stack its buffers on the first's. A no-op where glibc is not the C library."""
    if (trim := _glibc("malloc_trim")) is not None:
        trim(ctypes.c_size_t(0))


def limit_arenas(count: int) -> bool:
    """Let the threads this process starts from now on share at most `count` malloc arenas (glibc's
    default allows 8 a core); True where it was set. Each arena keeps its own freed blocks, so an
    engine whose worker threads each build batches in an arena of their own holds a fragmented peak in
    every one of them (predict.py's peak RSS with OpenVINO: README, Memory). A cap the user set
    ($MALLOC_ARENA_MAX, or arena_max in $GLIBC_TUNABLES) wins."""
    user_set = os.environ.get("MALLOC_ARENA_MAX") or "arena_max" in os.environ.get("GLIBC_TUNABLES", "")
    if user_set or (mallopt := _glibc("mallopt")) is None:
        return False
    return mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(count)) == 1
