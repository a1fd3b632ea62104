"""This worker's row in ``workers`` (:class:`shared.workers.WorkerRegistry`), kept fresh while the process runs.

A daemon thread beats every ``WORKER_REGISTRY_INTERVAL`` seconds, also while a long job keeps the consumer busy, and at
once when the job in hand changes, so ``current_job`` is current. The pipeline (:mod:`gpu_worker.pipeline`) may hold
several claimed jobs at once, and analyse more than one, but the row names one: the first of the jobs being analysed, or
else the latest one claimed that is still in hand (one job in flight: the job from its claim to its settlement). The
consumer's threads tell it (:meth:`Presence.holding`, :meth:`Presence.computing`, :meth:`Presence.computed`,
:meth:`Presence.released`, under a lock). It starts by deleting a row left under the same id by a process that died
(``started_at`` is this process's). :meth:`Presence.close` stops it and deletes the row. A database error is logged
(once per outage) and never stops the worker: the row is written again at the next beat.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Protocol
from uuid import UUID

from shared.errors import CropAIError

logger = logging.getLogger(__name__)


class Registry(Protocol):
    """:class:`shared.workers.WorkerRegistry`."""

    def beat(self, worker_id: str, host: str, device: str, current_job: UUID | None) -> None: ...
    def gone(self, worker_id: str) -> None: ...


class Presence:
    def __init__(self, registry: Registry, worker_id: str, host: str, device: str, *, interval: float) -> None:
        self._registry = registry
        self.worker_id, self.host, self.device = worker_id, host, device
        self._interval = interval
        self._job: UUID | None = None  # what the row names
        self._held: dict[UUID, None] = {}  # the claimed jobs in hand, in claim order
        self._computing: dict[UUID, None] = {}  # the jobs being analysed, in the order they started
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="worker-registry", daemon=True)

    def start(self) -> Presence:
        self._thread.start()
        return self

    def holding(self, job_id: UUID) -> None:
        """A job this worker claimed is in hand (until :meth:`released`)."""
        with self._lock:
            self._held[job_id] = None
            self._show()

    def computing(self, job_id: UUID) -> None:
        """A job's analysis starts (until :meth:`computed`)."""
        with self._lock:
            self._computing[job_id] = None
            self._show()

    def computed(self, job_id: UUID) -> None:
        """A job's analysis is over (whatever its end)."""
        with self._lock:
            self._computing.pop(job_id, None)
            self._show()

    def released(self, job_id: UUID) -> None:
        """The job's message is settled: it is no longer in hand."""
        with self._lock:
            self._held.pop(job_id, None)
            self._show()

    def _show(self) -> None:
        """Name the first job being analysed, else the latest held; written at once by the thread when it changes."""
        shown = next(iter(self._computing), None) or next(reversed(self._held), None)
        if shown != self._job:
            self._job = shown
            self._changed.set()

    def close(self) -> None:
        """Stop beating and delete the row (best-effort: a row left behind only ages)."""
        self._stop.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._registry.gone(self.worker_id)
        except CropAIError as e:
            logger.warning("could not remove this worker's row: %s", e.code, extra={"action": "registry_failed"})

    def _run(self) -> None:
        # A row a previous process left under the same id (a restarted container is pid 1 again) is replaced; if the
        # database is down, the beat below says so.
        with contextlib.suppress(CropAIError):
            self._registry.gone(self.worker_id)
        while not self._stop.is_set():
            self._changed.clear()
            self._beat()
            self._changed.wait(self._interval)

    def _beat(self) -> None:
        try:
            self._registry.beat(self.worker_id, self.host, self.device, self._job)
        except CropAIError as e:  # DatabaseUnavailable: the next beat writes the row again
            if not self._failing:
                logger.warning("worker registry beat failed: %s", e.code, extra={"action": "registry_failed"})
            self._failing = True
            return
        if self._failing:
            logger.info("worker registry beat written again", extra={"action": "registry_recovered"})
        self._failing = False
