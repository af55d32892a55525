"""Giving memory back to the system after a turn: glibc keeps freed heap pages (a burst's tensors,
its KV caches) for the process's next allocation; `malloc_trim` returns them, so the agent's resident
memory falls back to the loaded model's after a burst. Fewer malloc arenas (glibc makes up to 8 a
core, one per thread that allocates at once) leave less memory scattered among them after a burst.
Both are no-ops where the C library is not glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt's parameter (glibc's malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _trim() -> Callable[[int], int] | None:
    return getattr(_libc(), "malloc_trim", None)  # not glibc (musl, macOS): nothing to trim


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas from now on (0: glibc's default); call it before threads start.
    Whether the C library took it."""
    mallopt = getattr(_libc(), "mallopt", None)
    if arenas <= 0 or mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def release_memory() -> bool:
    """Return the heap's free pages to the system; whether the C library could."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
