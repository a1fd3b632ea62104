"""``GET /api/health``: whether the database, Blob Storage and Service Bus answer, each within a bound.

The route is anonymous, so what it costs must not grow with the requests: a :class:`HealthMonitor` runs one round of
probes at a time and answers every request within ``ttl`` (5 s) of a round with that round's answer. Requests that
find no fresh answer while a round runs wait for it (single flight) instead of starting their own.

In a round the three probes run at the same time, each bounded by ``timeout`` (2 s): a probe that has not answered by
then is down, and its thread is left to end on the client's own timeouts. Until it has ended, that probe is not
started again: a later round reports it down at once, so a hung backend holds at most one thread per probe.

The answer says only ``ok`` and the latency of each check; why a check failed (the exception, the host, the driver)
goes to the log, never into the answer, which anyone may read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Literal

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0  # seconds a probe may take
DEFAULT_TTL = 5.0  # seconds a round's answer is reused
Probe = Callable[[], object]  # raises unless its backend answers


class Check(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    latency_ms: float  # the probe's time; the bound when it did not answer in time


class Checks(BaseModel):
    model_config = ConfigDict(frozen=True)

    database: Check
    storage: Check
    servicebus: Check


class Health(BaseModel):
    """``GET /api/health``: 200 when every check is ok, 503 otherwise."""

    model_config = ConfigDict(frozen=True)

    status: Literal["ok", "unavailable"]
    checks: Checks

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Round:
    """A round of probes under way; ``health`` is set (or left ``None`` if the round failed) before ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.health: Health | None = None


class HealthMonitor:
    def __init__(
        self,
        database: Probe,
        storage: Probe,
        servicebus: Probe,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = {"database": database, "storage": storage, "servicebus": servicebus}
        self._timeout = timeout
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[float, Health] | None = None  # the last round's answer, and when it came
        self._round: _Round | None = None
        # One thread per probe is enough: a probe still running is never submitted again.
        self._executor = ThreadPoolExecutor(max_workers=len(self._probes), thread_name_prefix="health")
        self._running: dict[str, Future[Check]] = {}  # the latest run of each probe (only a round's leader uses it)

    def check(self) -> Health:
        """The last answer while it is fresh; otherwise the answer of the round under way, or of a new one."""
        while True:
            with self._lock:
                if self._answer is not None and self._clock() - self._answer[0] < self._ttl:
                    return self._answer[1]
                current = self._round
                leading = current is None
                if current is None:
                    current = self._round = _Round()
            if leading:
                return self._lead(current)
            current.done.wait()
            if current.health is not None:
                return current.health

    def _lead(self, current: _Round) -> Health:
        try:
            health = self._probe_all()
            with self._lock:
                self._answer = (self._clock(), health)
            current.health = health
            return health
        finally:
            with self._lock:
                self._round = None
            current.done.set()

    def _probe_all(self) -> Health:
        started: dict[str, Future[Check]] = {}
        for name, probe in self._probes.items():
            previous = self._running.get(name)
            if previous is None or previous.done():
                started[name] = self._running[name] = self._executor.submit(_timed, name, probe)
        wait(started.values(), timeout=self._timeout)
        down = Check(ok=False, latency_ms=round(self._timeout * 1000, 1))
        checks: dict[str, Check] = {}
        for name in self._probes:
            future = started.get(name)
            if future is not None and future.done():
                checks[name] = future.result()
                continue
            if future is None:
                log.warning("health: %s has not answered an earlier check yet", name, extra=_extra(name, "hung"))
            else:
                log.warning("health: %s did not answer within %.1f s", name, self._timeout,
                            extra=_extra(name, "timeout"))  # fmt: skip
            checks[name] = down
        status: Literal["ok", "unavailable"] = "ok" if all(c.ok for c in checks.values()) else "unavailable"
        return Health(status=status, checks=Checks(**checks))


def _timed(name: str, probe: Probe) -> Check:
    started = time.perf_counter()
    try:
        probe()
        ok = True
    except Exception as e:  # a health check reports any failure as "down"; the reason goes to the log only
        log.warning("health: %s is down: %s: %s", name, type(e).__name__, e, extra=_extra(name, "down"))
        ok = False
    return Check(ok=ok, latency_ms=round((time.perf_counter() - started) * 1000, 1))


def _extra(name: str, outcome: str) -> dict[str, str]:
    return {"action": "health_check", "check": name, "outcome": outcome}
