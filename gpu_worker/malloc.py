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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; ``True`` when the cap was set here."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_ARENA_MAX, arenas) == 1)
    logger.log(logging.DEBUG if done else logging.INFO, "malloc arenas capped at %d: %s", arenas, done,
               extra={"action": "malloc_arenas"})  # fmt: skip
    return done
