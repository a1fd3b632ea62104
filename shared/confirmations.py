"""Send confirmations written behind the API's answer.

:func:`shared.submission.hand_over` sends a generation's message, then records the send on the job's row
(``confirm_sent``). That record changes nothing for the job itself: it is ``queued`` and claimable either way, and the
first delivered message claims it. It only tells the reconciler not to send a new generation after
``RECONCILE_RESEND_AFTER`` (2 minutes by default). So a submit need not wait for it: the API's submits and batches
queue their confirms here and answer at once; one background thread per process writes them, one statement each, as
the request would have. (A manual retry, the reconciler and the worker confirm inline.)

A confirm that never lands (the database failed it, or the process ended with it queued) costs what a failed confirm
always cost: after ``RECONCILE_RESEND_AFTER`` the reconciler sends a new generation, and whichever message comes
second finds the job claimed and is dropped (:mod:`shared.lifecycle`). Nothing is lost and nothing runs twice; a
worker may receive one message more.

Until it lands, the job reads as unconfirmed: an ``Idempotency-Key`` replay in that millisecond or so uploads the
image and sends the same message again, as a replay of an unconfirmed job always does (the blob is kept, not
overwritten, and duplicate detection drops the message).

Bounded: at most ``max_pending`` confirms wait. Past that (the database is slower than the submits) the request
confirms inline, as before, so a backlog of confirms cannot grow without bound. :meth:`ConfirmBehind.close` (the
Function App registers it at exit) writes what is queued, within a timeout, when the interpreter exits normally; a
process that is killed loses what is queued, to the reconciler.

Measured (``bench.submit_overhead``, alternated pairs): ``docs/performance.md``, "Submit and status against raw I/O".
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from shared.errors import DatabaseUnavailable
from shared.jobs import Job, JobStore

log = logging.getLogger(__name__)

MAX_PENDING = 1000

Confirm = Callable[[Job], Job]  # records a job's send: inline (confirm_now) or behind (ConfirmBehind.confirm)


def confirm_now(job: Job, jobs: JobStore) -> Job:
    """Record the send of ``job``'s current generation on its row; the job as it now is. A failure is logged and
    left to the reconciler (the message is on its way)."""
    return _record(job, jobs, reread=True)


def _record(job: Job, jobs: JobStore, *, reread: bool) -> Job:
    """``confirm_sent``; the job as it now is (re-read if it had moved on, claimed or resent, when ``reread``), or as
    given when the database failed."""
    try:
        moved = jobs.confirm_sent(job.job_id, job.generation)
        return moved or (jobs.get(job.job_id) if reread else None) or job
    except DatabaseUnavailable as e:  # the message is on its way; at worst the reconciler sends a new generation
        extra = {"job_id": str(job.job_id), "action": "confirm_sent"}
        log.warning("job %s: sent, but the send is not recorded: %s", job.job_id, e.message, extra=extra)
        return job


class ConfirmBehind:
    """Confirms sends in a background thread (started on first use, again if it died); ``confirm(job)`` returns
    ``job`` unchanged."""

    def __init__(self, jobs: JobStore, *, max_pending: int = MAX_PENDING) -> None:
        self._jobs = jobs
        self._queue: queue.Queue[Job | None] = queue.Queue(max_pending)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def confirm(self, job: Job) -> Job:
        with self._lock:  # no confirm is queued once close() has begun
            if not self._closed:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="confirm-behind", daemon=True)
                    self._thread.start()
                try:
                    self._queue.put_nowait(job)
                    return job
                except queue.Full:  # the database is slower than the submits: this request waits for its own
                    pass
        return confirm_now(job, self._jobs)

    def flush(self, timeout: float) -> bool:
        """Wait until every confirm queued so far is written (or dropped); ``False`` if ``timeout`` passed first."""
        with self._queue.all_tasks_done:  # Queue.join, with a timeout
            return self._queue.all_tasks_done.wait_for(lambda: not self._queue.unfinished_tasks, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop, within ``timeout`` seconds in all (a confirm still waiting then is the
        reconciler's); later confirms are written inline. A second call does nothing."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed, thread = True, self._thread
        if thread is None:
            return
        if not self.flush(timeout):
            log.warning("%d send confirmations left to the reconciler at exit", self._queue.qsize(),
                        extra={"action": "confirm_sent"})  # fmt: skip
        with contextlib.suppress(queue.Full):  # full: the thread is stuck on the database; it is a daemon
            self._queue.put_nowait(None)
        thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                _record(job, self._jobs, reread=False)
            except Exception:  # never let one bad row stop the thread: that job is the reconciler's
                log.exception("job %s: confirming the send failed", job.job_id, extra={"action": "confirm_sent"})
            finally:
                self._queue.task_done()
        self._queue.task_done()
