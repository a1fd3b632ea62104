"""Webhook events: the outbox rows (``job_events``) the lifecycle's notifying events write, handed to the job-events
queue by whoever made the transition (:class:`Notifier`), and swept by the reconciler when that hand-over failed."""

from __future__ import annotations

from typing import Protocol
from uuid import UUID


class Notifier(Protocol):
    def flush(self, job_id: UUID) -> None:
        """Hand the job's unsent events to the job-events queue; never raises (the reconciler sweeps what is left)."""
        ...
