"""An attempt's progress: its stage and the fraction done within it, written to the job's row, fenced by the attempt.

The handler and the analysis call :meth:`Progress.report` at their checkpoints: each stage as it starts, and long
stages per window or per file. A report is cheap when nothing is written (a clock read, a few flags, an
uncontended lock), so the analysis may call it per window without slowing down. Writes (``jobs.progress``:
``{stage, fraction, updated_at}``, ISO 8601 UTC) come at most one per ``interval`` (1 s) per job, the first one
``interval`` after the claim:

* a report that is not due is kept (the latest one), and written once it is due, by the next report or, if none
  comes by then, by the attempt guard's thread (:meth:`gpu_worker.attempt.AttemptGuard.defer`), so a long step with
  a single report (a model's COG build, the cloud detector's run) shows its stage after ``interval``;
* the first report of ``upload``, the last stage, is written at once, and whatever was kept is dropped: it is the
  checkpoint that keeps a cancelled attempt from uploading, and from then on nothing is kept (a write kept past it
  could land after the result). Later ``upload`` reports are written when due, else not at all.

So a job shorter than ``interval`` writes one progress row (``upload``); before, each stage's first report was
written at once (``docs/performance.md``, "Database statements per job"). A write notifies
(``notify=True``: the ``job.progress`` webhook, then :meth:`shared.events.Notifier.flush`) when it is the first write
of its stage: a stage that began and ended between two writes is never written, as Replicate throttles its progress
webhooks. The stage never goes back: the windowed pass interleaves ``indices`` and ``cover`` window by window, and
once ``cover`` is reached, reports of ``indices`` only serve as checkpoints.

The reports of one attempt come from the pipeline's threads in turn (:mod:`gpu_worker.pipeline`): ``download``
from the preparing thread, the analysis' stages from the computing thread that analyses it, ``upload`` from the
finishing thread (as each file completes), one stage after the other and never at once; a kept report may be
written by the guard's thread meanwhile, so the writes are serialised by a lock (which the guard's thread never
waits for). A write by the guard's thread is no checkpoint: what it learns (a cancellation, a lost attempt) stops the
attempt at its next report. So a cancellation requested less than ``interval`` before a long step without reports
(a model's COG build, the cloud detector's run) is acted on after that step, or at the lease's next renewal.

Every report is a checkpoint (:meth:`gpu_worker.attempt.AttemptGuard.check`): each write returns the job, so a
cancellation requested through the API (``cancel_requested_at``) is seen within about ``interval`` (or at the lease's
next renewal), and the attempt stops at its next checkpoint with :class:`~gpu_worker.settlement.Cancelled`; a write
refused (another attempt took the job) stops it with :class:`~gpu_worker.settlement.AttemptLost`. Progress is
best-effort: a database error while writing never fails the job; it is logged once per stage and writing pauses for
``backoff`` seconds (a write while the database is down waits for the pool's timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

from shared.errors import CropAIError
from shared.events import Notifier
from shared.jobs import Job, JobStore

logger = logging.getLogger(__name__)

STAGES = ("download", "decode", "cloud_mask", "indices", "cover", "outputs", "upload")
_ORDER = {stage: i for i, stage in enumerate(STAGES)}
_LAST = _ORDER["upload"]
BUSY_RETRY = 0.05  # seconds: the guard's thread asks again when a write of the attempt's own is under way


class Guard(Protocol):
    """What the reporter needs of :class:`gpu_worker.attempt.AttemptGuard`."""

    job_id: UUID
    attempt: int

    def check(self) -> None: ...
    def observe(self, job: Job | None) -> None: ...
    def defer(self, delay: float, call: Callable[[], None]) -> None: ...


class Progress:
    def __init__(
        self,
        jobs: JobStore,
        guard: Guard,
        notifier: Notifier,
        *,
        interval: float = 1.0,
        backoff: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Made right after the claim: the first write is due ``interval`` later."""
        self._jobs = jobs
        self._guard = guard
        self._notifier = notifier
        self._interval = interval
        self._backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()  # a kept report is written by the guard's thread, or by the next report
        self._stage = -1  # the furthest stage reported
        self._written = -1  # the furthest stage written
        self._last_write = clock()  # the claim: nothing is written before interval has passed
        self._paused_until = -float("inf")
        self._kept: tuple[str, float] | None = None  # the latest report not written yet
        self._logged: set[str] = set()  # stages whose write failure was logged
        self._extra = {"job_id": str(guard.job_id), "attempt": guard.attempt}

    def report(self, stage: str, fraction: float = 0.0) -> None:
        """Record that the attempt is at ``stage`` (one of :data:`STAGES`), ``fraction`` (0 to 1) of it done; write
        it when due (see the module docstring); raise ``Cancelled`` or ``AttemptLost`` if the attempt is to stop."""
        index = _ORDER[stage]
        if index >= self._stage:
            first = index > self._stage
            self._stage = index
            fraction = min(max(fraction, 0.0), 1.0)
            with self._lock:
                now = self._clock()
                due = self._due()
                last = index == _LAST  # nothing is kept from here on: it could be written after the result
                if now >= due or (last and first and now >= self._paused_until):
                    self._kept = None
                    self._write(stage, fraction, now)
                elif last:
                    self._kept = None
                else:
                    if self._kept is None:
                        self._guard.defer(due - now, self.flush)
                    self._kept = (stage, fraction)
        self._guard.check()

    def flush(self) -> None:
        """Write the kept report if it is due (the guard's thread calls this when it should be); else ask to be
        called again when it is. Never waits for a write of the attempt's own threads (the guard's thread also
        renews the lease and enforces the time limit): if one is under way, it asks again a little later."""
        if not self._lock.acquire(blocking=False):
            self._guard.defer(BUSY_RETRY, self.flush)
            return
        try:
            if self._kept is None:
                return
            now, due = self._clock(), self._due()
            if now < due:
                self._guard.defer(due - now, self.flush)
                return
            (stage, fraction), self._kept = self._kept, None
            self._write(stage, fraction, now)
        finally:
            self._lock.release()

    def _due(self) -> float:
        return max(self._last_write + self._interval, self._paused_until)

    def _write(self, stage: str, fraction: float, now: float) -> None:
        job_id, attempt = self._guard.job_id, self._guard.attempt
        notify = _ORDER[stage] > self._written
        progress = {"stage": stage, "fraction": round(fraction, 4), "updated_at": datetime.now(UTC).isoformat()}
        try:
            job = self._jobs.progress(job_id, attempt, progress, notify=notify)
        except CropAIError as e:  # DatabaseUnavailable: progress is best-effort, the job goes on
            self._paused_until = now + self._backoff
            if stage not in self._logged:
                self._logged.add(stage)
                logger.warning("job %s: progress not recorded (%s); the job goes on", job_id, e.code,
                               extra={**self._extra, "action": "progress_failed", "stage": stage})  # fmt: skip
            return
        self._last_write = now
        self._written = max(self._written, _ORDER[stage])
        logger.debug("job %s: %s %.0f%%", job_id, stage, 100 * fraction,
                     extra={**self._extra, "action": "progress", "stage": stage, "notify": notify})  # fmt: skip
        self._guard.observe(job)
        if notify and job is not None:
            self._notifier.flush(job)
