"""``GET /api/health``: whether the database, Blob Storage and Service Bus answer, each within a bound.

The three probes run at the same time, each bounded by ``timeout`` (2 s): a probe that has not answered by then is
down, and its thread is left to end on the client's own timeouts. The answer says only ``ok`` and the latency of
each check; why a check failed (the exception, the host, the driver) goes to the log, never into the answer, which
anyone may read (the route is anonymous).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Literal

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0
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


def check_health(database: Probe, storage: Probe, servicebus: Probe, *, timeout: float = DEFAULT_TIMEOUT) -> Health:
    probes = {"database": database, "storage": storage, "servicebus": servicebus}
    executor = ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix="health")
    try:
        futures = {name: executor.submit(_timed, name, probe) for name, probe in probes.items()}
        wait(futures.values(), timeout=timeout)
    finally:
        executor.shutdown(wait=False)
    checks: dict[str, Check] = {}
    for name, future in futures.items():
        if future.done():
            checks[name] = future.result()
        else:
            log.warning("health: %s did not answer within %.1f s", name, timeout, extra=_extra(name, "timeout"))
            checks[name] = Check(ok=False, latency_ms=round(timeout * 1000, 1))
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
