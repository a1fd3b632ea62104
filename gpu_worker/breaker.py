"""A circuit breaker on the worker's backends: while PostgreSQL or Blob Storage is down, stop receiving.

Pulling messages only to abandon them spends their deliveries and the worker's time. The breaker starts *open* (a
worker started during an outage must not take a job it cannot run), and opens again when an attempt (or a claim)
fails because the database or storage is unavailable; before each receive the consumer calls
:meth:`Breaker.wait_until_closed`, which probes every backend (``SELECT 1``, the images container's properties) with
exponential backoff (1 s doubling to ``max_interval``) until all answer, and only then receives again. The messages
wait in the queue meanwhile, costing time, not deliveries. A shutdown ends the wait.

:meth:`Breaker.confirms_outage` tells an outage from a failure of one job's own: a backend error that a probe
confirms (the backend does not answer at all) is an outage, and the attempt it cut short is not charged against
``JOB_MAX_ATTEMPTS``; one the probes do not confirm (one blob unreadable, the others fine) is charged.

:class:`DatabaseWait` is for a message already in hand when the database goes away (at its claim, or at its
settlement): the call waits for the breaker to close, the message still locked, instead of the message being
abandoned and one of its deliveries spent.

Thread-safe: the pipeline's threads (:mod:`gpu_worker.pipeline`) record errors and wait on the same breaker (the
receiving thread before each receive and at a claim, the finishing thread at a settlement). Its state changes under a
lock, and a round of probes closes it only if no error was recorded while they ran (an outage seen meanwhile is
probed again, not forgotten).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from shared.errors import DatabaseUnavailable, StorageUnavailable, TransientError

logger = logging.getLogger(__name__)

TRIPPING = (DatabaseUnavailable, StorageUnavailable)
T = TypeVar("T")


class Breaker:
    def __init__(
        self,
        probes: Mapping[str, Callable[[], None]],
        *,
        max_interval: float,
        first_interval: float = 1.0,
        open_because: str | None = "startup",  # open at start: probe before the first receive
    ):
        self._probes = probes
        self._max_interval = max_interval
        self._first_interval = first_interval
        self.open_because = open_because
        self._lock = threading.Lock()
        self._trips = 0  # errors recorded so far

    def record(self, error: BaseException | None) -> None:
        """After an attempt or a claim: open when ``error`` says a backend is down."""
        if not isinstance(error, TRIPPING):
            return
        with self._lock:
            self._trips += 1
            if self.open_because is not None:
                return
            self.open_because = error.code
        logger.warning("backend unavailable (%s): receiving stops until it answers", error.code,
                       extra={"action": "breaker_open", "reason": error.code})  # fmt: skip

    def confirms_outage(self, error: BaseException | None) -> bool:
        """Whether ``error`` is a backend outage the probes confirm now (then the breaker is open)."""
        if not isinstance(error, TRIPPING):
            return False
        self.record(error)
        return self._failing_probe() is not None

    def wait_until_closed(self, stop: threading.Event, tick: Callable[[], object] = lambda: None) -> bool:
        """Probe until every backend answers (``True``), or until ``stop`` is set (``False``); ``tick`` after each
        probe (the heartbeat: waiting for a backend is not a hung worker)."""
        interval = self._first_interval
        while self.open_because is not None:
            tick()
            with self._lock:
                trips = self._trips
            if self._failing_probe() is None:
                self._close(trips)
                continue
            if stop.wait(interval):
                return False
            interval = min(interval * 2, self._max_interval)
        return not stop.is_set()

    def _close(self, trips: int) -> None:
        """Close after a round of probes that all answered, unless an error was recorded meanwhile (or another
        thread closed it already)."""
        with self._lock:
            if self.open_because is None or self._trips != trips:
                return
            reason, self.open_because = self.open_because, None
        level = logging.INFO if reason == "startup" else logging.WARNING
        logger.log(level, "backends answer: receiving", extra={"action": "breaker_closed"})

    def _failing_probe(self) -> str | None:
        for name, probe in self._probes.items():
            try:
                probe()
            except TransientError as e:
                logger.info("probe %s failed: %s", name, e.code, extra={"action": "breaker_probe", "reason": e.code})
                return name
        return None


@dataclass(frozen=True)
class DatabaseWait:
    """``wait(call)``: ``call()``; if the database is down, record it, wait until the breaker closes (its probes;
    ``tick`` after each, the message's lock renewed meanwhile) and call once more. Re-raises the
    :class:`~shared.errors.DatabaseUnavailable` when ``stop`` (a shutdown) ends the wait."""

    breaker: Breaker
    stop: threading.Event
    tick: Callable[[], object]

    def __call__(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except DatabaseUnavailable as e:
            self.breaker.record(e)
            if not self.breaker.wait_until_closed(self.stop, tick=self.tick):
                raise
            return call()
