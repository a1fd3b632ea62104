"""The Functions' dependencies, built once, lazily, on the first request (never at import time).

Importing ``function_app`` reads no environment variable and opens no socket: the first request builds
:class:`Settings` from the app settings and the clients from those, and every later request reuses them. Tests inject
their own with :func:`use`.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from azure.core.credentials import TokenCredential

from shared.by_reference import StoredSource
from shared.confirmations import ConfirmBehind
from shared.jobs import JobStore
from shared.reconciler import DeadLetterInbox
from shared.settings import Settings
from shared.submission import BacklogGauge, Publisher

if TYPE_CHECKING:
    from shared.events import EventMessage, Outbox
    from shared.stats import QueueCounter, StatsSource
    from shared.webhooks import Verdict

DEFAULT_RETRY_AFTER = 5


class BlobStoreLike(Protocol):
    def put_input(self, job_id: UUID, data: bytes, sha256: str, *, name: str | None = None) -> str: ...
    def open_input(self, blob_name: str, etag: str | None = None) -> StoredSource: ...
    def blob_name(self, url: str) -> str | None: ...
    def upload_url(self, blob_name: str, ttl: timedelta) -> tuple[str, datetime]: ...
    def input_sha256(self, blob_name: str) -> str | None: ...
    def read_url(self, blob_url: str, ttl: timedelta) -> str: ...
    def ping(self) -> None: ...


@dataclass(frozen=True)
class Deps:
    settings: Settings
    jobs: JobStore
    blobs: BlobStoreLike
    publisher: Publisher
    dead_letters: Callable[[], AbstractContextManager[DeadLetterInbox]]  # a receiver for one reconciler run
    # Webhooks: flush after a notifying transition (and the reconciler's sweep); the status view's summary; the
    # deliver_webhook function's deliverer.
    notifier: Outbox
    webhook_summary: Callable[[UUID], dict[str, Any] | None]
    deliverer: WebhookDeliverer
    # GET /api/stats and /api/health: the database's aggregates and the queues' depths (Service Bus management API).
    stats: StatsSource
    queue_stats: QueueCounter
    # Admission control's estimate of the queued jobs (shared.submission.BacklogGauge), one per process.
    backlog: BacklogGauge = field(default_factory=BacklogGauge)
    # Where submits and batches record their sends after answering (shared.confirmations); None: inline.
    confirms: ConfirmBehind | None = None


class WebhookDeliverer(Protocol):
    """:class:`shared.delivery.Deliverer`, as ``deliver_webhook`` uses it."""

    def handle(self, message: EventMessage, *, delivery_count: int = 1) -> Verdict | None: ...


_lock = threading.Lock()
_current: Deps | None = None


def get() -> Deps:
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = build(Settings.from_env())
    return _current


def current() -> Deps | None:
    """The dependencies if they are built, without building them."""
    return _current


def use(deps: Deps | None) -> None:
    """Replace the dependencies (tests); ``None`` makes the next request build them from the environment again."""
    global _current
    with _lock:
        _current = deps


def retry_after() -> int:
    """Seconds for ``Retry-After``: the setting once built, a default before (e.g. when building failed)."""
    return _current.settings.retry_after_seconds if _current is not None else DEFAULT_RETRY_AFTER


def build(settings: Settings) -> Deps:
    # Imported here: only a request needs the SDKs, and a cold start that serves no request should not pay for them.
    from shared.bus import DeadLetterInbox, JobPublisher, servicebus_client
    from shared.db import PostgresJobStore, QuickCheck, open_pool
    from shared.delivery import Deliverer, WebhookPolicy
    from shared.events import BusEventSender, EventStore, OutboxNotifier
    from shared.queue_stats import QueueStats
    from shared.stats import PostgresStats
    from shared.storage import BlobStore
    from shared.telemetry import configure_telemetry

    configure_telemetry(settings, role="api")
    credential = _credential(settings)
    # If a later client cannot be built (a malformed connection string), close the ones already opened: every
    # request retries build(), and each failed try would otherwise leak a pool with its connections.
    with ExitStack() as opened:
        pool = open_pool(settings, credential, check=QuickCheck())
        opened.callback(pool.close)
        blobs = BlobStore.from_settings(settings, credential)
        opened.callback(blobs.close)
        client = servicebus_client(settings, credential)
        # A send that fails makes the next ones fail at once for a few seconds: submit stays fast while the bus is
        # down, and the reconciler hands over what was accepted meanwhile.
        publisher = JobPublisher(client, settings.priority_queues, timeout=settings.bus_send_timeout, cooldown=10.0)
        # The deliverer schedules next attempts on its own sender: the API's flushes (after a cancel) fail fast for a
        # while after a failed send, which must not turn the deliverer's redeliveries into instant failures.
        event_sender = BusEventSender(client, settings.job_events_queue, timeout=settings.bus_send_timeout)
        notice_sender = BusEventSender(
            client, settings.job_events_queue, timeout=settings.bus_send_timeout, cooldown=10.0
        )
        queue_stats = QueueStats.from_settings(settings, credential)
        opened.callback(queue_stats.close)
        opened.pop_all()  # built: from here on they live as long as the process
    events = EventStore(pool)
    jobs = PostgresJobStore(pool)
    confirms = ConfirmBehind(jobs)
    _close_at_exit(confirms)
    return Deps(
        settings=settings,
        jobs=jobs,
        confirms=confirms,
        blobs=blobs,
        publisher=publisher,
        dead_letters=lambda: DeadLetterInbox(client, settings.job_queues),
        notifier=OutboxNotifier(events, notice_sender),
        webhook_summary=events.summary,
        deliverer=Deliverer(events, event_sender, WebhookPolicy.from_settings(settings), signer=blobs),
        stats=PostgresStats(pool),
        queue_stats=queue_stats,
    )


_at_exit: list[ConfirmBehind] = []


def _close_at_exit(confirms: ConfirmBehind) -> None:
    """At exit, the confirms still queued are written (else left to the reconciler): the latest build's only, by one
    handler however often the dependencies are built (tests rebuild them)."""
    if not _at_exit:
        atexit.register(lambda: _at_exit[-1].close())
    _at_exit[:] = [confirms]


def _credential(settings: Settings) -> TokenCredential | None:
    """One DefaultAzureCredential shared by every client that authenticates with Entra ID, if any does."""
    keyless = (
        not settings.servicebus_connection_string or not settings.storage_connection_string or not settings.database_url
    )
    if not keyless:
        return None
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()
