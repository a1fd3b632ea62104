"""An attempt's progress: its stage and the fraction done within it, written to the job's row, fenced by the attempt.

The handler and the analysis call :meth:`Progress.report` at their checkpoints: each stage as it starts, and long
stages per window or per file. A report is cheap when nothing is written (a clock read and two flags), so the
analysis may call it per window without slowing down. Writes (``jobs.progress``: ``{stage, fraction, updated_at}``,
ISO 8601 UTC) are throttled to one per ``interval`` (1 s) per job, except that the first report of a stage is
written at once, and only that write notifies (``notify=True``: the ``job.progress`` webhook, then
:meth:`shared.events.Notifier.flush`). The stage never goes back: the windowed pass interleaves ``indices`` and
``cover`` window by window, and once ``cover`` is reached, reports of ``indices`` only serve as checkpoints.

The reports of one attempt come from the pipeline's threads in turn (:mod:`gpu_worker.pipeline`): ``download``
from the preparing thread, the analysis' stages from the computing thread that analyses it, ``upload`` from the
finishing thread (as each file completes), one stage after the other and never at once, so the reporter needs no
lock.

Every report is a checkpoint (:meth:`gpu_worker.attempt.AttemptGuard.check`): each write returns the job, so a
cancellation requested through the API (``cancel_requested_at``) is seen within about ``interval`` of a report, and
the attempt stops there with :class:`~gpu_worker.settlement.Cancelled`; a write refused (another attempt took the
job) stops it with :class:`~gpu_worker.settlement.AttemptLost`. Progress is best-effort: a database error while
writing never fails the job; it is logged once per stage and writing pauses for ``backoff`` seconds (a write while
the database is down waits for the pool's timeout).
"""

from __future__ import annotations

import logging
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


class Guard(Protocol):
    """What the reporter needs of :class:`gpu_worker.attempt.AttemptGuard`."""

    job_id: UUID
    attempt: int

    def check(self) -> None: ...
    def observe(self, job: Job | None) -> None: ...


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
        self._jobs = jobs
        self._guard = guard
        self._notifier = notifier
        self._interval = interval
        self._backoff = backoff
        self._clock = clock
        self._stage = -1  # the furthest stage reported
        self._written = -1  # the furthest stage written
        self._last_write = -float("inf")
        self._paused_until = -float("inf")
        self._logged: set[str] = set()  # stages whose write failure was logged
        self._extra = {"job_id": str(guard.job_id), "attempt": guard.attempt}

    def report(self, stage: str, fraction: float = 0.0) -> None:
        """Record that the attempt is at ``stage`` (one of :data:`STAGES`), ``fraction`` (0 to 1) of it done; write
        it when due; raise ``Cancelled`` or ``AttemptLost`` if the attempt is to stop."""
        index = _ORDER[stage]
        if index >= self._stage:
            self._stage = index
            now = self._clock()
            new = index > self._written
            if (new or now - self._last_write >= self._interval) and now >= self._paused_until:
                self._write(stage, min(max(fraction, 0.0), 1.0), now, notify=new)
        self._guard.check()

    def _write(self, stage: str, fraction: float, now: float, *, notify: bool) -> None:
        job_id, attempt = self._guard.job_id, self._guard.attempt
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
