"""Handing freed memory back to the operating system. Imports nothing of the package."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or none found)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> None:
    """Return the heap's free pages to the OS. glibc keeps the blocks a released buffer freed for later
    allocations, so the process's resident memory stays at its peak: a pass that runs after another
    would stack its buffers on the first's. A no-op where glibc is not the C library."""
    if (trim := _malloc_trim()) is not None:
        trim(0)
