"""A claimed attempt while it runs: its lease kept alive, its time limit enforced, its loss noticed.

:class:`AttemptGuard` is a context manager around the analysis. Its thread wakes every third of ``JOB_LEASE``:

* it renews the lease (``renew_lease``, fenced by the attempt number). A renewal that moves nothing means another
  claim took the job over (after this worker stalled past its lease) or the job ended (the reconciler cancelled it):
  :meth:`check`, called at every checkpoint (between stages, and at each progress report,
  :mod:`gpu_worker.progress`), then raises :class:`~gpu_worker.settlement.AttemptLost`. A renewed job whose
  cancellation was requested (``cancel_requested_at``) makes :meth:`check` raise
  :class:`~gpu_worker.settlement.Cancelled`; a progress write tells the same (:meth:`observe`), more often. A renewal
  that fails (the database is down) is retried at the next tick; if the lease runs out meanwhile, another delivery
  may take over, and this attempt's writes are refused from then on.
* past ``JOB_TIMEOUT`` it fails the attempt ``timed_out`` and interrupts it with
  :class:`~gpu_worker.settlement.TimedOut` (``interrupt``: the consumer raises it in the main thread when the attempt
  is the one analysing there, :meth:`gpu_worker.shutdown.Shutdown.interrupt`, delivered between two bytecodes;
  otherwise the attempt's next checkpoint raises it). A call that never returns to Python (a hung read, a GPU
  kernel) cannot be interrupted that way: if the attempt is still running ``hard_exit_after`` seconds later, the
  process exits with :data:`EXIT_TIMED_OUT` and its supervisor (Docker's restart policy, the scale set's health
  extension) starts a fresh one. Meanwhile the heartbeat file shows the overrun, so ``--healthcheck`` reports
  unhealthy.

The guard runs from the claim to the settlement. The time limit counts the attempt's own work (downloading,
analysing, uploading), not its waits in the pipeline (:mod:`gpu_worker.pipeline`) for a computing thread or the
finishing thread: :meth:`AttemptGuard.pause` stops the clock, :meth:`AttemptGuard.resume` starts it again (and wakes
the guard's thread, so that the limit is enforced on time); the lease is renewed all along. A timed-out attempt that
is paused has stopped: it waits for its settlement, and the process does not exit for it.

``forced`` (the shutdown's :attr:`~gpu_worker.shutdown.Shutdown.forced`): once it is set, :meth:`check` raises
:class:`~gpu_worker.settlement.Interrupted`, so a download or an upload (which poll their checkpoint) stops as
promptly as the analysis, which the shutdown interrupts by a signal in the main thread (at its next checkpoint in
another computing thread). ``on_stop``: called once, from whichever thread
saw it, when the attempt is seen lost or its cancellation requested (the consumer settles a flight that is waiting
for its turn at once, :meth:`gpu_worker.pipeline.Pipeline.withdraw`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

from gpu_worker.settlement import TIMED_OUT_CODE, AttemptLost, Cancelled, Interrupted, TimedOut
from shared.errors import CropAIError
from shared.jobs import Job, JobStore

logger = logging.getLogger(__name__)

EXIT_TIMED_OUT = 75  # EX_TEMPFAIL: the supervisor restarts the worker


class AttemptGuard:
    def __init__(
        self,
        jobs: JobStore,
        job: Job,
        *,
        lease: timedelta,
        timeout: timedelta,
        interrupt: Callable[[BaseException], None],
        hard_exit_after: float,
        exit_process: Callable[[int], None] = os._exit,
        forced: threading.Event | None = None,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self._jobs = jobs
        self.job_id = job.job_id
        self.attempt = job.attempts
        self._lease = lease
        self._timeout = timeout.total_seconds()
        self._interrupt = interrupt
        self._hard_exit_after = hard_exit_after
        self._exit_process = exit_process
        self._forced = forced
        self._on_stop = on_stop
        self._done = threading.Event()
        self._wake = threading.Event()  # the deadline moved (resume) or the attempt is done: the thread looks again
        self._idle = threading.Event()  # no code of the attempt runs: paused, or done
        self._clock = threading.Lock()  # the deadline, the pause and the deferred call, read by the guard's thread
        self._deadline = float("inf")
        self._paused_at: float | None = None
        self._deferred: tuple[float, Callable[[], None]] | None = None  # (when, what) the thread is to call
        self.lost = threading.Event()
        self.cancel_requested = threading.Event()
        self.timed_out = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"attempt-{job.job_id}", daemon=True)
        self._extra = {"job_id": str(job.job_id), "attempt": self.attempt}
        self._timed_out_message = f"attempt {self.attempt} ran past the time limit of {self._timeout:g} s"

    def __enter__(self) -> AttemptGuard:
        self._deadline = time.monotonic() + self._timeout
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self._idle.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (a failed __enter__ never started it)
            self._thread.join()

    def pause(self) -> None:
        """The attempt waits for its turn (none of its code runs): its time limit stops counting until
        :meth:`resume`, and once it has timed out, it has stopped (no hard exit)."""
        with self._clock:
            if self._paused_at is None:
                self._paused_at = time.monotonic()
            self._idle.set()

    def resume(self) -> None:
        with self._clock:
            if self._paused_at is not None:
                self._deadline += time.monotonic() - self._paused_at
                self._paused_at = None
            self._idle.clear()
        self._wake.set()

    def defer(self, delay: float, call: Callable[[], None]) -> None:
        """Have the guard's thread call ``call`` in ``delay`` seconds (a kept progress report,
        :meth:`gpu_worker.progress.Progress.flush`), unless the attempt has ended by then; a later request replaces
        an earlier one."""
        with self._clock:
            self._deferred = (time.monotonic() + delay, call)
        self._wake.set()

    def _take_deferred(self) -> tuple[float, Callable[[], None] | None]:
        """The deferred call when it is due (taken), else when it will be."""
        with self._clock:
            if self._deferred is None:
                return float("inf"), None
            at, call = self._deferred
            if time.monotonic() < at:
                return at, None
            self._deferred = None
            return at, call

    def _remaining(self) -> float:
        """Seconds left before the time limit (infinite while paused)."""
        with self._clock:
            return float("inf") if self._paused_at is not None else self._deadline - time.monotonic()

    def check(self) -> None:
        """At a checkpoint: stop if the time limit passed (the interruption may not have arrived yet), if a
        cancellation was requested, if the attempt no longer holds the job, or if the shutdown was forced."""
        if self.timed_out.is_set():
            raise TimedOut(self._timed_out_message)
        if self.cancel_requested.is_set():
            raise Cancelled(f"attempt {self.attempt} of job {self.job_id} stopped: cancellation requested")
        if self.lost.is_set():
            raise AttemptLost(f"attempt {self.attempt} of job {self.job_id} no longer holds the job")
        if self._forced is not None and self._forced.is_set():
            raise Interrupted(f"shutdown forced during attempt {self.attempt} of job {self.job_id}")

    def observe(self, job: Job | None) -> None:
        """What a fenced write of this attempt returned (a renewal, a progress report): ``None``, the attempt no
        longer holds the job; a job whose cancellation was requested, the attempt is to stop."""
        if job is None:
            if not self.lost.is_set():
                self.lost.set()
                logger.warning("job %s: attempt %d no longer holds the job", self.job_id, self.attempt,
                               extra={**self._extra, "action": "attempt_lost"})  # fmt: skip
                self._on_stop()
        elif job.cancel_requested_at is not None and not self.cancel_requested.is_set():
            self.cancel_requested.set()
            logger.info("job %s: cancellation requested; attempt %d stops at its next checkpoint", self.job_id,
                        self.attempt, extra={**self._extra, "action": "cancel_seen"})  # fmt: skip
            self._on_stop()

    def _run(self) -> None:
        tick = max(self._lease.total_seconds() / 3, 0.05)
        renew_at = time.monotonic() + tick
        deferred_at = float("inf")
        while True:
            now = time.monotonic()
            self._wake.wait(max(min(renew_at - now, self._remaining(), deferred_at - now), 0.0))
            self._wake.clear()
            if self._done.is_set():
                return
            if self._remaining() <= 0:
                self._time_out()
                return
            if time.monotonic() >= renew_at:  # a failed renewal is retried soon: the lease is running out
                renew_at = time.monotonic() + (tick if self._renew() else tick / 4)
            deferred_at, call = self._take_deferred()
            while call is not None:  # a call may defer another, due at once (or a report deferred meanwhile)
                self._call(call)
                deferred_at, call = self._take_deferred()

    def _call(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:  # a bug: the thread must live on (lease, time limit, hard exit)
            logger.exception("job %s: a deferred call failed", self.job_id, extra={**self._extra, "action": "deferred"})

    def _renew(self) -> bool:
        """Renew the lease; ``False`` when the renewal could not be made (try again soon)."""
        try:
            renewed = self._jobs.renew_lease(self.job_id, self.attempt, self._lease)
        except Exception as e:  # DatabaseUnavailable, or a bug: the thread must live on (time limit, hard exit)
            logger.warning("lease renewal failed: %s", e, exc_info=not isinstance(e, CropAIError),
                           extra={**self._extra, "action": "lease_renew_failed"})  # fmt: skip
            return False
        self.observe(renewed)
        return True

    def _time_out(self) -> None:
        message = self._timed_out_message
        self.timed_out.set()
        logger.error("job %s: %s; stopping it", self.job_id, message, extra={**self._extra, "action": "timed_out"})
        try:
            self._jobs.fail(self.job_id, self.attempt, TIMED_OUT_CODE, message)
        except CropAIError as e:  # the settlement fails it again; failing that, the lease runs out
            logger.warning(
                "could not fail the timed-out attempt: %s", e, extra={**self._extra, "action": "fail_job_failed"}
            )
        self._interrupt(TimedOut(message))
        if not self._idle.wait(self._hard_exit_after):  # stopped (paused for its settlement), or settled
            logger.critical(
                "job %s: the attempt did not stop %g s after its time limit; exiting for a restart",
                self.job_id, self._hard_exit_after, extra={**self._extra, "action": "exit_timed_out"},
            )  # fmt: skip
            logging.shutdown()
            self._exit_process(EXIT_TIMED_OUT)
