"""The webhook outbox on real PostgreSQL and the Service Bus emulator: the lifecycle writes one event per notifying
transition, the notifier hands each to the job-events queue once even when two flushes race, a flush that cannot
reach the bus leaves the event to the sweep, and one delivery attempt (the Deliverer, in process) reaches a real
loopback receiver or is refused by the SSRF guard."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from azure.servicebus import ServiceBusClient, ServiceBusReceiveMode
from psycopg_pool import ConnectionPool

from shared.db import PostgresJobStore, open_pool
from shared.delivery import Deliverer, WebhookPolicy
from shared.errors import BusUnavailable
from shared.events import BusEventSender, Event, EventMessage, EventStore, OutboxNotifier, open_notifier
from shared.jobs import Callback, Job, JobStatus
from shared.migrate import migrate
from shared.reconciler import Letter, Policy, Reconciler
from shared.settings import Settings
from shared.webhooks import Verdict, new_secret
from tests.fakes import InMemoryBlobStore, InMemoryPublisher
from tests.fixtures.servicebus import EmulatorHandle
from tests.jobs import PARAMS
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

QUEUE = "job-events"


def settings_for(database_url: str, bus: str = "unused", **extra: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": database_url, "ServiceBusConnection": bus, "AzureWebJobsStorage": "unused", **extra}
    )


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    migrate(database_url)
    with open_pool(settings_for(database_url, DB_POOL_MAX_SIZE="8")) as pool:
        yield pool


@pytest.fixture
def jobs(pool: ConnectionPool) -> PostgresJobStore:
    return PostgresJobStore(pool)


@pytest.fixture
def events(pool: ConnectionPool) -> EventStore:
    return EventStore(pool)


@pytest.fixture
def bus(servicebus_emulator: EmulatorHandle) -> Iterator[ServiceBusClient]:
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as client:
        yield client


def job_with_callback(jobs: PostgresJobStore, url: str, events: list[str] | None = None, secret: str = "") -> Job:
    job, _ = jobs.create(
        job_id=uuid.uuid4(),
        input_blob="images/x/input.tif",
        input_sha256="0" * 64,
        params=PARAMS,
        idempotency_key=None,
        callback=Callback(url=url, events=events, secret=secret or new_secret()),
    )
    return job


def succeeded(jobs: PostgresJobStore, job: Job, result: dict[str, Any] | None = None) -> Job:
    claimed = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(minutes=1), max_attempts=5)
    assert claimed is not None
    done = jobs.succeed(job.job_id, claimed.attempts, result or {"analysis": "crop-health", "ndvi": 0.4})
    assert done is not None
    return done


def queued_messages(client: ServiceBusClient) -> list[tuple[str, bytes]]:
    with client.get_queue_receiver(QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        found = []
        while batch := receiver.receive_messages(max_message_count=50, max_wait_time=1):
            found += [(str(m.message_id), b"".join(m.body)) for m in batch]
    return found


def test_each_notifying_transition_writes_one_event_of_the_groups_asked_for(
    jobs: PostgresJobStore, events: EventStore
) -> None:
    everything = job_with_callback(jobs, "https://hooks.example.com/a", ["started", "progress", "completed"])
    completed_only = job_with_callback(jobs, "https://hooks.example.com/b")
    for job in (everything, completed_only):
        running = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(minutes=1), max_attempts=5)
        assert running is not None
        assert jobs.progress(job.job_id, running.attempts, {"stage": "indices", "fraction": 0.5}, notify=True)
        assert jobs.progress(job.job_id, running.attempts, {"stage": "indices", "fraction": 0.6}, notify=False)
        assert jobs.succeed(job.job_id, running.attempts, {"ndvi": 0.4})
        assert jobs.claim(job.job_id, worker_id="w2", lease=timedelta(minutes=1), max_attempts=5) is None
    types = {job.job_id: [e.type for e in events.unsent(job.job_id, timedelta(0), 10)]
             for job in (everything, completed_only)}  # fmt: skip
    assert types == {
        everything.job_id: ["job.started", "job.progress", "job.succeeded"],
        completed_only.job_id: ["job.succeeded"],
    }


def test_racing_flushes_send_each_event_once(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient, pool: ConnectionPool, database_url: str
) -> None:
    job = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a", ["started", "completed"]))
    both_read = threading.Barrier(2, timeout=30)

    class Racing(EventStore):
        """Each flush reads the unsent events before either marks them: both send every event."""

        def unsent(self, job_id: uuid.UUID | None, older_than: timedelta, limit: int) -> list[Event]:
            found = super().unsent(job_id, older_than, limit)
            both_read.wait()
            return found

    sends: list[str] = []

    class Counting(BusEventSender):
        def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
            super().send(message, at=at)
            sends.append(message.message_id)

    notifiers = [OutboxNotifier(Racing(pool), Counting(bus, QUEUE)) for _ in range(2)]
    threads = [threading.Thread(target=n.flush, args=(job,)) for n in notifiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sent = queued_messages(bus)
    rows = events.unsent(None, timedelta(0), 10)
    assert rows == []  # every event marked sent
    with psycopg.connect(database_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT event_id FROM job_events ORDER BY created_at").fetchall()]
    assert len(ids) == 2  # job.started, job.succeeded: one row per transition
    assert sorted(sends) == sorted(f"{i}:1" for i in ids * 2)  # both flushes sent every event...
    assert sorted(message_id for message_id, _ in sent) == sorted(f"{i}:1" for i in ids)  # ...the queue kept one
    assert {EventMessage.decode(body) for _, body in sent} == {EventMessage(event_id=i, attempt=1) for i in ids}


def test_a_flush_that_cannot_reach_the_bus_does_not_raise_and_the_sweep_sends_it(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient, servicebus_emulator: EmulatorHandle
) -> None:
    job = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as broken:
        OutboxNotifier(events, BusEventSender(broken, "no-such-queue", timeout=2)).flush(job)  # logs only
    [left] = events.unsent(None, timedelta(0), 10)
    assert left.job_id == job.job_id
    outbox = OutboxNotifier(events, BusEventSender(bus, QUEUE))
    assert outbox.sweep(timedelta(hours=1), 10) == 0  # not old enough: its notifier may still be at it
    assert outbox.sweep(timedelta(0), 10) == 1
    assert outbox.sweep(timedelta(0), 10) == 0
    assert [m for m, _ in queued_messages(bus)] == [f"{left.event_id}:1"]


def test_a_flush_asks_the_database_nothing_for_a_job_without_a_callback(
    jobs: PostgresJobStore, database_url: str, bus: ServiceBusClient, caplog: pytest.LogCaptureFixture
) -> None:
    plain = succeeded(jobs, jobs.create(job_id=uuid.uuid4(), input_blob="x", input_sha256="0" * 64,
                                        params=PARAMS, idempotency_key=None)[0])  # fmt: skip
    hooked = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a"))
    with open_pool(settings_for(database_url)) as closed:
        pass  # any query on it fails: a flush that asks logs a warning
    notifier = OutboxNotifier(EventStore(closed), BusEventSender(bus, QUEUE))
    with caplog.at_level(logging.WARNING, logger="shared.events"):
        notifier.flush(plain)
        assert [r for r in caplog.records if r.name == "shared.events"] == []
        notifier.flush(hooked)
    [warning] = [r for r in caplog.records if r.name == "shared.events"]  # the job with a callback, looked up
    assert warning.getMessage().startswith(f"job {hooked.job_id}: webhook events not handed over: ")


def test_the_summary_counts_deliveries_and_attempts(jobs: PostgresJobStore, events: EventStore) -> None:
    plain, _ = jobs.create(job_id=uuid.uuid4(), input_blob="b", input_sha256="0" * 64, params=PARAMS,
                           idempotency_key=None)  # fmt: skip
    assert events.summary(plain.job_id) is None  # no callback, no webhook section
    job = succeeded(
        jobs, job_with_callback(jobs, "https://hooks.example.com/in/t0ken?token=s3cret", ["started", "completed"])
    )
    started, done = events.unsent(job.job_id, timedelta(0), 10)
    assert events.summary(job.job_id) == {
        "url": "https://hooks.example.com", "events": ["started", "completed"], "deliveries": 2,
        "attempts": 0, "last_status": None, "last_attempt_at": None, "delivered": 0, "pending": 2, "gave_up": 0,
    }  # fmt: skip
    events.record_attempt(started.event_id, 1, status=None, error="ConnectError", delivered=False, gave_up=False)
    events.record_attempt(started.event_id, 2, status=200, error=None, delivered=True, gave_up=False)
    events.record_attempt(done.event_id, 1, status=410, error="HTTP 410", delivered=False, gave_up=True)
    summary = events.summary(job.job_id)
    assert summary is not None
    assert {k: summary[k] for k in ("attempts", "last_status", "delivered", "pending", "gave_up")} == {
        "attempts": 3, "last_status": 410, "delivered": 1, "pending": 0, "gave_up": 1,
    }  # fmt: skip
    assert summary["last_attempt_at"] is not None
    assert events.unsent(None, timedelta(0), 10) == []  # an event the deliverer saw counts as handed over


class RefuseToSend:
    def send(self, message: EventMessage, *, at: object = None) -> None:
        raise AssertionError(f"no next attempt expected, got {message}")


def policy(allow_private: bool) -> WebhookPolicy:
    return WebhookPolicy(max_attempts=3, backoff=timedelta(seconds=1), backoff_max=timedelta(seconds=2), timeout=2.0,
                         allow_private=allow_private, result_url_ttl=timedelta(hours=1))  # fmt: skip


def test_one_attempt_reaches_a_loopback_receiver_signed_with_the_jobs_secret(
    jobs: PostgresJobStore, events: EventStore
) -> None:
    secret = new_secret()
    with WebhookReceiver() as receiver:
        job = succeeded(jobs, job_with_callback(jobs, receiver.url("/ok", secret=secret), secret=secret), {"ndvi": 0.4})
        [event] = events.unsent(job.job_id, timedelta(0), 10)
        verdict = Deliverer(events, RefuseToSend(), policy(True)).handle(
            EventMessage(event_id=event.event_id, attempt=1)
        )
        [got] = receiver.at("/ok")
    assert verdict is Verdict.DELIVERED
    assert got.verified is True
    assert got.headers["webhook-id"] == str(event.event_id)
    assert got.json()["type"] == "job.succeeded"
    assert got.json()["data"] == {
        "job_id": str(job.job_id),
        "status": "succeeded",
        "attempt": 1,
        "result": {"ndvi": 0.4},
    }
    again = Deliverer(events, RefuseToSend(), policy(True)).handle(EventMessage(event_id=event.event_id, attempt=1))
    assert again is None  # already delivered: a redelivered message POSTs nothing


def test_the_ssrf_guard_refuses_a_loopback_target_in_production(jobs: PostgresJobStore, events: EventStore) -> None:
    with WebhookReceiver() as receiver:
        job = succeeded(jobs, job_with_callback(jobs, receiver.url("/internal")))  # stored by a local-dev submit
        [event] = events.unsent(job.job_id, timedelta(0), 10)
        verdict = Deliverer(events, RefuseToSend(), policy(False)).handle(
            EventMessage(event_id=event.event_id, attempt=1)
        )
        assert receiver.at("/internal") == []
    assert verdict is Verdict.GIVE_UP  # no attempt can help, and nothing to dead-letter
    summary = events.summary(job.job_id)
    assert summary is not None
    assert (summary["gave_up"], summary["last_status"], summary["attempts"]) == (1, None, 1)


class NoLetters:
    def receive(self, max_count: int) -> list[Letter]:
        return []

    def complete(self, letter: Letter) -> None:
        raise AssertionError("no letter to complete")


def test_the_reconciler_cancels_an_abandoned_cancellation_and_hands_its_event_over(
    jobs: PostgresJobStore, events: EventStore, bus: ServiceBusClient
) -> None:
    job = job_with_callback(jobs, "https://hooks.example.com/a")
    running = jobs.claim(job.job_id, worker_id="w1", lease=timedelta(seconds=-1), max_attempts=5)  # its worker died
    assert running is not None
    assert jobs.request_cancel(job.job_id) is not None
    outbox = OutboxNotifier(events, BusEventSender(bus, QUEUE))
    policy = Policy(resend_after=timedelta(hours=1), max_attempts=5, batch=10, abort_after=timedelta(hours=1))
    report = Reconciler(jobs, InMemoryBlobStore(), InMemoryPublisher(), NoLetters(), policy, outbox=outbox).run()
    assert (report.cancelled, report.errors) == (1, [])
    now = jobs.get(job.job_id)
    assert now is not None
    assert now.status is JobStatus.CANCELLED
    [(message_id, body)] = queued_messages(bus)
    event = EventMessage.decode(body)
    assert message_id == f"{event.event_id}:1"
    delivery = events.delivery(event.event_id)
    assert delivery is not None
    assert (delivery.type, delivery.payload["status"]) == ("job.cancelled", "cancelled")
    assert events.unsent(None, timedelta(0), 10) == []


# A retry chain cannot be lost


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[EventMessage, datetime | None]] = []

    def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
        self.sent.append((message, at))


class FailingSender:
    """The job-events queue while the bus is down: every send fails, and is counted."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
        self.tried.append(message.message_id)
        raise BusUnavailable("the bus is down")


def test_a_next_attempt_that_cannot_be_sent_is_resent_by_redeliveries_then_by_the_reconciler(
    jobs: PostgresJobStore, events: EventStore, database_url: str
) -> None:
    """Attempt 1 fails and is recorded, then the send of attempt 2's message fails on each of the message's
    deliveries (MaxDeliveryCount 3): no delivery POSTs again or takes attempt 1 for stale and drops the chain, and once
    attempt 2 is long overdue the reconciler sends it; its delivery POSTs attempt 2."""
    secret = new_secret()
    with WebhookReceiver() as receiver:
        job = succeeded(jobs, job_with_callback(jobs, receiver.url("/down", secret=secret, always=503), secret=secret))
        [event] = events.unsent(job.job_id, timedelta(0), 10)
        down = FailingSender()
        first = EventMessage(event_id=event.event_id, attempt=1)
        for _ in range(3):  # the delivery and the host's two redeliveries after each abandon
            with pytest.raises(BusUnavailable):
                Deliverer(events, down, policy(True)).handle(first)
        assert len(receiver.at("/down")) == 1  # one POST: the redeliveries only tried to send attempt 2 again
        assert down.tried == [f"{event.event_id}:2"] * 3  # the same id: a send that did go through is deduplicated
        stalled = events.delivery(event.event_id)
        assert stalled is not None
        assert (stalled.attempts, stalled.next_attempt, stalled.delivered_at, stalled.gave_up_at) == (1, 2, None, None)

        queue = RecordingSender()
        outbox = OutboxNotifier(events, queue)  # the reconciler's
        assert outbox.resume(timedelta(minutes=15), 10) == 0  # attempt 2 is due in a second: not stalled
        with psycopg.connect(database_url) as conn:  # an hour later
            conn.execute("UPDATE job_events SET next_attempt_at = next_attempt_at - interval '1 hour'")
        assert outbox.resume(timedelta(minutes=15), 10) == 1
        assert outbox.resume(timedelta(minutes=15), 10) == 0  # due again from now on
        [(resent, at)] = queue.sent
        assert (resent.message_id, at) == (f"{event.event_id}:2:r1", None)
        sent = RecordingSender()
        assert Deliverer(events, sent, policy(True)).handle(resent) is Verdict.RETRY
        assert len(receiver.at("/down")) == 2
    assert [m.message_id for m, _ in sent.sent] == [f"{event.event_id}:3"]
    after = events.delivery(event.event_id)
    assert after is not None
    assert (after.attempts, after.next_attempt) == (2, 3)


def test_the_next_attempt_only_moves_forward(jobs: PostgresJobStore, events: EventStore) -> None:
    job = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a"))
    [event] = events.unsent(job.job_id, timedelta(0), 10)
    events.mark_sent(event.event_id)
    handed = events.delivery(event.event_id)
    assert handed is not None
    assert (handed.next_attempt, handed.next_attempt_at is not None) == (1, True)  # attempt 1 is due now
    due = datetime.now(UTC) + timedelta(seconds=20)
    events.record_attempt(event.event_id, 2, status=500, error="HTTP 500", delivered=False, gave_up=False, next_at=due)
    late = datetime.now(UTC) + timedelta(seconds=5)  # a late copy of attempt 1 records its POST after attempt 2's
    events.record_attempt(event.event_id, 1, status=500, error="HTTP 500", delivered=False, gave_up=False, next_at=late)
    now = events.delivery(event.event_id)
    assert now is not None
    assert (now.attempts, now.next_attempt, now.next_attempt_at) == (2, 3, due)
    events.record_attempt(event.event_id, 3, status=200, error=None, delivered=True, gave_up=False)
    done = events.delivery(event.event_id)
    assert done is not None
    assert (done.next_attempt, done.next_attempt_at, done.delivered_at is not None) == (4, None, True)


def test_after_a_failed_send_a_workers_flushes_fail_fast(
    jobs: PostgresJobStore, events: EventStore, pool: ConnectionPool, servicebus_emulator: EmulatorHandle,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    first = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/a"))
    second = succeeded(jobs, job_with_callback(jobs, "https://hooks.example.com/b"))
    with ServiceBusClient.from_connection_string(servicebus_emulator.connection_string) as broken:
        notifier = open_notifier(pool, broken, "no-such-queue", timeout=2)  # the worker's notifier
        notifier.flush(first)
        started = time.monotonic()
        notifier.flush(second)
        elapsed = time.monotonic() - started
    failures = [r.getMessage() for r in caplog.records if getattr(r, "action", None) == "flush_failed"]
    assert len(failures) == 2
    assert "not trying again yet" in failures[1]  # no send was tried: the flush did not wait on the bus
    assert elapsed < 0.5, elapsed
    assert {e.job_id for e in events.unsent(None, timedelta(0), 10)} == {first.job_id, second.job_id}  # the sweep's
