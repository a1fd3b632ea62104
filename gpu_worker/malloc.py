"""glibc's malloc arenas, capped at the worker's start: the pipeline's threads must not multiply its peak memory.

glibc gives a thread that finds the arenas in use a new one, up to 8 per core, and memory freed in an arena is kept
for that arena. The worker's threads (the analysis, the next job's download, the last one's upload, the SDKs' and
GDAL's own) each allocate and free hundreds of MB on a full tile, so the freed memory of one is not reused by
another. Measured with ``python -m bench.worker_memory`` (two 10980² x 13 tiles through one worker, two in flight, on
the 2-core dev machine, one run each): peak RSS 1,670 MB with glibc's default; with two arenas 1,422 MB
(``MALLOC_ARENA_MAX=2``) and 1,592 MB (this module's cap), the largest 0.2 s samples 1,613 against 1,208 and 1,341 MB;
1,166 MB for the analysis alone in one thread (``bench.analysis --full-tile``).

:func:`limit_arenas` sets the cap with ``mallopt(M_ARENA_MAX)`` before the worker starts its threads (arenas are made
as threads need them), so it holds however the worker is started: the image, ``make up``, a test. An operator's
``MALLOC_ARENA_MAX`` wins (glibc read it at the process's start). Elsewhere (musl, macOS) it does nothing.

:func:`release_free_memory` (``malloc_trim(0)``) hands the pages malloc holds free back to the kernel when there are at
least 64 MB of them; the consumer calls it once an analysis is over and once a job is finished. Without it the memory an
analysis freed stays resident (glibc returns only what is free at the top of each heap, and the analysis' heaps are
fragmented), and the next analysis' own peak comes on top of it: measured on the dev machine, two full-tile analyses one
after the other in one plain process (``Analyzer.analyse`` in the main thread, arenas capped at 2) peaked at 1,110 then
1,475 MB (941 MB resident between them); with ``malloc_trim(0)`` after each, 1,116 then 1,272 MB (359 MB between them;
the trim took 35 ms). Through the worker (``bench.worker_memory``): 1,332 MB with 2 in flight (1,422-1,670 before),
1,304 MB with 1 in flight (1,456-1,530 before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # from glibc's malloc.h
RELEASE_MIN_FREE = 64 * 1024 * 1024  # free bytes in malloc's arenas worth a trim (release_free_memory)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _libc_function(function: str) -> Any:
    """``function`` of the C library (glibc's ``mallopt``, ``malloc_trim``), or ``None`` where there is none (not
    glibc)."""
    return getattr(_libc(), function, None)


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; ``True`` when the cap was set here. Finds the C library either way
    (``find_library`` may run a subprocess), so that :func:`release_free_memory` never has to while a job ends."""
    _libc()
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_ARENA_MAX, arenas) == 1)
    logger.log(logging.DEBUG if done else logging.INFO, "malloc arenas capped at %d: %s", arenas, done,
               extra={"action": "malloc_arenas"})  # fmt: skip
    return done


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


def free_bytes() -> int | None:
    """Bytes malloc holds free in its arenas (glibc's ``mallinfo2().fordblks``: ~7 µs here; it walks each arena's
    free chunks under the arena's lock), or None where it cannot say (glibc before 2.33, not glibc)."""
    info = _libc_function("mallinfo2")
    if info is None:
        return None
    info.argtypes = []
    info.restype = _MallInfo2
    return int(info().fordblks)


def release_free_memory(min_free: int = RELEASE_MIN_FREE) -> bool:
    """Return the free pages of every malloc arena to the kernel (``malloc_trim(0)``: tens of ms after a full tile)
    when malloc holds at least ``min_free`` bytes free (always where :func:`free_bytes` cannot say); ``True`` when
    some were returned. Below that it does nothing: after a small scene a trim costs more than it saves (0.8 ms, and
    the next 128² analysis ran ~3 ms slower for the pages it had to fault in again). Safe from any thread, while
    others allocate (it takes each arena's lock in turn), and never raises: a failure is logged and returns
    ``False`` (it runs in the consumer's ``finally`` blocks). Elsewhere (musl, macOS) it does nothing and returns
    ``False``."""
    try:
        trim = _libc_function("malloc_trim")
        if trim is None:
            return False
        free = free_bytes()
        if free is not None and free < min_free:
            return False
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return bool(trim(0))
    except Exception as e:  # never in the way of the job it runs after
        logger.warning("malloc_trim failed: %s", e, extra={"action": "malloc_trim"})
        return False
