"""Giving memory back to the system after a turn: glibc keeps freed heap pages (a burst's tensors,
its KV caches) for the process's next allocation; `malloc_trim` returns them, so the agent's resident
memory falls back to the loaded model's after a burst. A no-op where the C library has no malloc_trim."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> bool:
    """Return the heap's free pages to the system; whether the C library could."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
