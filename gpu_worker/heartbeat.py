"""Liveness for the container's HEALTHCHECK: the worker's threads write a small file; ``--healthcheck`` reads it.

The file holds the last *beat* and since when the worker has been *busy*. The pipeline's threads
(:mod:`gpu_worker.pipeline`) each mark their work on a message: :meth:`Heartbeat.busy` when the preparing thread has
a message, the main thread starts an analysis, or the finishing (or settling) thread starts a settlement;
:meth:`Heartbeat.idle` when it is done. ``busy_since`` is the start of the oldest such piece of work. The receiving
loop beats at every round (while idle, about every second: a round waits ``WORKER_MAX_WAIT_TIME``, at most 0.5 s, on
each of the two job queues), and a thread waiting for a backend beats at each probe, which also renews its own
work's start (waiting for the database is not hanging).

The worker is unhealthy when a piece of work is older than ``busy_limit`` (the attempt's time limit,
``JOB_TIMEOUT``: it overruns, and the worker is unhealthy until it has stopped it, see :mod:`gpu_worker.attempt`),
whatever the other threads do; otherwise healthy while the last beat is younger than ``max_age`` (the loop turns),
or while it is busy (a GPU job can run for a long time while no thread beats).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class Heartbeat:
    """Thread-safe: the file is written under a lock, each thread's work is kept apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._since: dict[int, float] = {}  # thread -> when its work started
        self._beat: float | None = None  # the last write's time

    def healthy(self, *, max_age: float, busy_limit: float) -> bool:
        """What ``--healthcheck`` would say of the file, from this process's own state (the liveness metric)."""
        with self._lock:
            beat, busy_since = self._beat, min(self._since.values(), default=None)
        return beat is not None and judge(beat, busy_since, time.time(), max_age=max_age, busy_limit=busy_limit)[0]

    def beat(self) -> None:
        """A sign of life; from a busy thread, its work is alive too (it is waiting for a backend)."""
        with self._lock:
            me = threading.get_ident()
            if me in self._since:
                self._since[me] = time.time()
            self._write()

    def busy(self) -> None:
        """This thread starts a piece of work (on a message)."""
        with self._lock:
            self._since[threading.get_ident()] = time.time()
            self._write()

    def idle(self) -> None:
        """This thread's work is done."""
        with self._lock:
            self._since.pop(threading.get_ident(), None)
            self._write()

    def _write(self) -> None:
        busy_since = min(self._since.values(), default=None)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        self._beat = time.time()
        try:
            tmp.write_text(json.dumps({"beat": self._beat, "busy_since": busy_since, "pid": os.getpid()}))
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk must not stop the work; the healthcheck will say so
            logger.warning("cannot write heartbeat %s: %s", self.path, e, extra={"action": "heartbeat_failed"})


def check(path: Path, *, max_age: float, busy_limit: float, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, why)`` for the heartbeat file at ``path``."""
    now = time.time() if now is None else now
    try:
        state = json.loads(path.read_text())
        beat = float(state["beat"])
        busy_since = None if state.get("busy_since") is None else float(state["busy_since"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"no readable heartbeat at {path}: {e}"
    return judge(beat, busy_since, now, max_age=max_age, busy_limit=busy_limit)


def judge(beat: float, busy_since: float | None, now: float, *, max_age: float, busy_limit: float) -> tuple[bool, str]:
    """``(healthy, why)`` for a last beat at ``beat`` and work under way since ``busy_since``."""
    age = now - beat
    if busy_since is not None and now - busy_since > busy_limit:
        return False, f"busy with a job for {now - busy_since:.0f} s (limit {busy_limit:g} s)"
    if age <= max_age:
        return True, f"last beat {age:.0f} s ago"
    if busy_since is not None:
        return True, f"busy with a job for {now - busy_since:.0f} s"
    return False, f"last beat {age:.0f} s ago (limit {max_age:g} s)"
