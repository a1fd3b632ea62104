"""Liveness for the container's HEALTHCHECK: the consumer loop writes a small file; ``--healthcheck`` reads it.

The loop beats at every iteration (while idle, about every second: a round waits ``WORKER_MAX_WAIT_TIME``, at most
0.5 s, on each of the two job queues) and at the start and end of each job. A GPU job can run for a long time
without the loop turning, so the file also says since when the worker has been busy: the worker is healthy while the
last beat is younger than ``max_age``, or while the job in hand is younger than ``busy_limit`` (the attempt's time
limit, ``JOB_TIMEOUT``: a job past it overruns, and the worker is unhealthy until it has stopped it, see
:mod:`gpu_worker.attempt`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._busy_since: float | None = None

    def beat(self) -> None:
        self._write()

    def busy(self) -> None:
        self._busy_since = time.time()
        self._write()

    def idle(self) -> None:
        self._busy_since = None
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"beat": time.time(), "busy_since": self._busy_since, "pid": os.getpid()}))
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
    age = now - beat
    if age <= max_age:
        return True, f"last beat {age:.0f} s ago"
    if busy_since is not None and now - busy_since <= busy_limit:
        return True, f"busy with a job for {now - busy_since:.0f} s"
    return False, f"last beat {age:.0f} s ago (limit {max_age:g} s)"
