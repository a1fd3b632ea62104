"""Run the timeline: each fault in its own thread at its time, against the :class:`Supervisor`'s real processes.

A fault's record says when it hit (``start``: the signal, or the first second of an outage), when the service was
back and ready (``end``), and what it hit (which worker, whether it was busy, how many submits were in flight...).
A fault that could not be carried out records its error and the run goes on (the report shows it).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from local.chaos.client import Submitter
from local.chaos.orphans import create_orphans
from local.chaos.supervisor import Supervisor
from local.chaos.timeline import Fault, Kind

logger = logging.getLogger(__name__)

BUSY_WAIT = 30.0  # seconds a worker kill waits for a busy worker before it takes an idle one
IN_FLIGHT_WAIT = 30.0  # seconds a host kill waits for a submit in flight


@dataclass
class Record:
    fault: Fault
    start: float | None = None
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        times = {k: None if v is None else round(v, 1) for k, v in (("start", self.start), ("end", self.end))}
        error = {"error": self.error} if self.error else {}
        return {**self.fault.to_json(), **times, **self.detail, **error}


class FaultRunner:
    def __init__(
        self,
        supervisor: Supervisor,
        submitter: Submitter,
        *,
        started: float,
        stop: threading.Event,
        image: bytes,
        bands: str,
        rng: random.Random,
    ) -> None:
        self._supervisor = supervisor
        self._submitter = submitter
        self._started = started
        self._stop = stop
        self._image = image
        self._bands = bands
        self._rng = rng
        self.orphans: list[str] = []
        self._handlers: dict[Kind, Callable[[Record], None]] = {
            Kind.BURST: self._burst,
            Kind.KILL_WORKER: self._kill_worker,
            Kind.TERM_WORKER: self._term_worker,
            Kind.RESTART_EMULATOR: self._restart_emulator,
            Kind.KILL_HOST: self._kill_host,
            Kind.ORPHANS: self._orphans,
            Kind.BLOB_OUTAGE: self._blob_outage,
            Kind.PG_OUTAGE: self._pg_outage,
        }

    def now(self) -> float:
        return time.monotonic() - self._started

    def run(self, timeline: list[Fault]) -> list[Record]:
        records = [Record(fault) for fault in timeline]
        threads = [threading.Thread(target=self._run, args=(r,), daemon=True) for r in records]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records

    def _run(self, record: Record) -> None:
        if self._stop.wait(max(0.0, record.fault.at - self.now())):
            return
        try:
            self._handlers[record.fault.kind](record)
        except Exception as e:  # a fault that cannot be carried out is reported, and the run goes on
            record.error = f"{type(e).__name__}: {e}"
            logger.exception("chaos: %s at %.0f s failed", record.fault.kind.value, record.fault.at)
        else:
            logger.warning(
                "chaos: %s done: %s", record.fault.kind.value, record.to_json(), extra={"action": "chaos_fault"}
            )

    def _burst(self, record: Record) -> None:
        record.start = record.end = self.now()  # the submitter sends these jobs; recorded for the timeline

    def _kill_worker(self, record: Record, sig: signal.Signals = signal.SIGKILL) -> None:
        began = self.now()
        record.detail = self._supervisor.kill_worker(sig, prefer_busy_for=BUSY_WAIT)
        record.start = began + record.detail.get("waited_s", 0.0)
        record.end = self.now()

    def _term_worker(self, record: Record) -> None:
        self._kill_worker(record, signal.SIGTERM)

    def _restart_emulator(self, record: Record) -> None:
        record.start = self.now()
        old = self._supervisor.kill_backend("servicebus", signal.Signals[record.fault.signal])
        self._supervisor.start_backend(old)
        record.end = self.now()

    def _kill_host(self, record: Record) -> None:
        deadline = time.monotonic() + IN_FLIGHT_WAIT
        while self._submitter.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(self._rng.uniform(0.0, 0.03))  # land somewhere inside the request, not at its first byte
        record.start = self.now()
        in_flight = self._submitter.in_flight
        old = self._supervisor.kill_backend("functions", signal.SIGKILL)
        self._supervisor.start_backend(old)
        record.end = self.now()
        record.detail = {"submits_in_flight": in_flight}

    def _orphans(self, record: Record) -> None:
        record.start = self.now()
        prefix = f"chaos-{self._submitter.run_id}-orphan"
        self.orphans = create_orphans(self._supervisor.env, self._image, self._bands, record.fault.count, prefix)
        record.end = self.now()
        record.detail = {"job_ids": self.orphans}

    def _blob_outage(self, record: Record) -> None:
        self._outage(record, "azurite", signal.SIGTERM)  # SIGTERM: Azurite saves its metadata and exits

    def _pg_outage(self, record: Record) -> None:
        self._outage(record, "postgres", signal.SIGQUIT)  # immediate shutdown: as a crash, WAL recovery on start

    def _outage(self, record: Record, name: str, sig: signal.Signals) -> None:
        record.start = self.now()
        old = self._supervisor.kill_backend(name, sig)
        down = self.now()
        if self._stop.wait(max(0.0, record.fault.seconds - (down - record.start))):
            return
        restarting = self.now()
        self._supervisor.start_backend(old)
        record.end = self.now()
        record.detail = {"down_s": round(restarting - record.start, 1), "restart_s": round(record.end - restarting, 1)}
