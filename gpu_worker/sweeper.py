"""Jobs whose submit died between inserting the row and sending the message are sent again.

A ``queued`` job never recorded as sent (``enqueued_at`` unset, :meth:`~shared.jobs.JobRepository.stale_unsent`)
and older than ``older_than`` is an orphan: the Function instance that created it died (or was recycled) before
the send. Nobody else will ever send its message, so the worker does, with :func:`shared.submission.resend`
(re-sent when the input blob is there, else failed with ``enqueue_failed``).

* ``older_than`` (default 5 minutes) is far longer than a submit takes, send retries included, so a submit still
  in flight is not raced; if it were, the queue's duplicate detection drops the second message (``message_id`` =
  job id) and the worker skips a job that is no longer ``queued``.
* Like the dead-letter watcher it runs in the consumer's thread between batches (``sweep_if_due``): the SDK's
  clients are not thread-safe, and a sweep is short (at most ``limit`` jobs).
* A database, storage or bus error ends the sweep; the next one tries again (nothing is lost meanwhile: the job
  is still ``queued`` with ``enqueued_at`` unset). Several workers may sweep at once: at worst a message is sent
  twice, which duplicate detection and the handler's terminal-job check absorb.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from shared.errors import CropAIError
from shared.jobs import JobRepository
from shared.submission import InputChecker, Publisher, resend

logger = logging.getLogger(__name__)

DEFAULT_OLDER_THAN = timedelta(minutes=5)
DEFAULT_LIMIT = 100


class OrphanSweeper:
    def __init__(
        self,
        repo: JobRepository,
        store: InputChecker,
        publisher: Publisher,
        *,
        interval: float,
        older_than: timedelta = DEFAULT_OLDER_THAN,
        limit: int = DEFAULT_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repo
        self._store = store
        self._publisher = publisher
        self._interval = interval
        self._older_than = older_than
        self._limit = limit
        self._clock = clock
        self._next_sweep = 0.0

    def sweep_if_due(self) -> int:
        """Sweep when ``interval`` seconds have passed since the last sweep (never when the interval is 0)."""
        if self._interval <= 0 or self._clock() < self._next_sweep:
            return 0
        self._next_sweep = self._clock() + self._interval
        return self.sweep()

    def sweep(self) -> int:
        """Send the messages of orphaned jobs again; return how many were sent."""
        sent = 0
        try:
            for job in self._repo.stale_unsent(self._older_than, self._limit):
                sent += resend(job, self._store, self._publisher, self._repo)
        except CropAIError as e:  # transient: the next sweep tries again
            logger.warning("orphan sweep stopped: %s", e, extra={"action": "sweep_failed"})
        if sent:
            logger.warning("sent %d orphaned jobs again", sent, extra={"action": "swept"})
        return sent
