"""The store's state machine on its own: no network, the clock passed in."""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus._pyamqp import _decode, _encode
from azure.servicebus._transport._pyamqp_transport import PyamqpTransport

from local.servicebus_emulator.codec import MessageParts, split_message
from local.servicebus_emulator.config import QueueConfig
from local.servicebus_emulator.store import DLQ_SUFFIX, Outcome, QueueRuntime, State, Store, StoredMessage

QUEUE = QueueConfig(
    name="jobs",
    lock_duration=timedelta(seconds=10),
    max_delivery_count=3,
    default_message_time_to_live=timedelta(seconds=100),
    dead_lettering_on_message_expiration=True,
    requires_duplicate_detection=True,
    duplicate_detection_history_time_window=timedelta(seconds=60),
)
LOCK = 10_000


def _parts(body: str = "b", **kwargs: object) -> MessageParts:
    message = ServiceBusMessage(body, **kwargs)  # type: ignore[arg-type]
    amqp = PyamqpTransport.to_outgoing_amqp_message(message._raw_amqp_message)
    return split_message(bytes(_encode.encode_payload(bytearray(), amqp)))


def _decoded(message: StoredMessage) -> object:
    return _decode.decode_payload(memoryview(message.encoded()))


def _token(message: StoredMessage) -> uuid.UUID:
    assert message.lock_token is not None
    return message.lock_token


@pytest.fixture
def store() -> Store:
    return Store(":memory:", [QUEUE])


def test_lock_complete(store: Store) -> None:
    store.enqueue(QUEUE, _parts(), now=0)
    (message,) = store.lock_next("jobs", 10, LOCK, now=1)
    assert store.lock_next("jobs", 10, LOCK, now=2) == []
    assert message.lock_token is not None
    assert store.settle("jobs", message.lock_token, Outcome.COMPLETE, now=3)
    assert not store.settle("jobs", message.lock_token, Outcome.COMPLETE, now=4)  # already gone
    assert store.count("jobs") == 0


@pytest.mark.parametrize(("outcome", "count"), [(Outcome.ABANDON, 1), (Outcome.RELEASE, 0)])
def test_abandon_counts_a_delivery_release_does_not(store: Store, outcome: Outcome, count: int) -> None:
    store.enqueue(QUEUE, _parts(), now=0)
    (message,) = store.lock_next("jobs", 1, LOCK, now=1)
    assert message.lock_token is not None
    assert store.settle("jobs", message.lock_token, outcome, now=2)
    (again,) = store.lock_next("jobs", 1, LOCK, now=3)
    assert again.delivery_count == count


def test_lock_expiry_redelivers_then_dead_letters_at_max_delivery_count(store: Store) -> None:
    store.enqueue(QUEUE, _parts(), now=0)
    now = 0
    for attempt in range(QUEUE.max_delivery_count):
        (message,) = store.lock_next("jobs", 1, LOCK, now=now)
        assert message.delivery_count == attempt
        now += LOCK
        assert message.lock_token is not None
        assert not store.settle("jobs", message.lock_token, Outcome.COMPLETE, now=now)  # the lock expired
        store.sweep(now)
    assert store.count("jobs") == 0
    (dead,) = store.lock_next("jobs" + DLQ_SUFFIX, 1, LOCK, now=now)
    props = _decoded(dead).application_properties  # type: ignore[attr-defined]
    assert props[b"DeadLetterReason"] == b"MaxDeliveryCountExceeded"


@pytest.mark.parametrize("dead_letter", [True, False])
def test_ttl_expiry(dead_letter: bool) -> None:
    queue = QueueConfig(name="q", dead_lettering_on_message_expiration=dead_letter)
    store = Store(":memory:", [queue])
    store.enqueue(queue, _parts(time_to_live=timedelta(seconds=1)), now=0)
    assert store.lock_next("q", 1, LOCK, now=1_000) == []  # expired messages are never delivered
    store.sweep(1_000)
    assert store.count("q") == 0
    assert store.count("q" + DLQ_SUFFIX) == (1 if dead_letter else 0)


def test_duplicate_detection_window(store: Store) -> None:
    assert store.enqueue(QUEUE, _parts(message_id="a"), now=0) is not None
    assert store.enqueue(QUEUE, _parts(message_id="a"), now=59_999) is None
    store.sweep(60_000)
    assert store.enqueue(QUEUE, _parts(message_id="a"), now=60_000) is not None


def test_defer_and_receive_by_sequence_number(store: Store) -> None:
    seq = store.enqueue(QUEUE, _parts(), now=0)
    assert seq is not None
    (message,) = store.lock_next("jobs", 1, LOCK, now=1)
    assert message.lock_token is not None
    assert store.settle("jobs", message.lock_token, Outcome.DEFER, now=2)
    assert store.lock_next("jobs", 1, LOCK, now=3) == []
    (deferred,) = store.lock_deferred("jobs", [seq], LOCK, now=4)
    assert deferred.lock_token is not None
    assert store.settle("jobs", deferred.lock_token, Outcome.ABANDON, now=5)  # back to deferred
    assert store.lock_next("jobs", 1, LOCK, now=6) == []
    assert len(store.lock_deferred("jobs", [seq], LOCK, now=7)) == 1


def test_renew_extends_only_a_live_lock(store: Store) -> None:
    store.enqueue(QUEUE, _parts(), now=0)
    (message,) = store.lock_next("jobs", 1, LOCK, now=0)
    assert message.lock_token is not None
    assert store.renew("jobs", message.lock_token, LOCK, now=9_000) == 19_000
    assert store.settle("jobs", message.lock_token, Outcome.COMPLETE, now=18_000)
    assert store.renew("jobs", message.lock_token, LOCK, now=18_001) is None


def _scheduled(at_ms: int) -> MessageParts:
    return replace(_parts(), annotations={b"x-opt-scheduled-enqueue-time": at_ms})


def test_schedule_cancel_and_activation(store: Store) -> None:
    kept = store.enqueue(QUEUE, _parts(), now=0)
    later = store.enqueue(QUEUE, _scheduled(5_000), now=0)
    cancelled = store.enqueue(QUEUE, _scheduled(5_000), now=0)
    assert kept is not None
    assert later is not None
    assert cancelled is not None
    store.cancel_scheduled("jobs", [cancelled])
    assert [m.seq for m in store.lock_next("jobs", 10, LOCK, now=1)] == [kept]
    assert store.sweep(5_000) == {"jobs"}
    assert [m.seq for m in store.lock_next("jobs", 10, LOCK, now=5_000)] == [later]


def test_recover_releases_locks_with_a_delivery_counted(tmp_path: object) -> None:
    path = f"{tmp_path}/s.sqlite3"
    store = Store(path, [QUEUE])
    store.enqueue(QUEUE, _parts(), now=0)
    store.lock_next("jobs", 1, LOCK, now=0)
    store.close()
    reopened = Store(path, [QUEUE])
    reopened.recover()
    (message,) = reopened.lock_next("jobs", 1, LOCK, now=1)
    assert message.delivery_count == 1


def test_dead_letter_keeps_application_properties(store: Store) -> None:
    store.enqueue(QUEUE, _parts(application_properties={"keep": "me"}), now=0)
    (message,) = store.lock_next("jobs", 1, LOCK, now=0)
    assert message.lock_token is not None
    assert store.settle("jobs", message.lock_token, Outcome.DEAD_LETTER, 1, "Reason", "Why")
    (dead,) = store.peek("jobs" + DLQ_SUFFIX, 0, 10)
    props = _decoded(dead).application_properties  # type: ignore[attr-defined]
    assert props == {b"keep": b"me", b"DeadLetterReason": b"Reason", b"DeadLetterErrorDescription": b"Why"}


@pytest.mark.parametrize("outcome", list(Outcome))
@pytest.mark.parametrize("lost_first", [False, True], ids=["lost-last", "lost-first"])
def test_settling_several_locks_is_all_or_nothing(store: Store, outcome: Outcome, lost_first: bool) -> None:
    for _ in range(3):
        store.enqueue(QUEUE, _parts(), now=0)
    live, also_live, lost = store.lock_next("jobs", 3, LOCK, now=1)
    tokens = [_token(live), _token(also_live), _token(lost)]
    assert store.settle("jobs", _token(lost), Outcome.COMPLETE, now=2)
    tokens = tokens[::-1] if lost_first else tokens
    assert not store.settle_all("jobs", tokens, outcome, now=3)
    assert [(m.seq, m.state, m.lock_token) for m in store.peek("jobs", 0, 10)] == [
        (live.seq, State.LOCKED, live.lock_token),
        (also_live.seq, State.LOCKED, also_live.lock_token),
    ]
    assert store.settle_all("jobs", [t for t in tokens if t != _token(lost)], outcome, now=4)


def test_renewing_several_locks_is_all_or_nothing(store: Store) -> None:
    store.enqueue(QUEUE, _parts(), now=0)
    store.enqueue(QUEUE, _parts(), now=0)
    live, lost = store.lock_next("jobs", 2, LOCK, now=0)
    assert store.settle("jobs", _token(lost), Outcome.COMPLETE, now=1)
    assert store.renew_all("jobs", [_token(live), _token(lost)], LOCK, now=5_000) is None
    (peeked,) = store.peek("jobs", 0, 10)
    assert peeked.locked_until == live.locked_until == LOCK  # not renewed
    assert store.renew_all("jobs", [_token(live), _token(live)], LOCK, now=5_000) == 5_000 + LOCK


def test_runtime_counts_every_state(store: Store) -> None:
    for now in range(5):
        store.enqueue(QUEUE, _parts(f"body-{now}"), now=now)
    store.enqueue(QUEUE, _parts(scheduled_enqueue_time_utc=datetime.fromtimestamp(3600, UTC)), now=5)
    first, second, third = store.lock_next("jobs", 3, LOCK, now=10)
    store.settle("jobs", _token(first), Outcome.DEFER, now=11)  # deferred and locked messages are still active
    store.settle("jobs", _token(second), Outcome.DEAD_LETTER, now=11, reason="bad")
    store.settle("jobs", _token(third), Outcome.COMPLETE, now=11)

    runtime = store.runtime("jobs")

    assert (runtime.active, runtime.scheduled, runtime.dead_letter, runtime.message_count) == (3, 1, 1, 5)
    assert runtime.size_in_bytes > 5 * len("body-0")
    assert runtime.accessed_at == 10  # the last send or receive
    assert Store(":memory:", [QUEUE]).runtime("jobs") == QueueRuntime()  # nothing yet, never accessed


def test_definitions_record_creation_and_change_times() -> None:
    store = Store(":memory:", [QUEUE])
    store.record_definitions(now=1_000)
    store.record_definitions(now=2_000)  # a restart with the same definition
    assert (store.runtime("jobs").created_at, store.runtime("jobs").updated_at) == (1_000, 1_000)
    store.queues["jobs"] = replace(QUEUE, max_delivery_count=9)
    store.record_definitions(now=3_000)  # a restart with a changed definition
    assert (store.runtime("jobs").created_at, store.runtime("jobs").updated_at) == (1_000, 3_000)


def test_sequence_numbers_are_per_queue_and_never_reused() -> None:
    other = replace(QUEUE, name="other")
    store = Store(":memory:", [QUEUE, other])
    assert [store.enqueue(QUEUE, _parts(), now=0), store.enqueue(other, _parts(), now=0)] == [1, 1]
    (first,) = store.lock_next("jobs", 1, LOCK, now=1)
    store.settle("jobs", _token(first), Outcome.DEAD_LETTER, now=2)
    assert store.enqueue(QUEUE, _parts(), now=3) == 2  # numbers are not reused ...
    assert [m.seq for m in store.peek("jobs" + DLQ_SUFFIX, 0, 10)] == [1]  # ... and a dead letter keeps its own


def test_a_data_directory_of_the_first_version_is_migrated(tmp_path: Path) -> None:
    """Its messages were numbered across queues: they keep their numbers; numbering goes on after the largest."""
    path = tmp_path / "servicebus.sqlite3"
    parts = _parts("old")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, state INTEGER NOT NULL,"
            " visible_at INTEGER, enqueued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, delivery_count INTEGER"
            " NOT NULL DEFAULT 0, lock_token BLOB, locked_until INTEGER, ttl_ms INTEGER, ann BLOB NOT NULL,"
            " ann_count INTEGER NOT NULL, bare BLOB NOT NULL, app_start INTEGER NOT NULL, app_end INTEGER NOT NULL)"
        )
        db.execute(
            "INSERT INTO messages VALUES (7, 'jobs', 0, NULL, 0, 1000000, 0, NULL, NULL, NULL, ?, ?, ?, ?, ?)",
            (parts.annotation_entries, parts.annotation_count, parts.bare, parts.app_start, parts.app_end),
        )
    store = Store(path, [QUEUE])
    (old,) = store.peek("jobs", 0, 10)
    assert (old.seq, old.header, old.dann) == (7, (None, None, None), b"")
    assert store.enqueue(QUEUE, _parts("new"), now=1) == 8
    store.close()
