"""The queue state machine in SQLite: enqueue, lock, settle, defer, schedule, dead-letter, expire, dedupe.

Pure and synchronous (no network, the clock is an argument) so it is unit-testable on its own. Every public method
is one transition; the broker groups the transitions of one event-loop turn into a single transaction and commits
it (:meth:`Store.commit`) before any reply leaves the process, so a crash never acknowledges lost work.

States: AVAILABLE -> LOCKED (peek-lock) -> deleted (complete) | AVAILABLE (abandon, lock expiry, release) |
DEFERRED (defer) | dead-letter queue. DEFERRED -> DEFERRED_LOCKED (receive-by-sequence-number) -> same outcomes,
returning to DEFERRED instead of AVAILABLE. SCHEDULED -> AVAILABLE at its enqueue time. Delivery count is the
number of failed deliveries (abandon, lock expiry, lock held at shutdown); reaching MaxDeliveryCount dead-letters
the message with reason MaxDeliveryCountExceeded.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from .codec import MessageParts, add_application_properties, build_message
from .config import QueueConfig

__all__ = ["DLQ_SUFFIX", "MessageState", "Outcome", "QueueRuntime", "State", "Store", "StoredMessage"]

DLQ_SUFFIX = "/$DeadLetterQueue"
_SCHEDULED_AT = b"x-opt-scheduled-enqueue-time"
_NEVER = 2**62


class State(IntEnum):
    AVAILABLE = 0
    LOCKED = 1
    DEFERRED = 2
    SCHEDULED = 3
    DEFERRED_LOCKED = 4


class Outcome(IntEnum):
    COMPLETE = 0
    ABANDON = 1
    DEFER = 2
    DEAD_LETTER = 3
    RELEASE = 4


class MessageState(IntEnum):
    """``x-opt-message-state``, the SDK's ``ServiceBusMessageState``."""

    ACTIVE = 0
    DEFERRED = 1
    SCHEDULED = 2


_MESSAGE_STATES = {
    State.DEFERRED: MessageState.DEFERRED,
    State.DEFERRED_LOCKED: MessageState.DEFERRED,
    State.SCHEDULED: MessageState.SCHEDULED,
}


@dataclass(frozen=True)
class StoredMessage:
    seq: int  # the sequence number clients see: per queue, from 1, never reused (a dead letter keeps its own)
    state: int
    enqueued_at: int
    delivery_count: int
    lock_token: uuid.UUID | None
    locked_until: int | None
    ttl_ms: int | None
    ann: bytes
    ann_count: int
    bare: bytes
    header: tuple[bool | None, int | None, bool | None]  # the sender's durable, priority, first-acquirer
    dann: bytes  # the sender's delivery annotations (map entries)
    dann_count: int

    def encoded(self, *, locked: bool = False) -> bytes:
        """The message as the broker delivers it (transfer payload, peek and deferred-receive responses);
        ``locked``: a peek-locked delivery, which carries its lock token as the ``x-opt-lock-token``
        delivery annotation."""
        return build_message(
            self.bare,
            self.ann,
            self.ann_count,
            header=self.header,
            delivery_entries=self.dann,
            delivery_entry_count=self.dann_count,
            delivery_count=self.delivery_count,
            ttl_ms=self.ttl_ms,
            sequence_number=self.seq,
            enqueued_ms=self.enqueued_at,
            locked_until_ms=self.locked_until,
            lock_token=self.lock_token if locked else None,
            message_state=_MESSAGE_STATES.get(State(self.state), MessageState.ACTIVE),
        )


@dataclass(frozen=True)
class QueueRuntime:
    """A queue's runtime properties as the management API reports them (times in ms since the epoch, 0 = never).

    ``active`` counts the messages of the queue itself that are not scheduled: available, locked and deferred
    alike, as the service does; ``dead_letter`` those of its dead-letter queue; ``size_in_bytes`` all of them.
    """

    active: int = 0
    scheduled: int = 0
    dead_letter: int = 0
    size_in_bytes: int = 0
    created_at: int = 0
    updated_at: int = 0
    accessed_at: int = 0

    @property
    def message_count(self) -> int:
        return self.active + self.scheduled + self.dead_letter


_COLUMNS = (
    "seq, state, enqueued_at, delivery_count, lock_token, locked_until, ttl_ms, ann, ann_count, bare,"
    " durable, priority, first_acquirer, dann, dann_count, number"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,
    visible_at INTEGER,
    enqueued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token BLOB,
    locked_until INTEGER,
    ttl_ms INTEGER,
    ann BLOB NOT NULL,
    ann_count INTEGER NOT NULL,
    bare BLOB NOT NULL,
    app_start INTEGER NOT NULL,
    app_end INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, state, seq);
CREATE INDEX IF NOT EXISTS messages_lock ON messages (lock_token) WHERE lock_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_locked ON messages (locked_until) WHERE locked_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_scheduled ON messages (visible_at) WHERE visible_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expires_at);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sequences (queue TEXT PRIMARY KEY, last INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS duplicates (
    queue TEXT NOT NULL, message_id BLOB NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;
"""
# Columns of ``messages`` added after the first version, added to a data directory's database that lacks them: the
# sender's header fields and delivery annotations, and the per-queue sequence number (``seq`` is the row's key).
_ADDED_COLUMNS = (
    ("number", "INTEGER"),
    ("durable", "INTEGER"),
    ("priority", "INTEGER"),
    ("first_acquirer", "INTEGER"),
    ("dann", "BLOB NOT NULL DEFAULT x''"),
    ("dann_count", "INTEGER NOT NULL DEFAULT 0"),
)


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


def _row(row: Sequence[object]) -> StoredMessage:
    token = row[4]
    return StoredMessage(
        seq=row[15],  # type: ignore[arg-type]
        state=row[1],  # type: ignore[arg-type]
        enqueued_at=row[2],  # type: ignore[arg-type]
        delivery_count=row[3],  # type: ignore[arg-type]
        lock_token=uuid.UUID(bytes=token) if isinstance(token, bytes) else None,
        locked_until=row[5],  # type: ignore[arg-type]
        ttl_ms=row[6],  # type: ignore[arg-type]
        ann=row[7],  # type: ignore[arg-type]
        ann_count=row[8],  # type: ignore[arg-type]
        bare=row[9],  # type: ignore[arg-type]
        header=(_flag(row[10]), row[11], _flag(row[12])),  # type: ignore[arg-type]
        dann=row[13],  # type: ignore[arg-type]
        dann_count=row[14],  # type: ignore[arg-type]
    )


class Store:
    """All queue state of one emulator, in ``<data_dir>/servicebus.sqlite3`` (or ``:memory:`` for unit tests)."""

    def __init__(self, path: Path | str, queues: Iterable[QueueConfig]) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.queues = {q.name: q for q in queues}
        self._migrate()
        self._in_tx = False
        self._accessed: dict[str, int] = {}  # queue -> last send or receive request, in memory only

    def _migrate(self) -> None:
        """Bring a data directory written by an earlier version up to date. Its messages were numbered across all
        queues: they keep their numbers, and every queue's numbering goes on after the largest."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        for column, declaration in _ADDED_COLUMNS:
            if column not in present:
                self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} {declaration}")
        if "number" not in present:
            self._db.execute("UPDATE messages SET number = seq")
            (last,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
            self._db.executemany(
                "INSERT OR IGNORE INTO sequences VALUES (?, ?)", [(queue, last) for queue in self.queues]
            )
        self._db.execute("CREATE INDEX IF NOT EXISTS messages_number ON messages (queue, number)")

    # -- transactions -------------------------------------------------------------------------------------------
    def _write(self) -> sqlite3.Connection:
        if not self._in_tx:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_tx = True
        return self._db

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def rollback(self) -> None:
        """Undo every transition since the last commit (a handler failed half-way)."""
        if self._in_tx:
            self._db.execute("ROLLBACK")
            self._in_tx = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    # -- enqueue ------------------------------------------------------------------------------------------------
    def enqueue(self, queue: QueueConfig, parts: MessageParts, now: int) -> int | None:
        """Store a sent message; returns its sequence number, or None when it is a detected duplicate."""
        db = self._write()
        self._accessed[queue.name] = now
        if queue.requires_duplicate_detection and parts.message_id is not None:
            key = repr(parts.message_id).encode()
            window = int(queue.duplicate_detection_history_time_window.total_seconds() * 1000)
            seen = db.execute(
                "SELECT 1 FROM duplicates WHERE queue = ? AND message_id = ? AND expires_at > ?",
                (queue.name, key, now),
            ).fetchone()
            if seen:
                return None
            db.execute("INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?)", (queue.name, key, now + window))
        scheduled = parts.annotations.get(_SCHEDULED_AT)
        visible_at = scheduled if isinstance(scheduled, int) and scheduled > now else None
        default_ttl = int(queue.default_message_time_to_live.total_seconds() * 1000)
        ttl = min(parts.ttl_ms, default_ttl) if parts.ttl_ms else default_ttl
        expires_at = min((visible_at or now) + ttl, _NEVER)
        state = State.SCHEDULED if visible_at else State.AVAILABLE
        (number,) = db.execute(
            "INSERT INTO sequences VALUES (?, 1) ON CONFLICT (queue) DO UPDATE SET last = last + 1 RETURNING last",
            (queue.name,),
        ).fetchone()
        db.execute(
            "INSERT INTO messages (queue, state, visible_at, enqueued_at, expires_at, ttl_ms, ann, ann_count, bare,"
            " app_start, app_end, durable, priority, first_acquirer, dann, dann_count, number)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                queue.name,
                state,
                visible_at,
                visible_at or now,
                expires_at,
                parts.ttl_ms,
                parts.annotation_entries,
                parts.annotation_count,
                parts.bare,
                parts.app_start,
                parts.app_end,
                parts.durable,
                parts.priority,
                parts.first_acquirer,
                parts.delivery_annotation_entries,
                parts.delivery_annotation_count,
                number,
            ),
        )
        return int(number)

    # -- receive ------------------------------------------------------------------------------------------------
    def lock_next(self, entity: str, count: int, lock_ms: int, now: int) -> list[StoredMessage]:
        """Peek-lock up to ``count`` available, unexpired messages in sequence order."""
        db = self._write()
        self._touch(entity, now)
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND state = 0 AND +expires_at > ? ORDER BY seq LIMIT ?",
            (entity, now, count),
        ).fetchall()
        return self._lock(db, rows, State.LOCKED, lock_ms, now)

    def take_next(self, entity: str, count: int, now: int) -> list[StoredMessage]:
        """Receive-and-delete up to ``count`` available, unexpired messages."""
        db = self._write()
        self._touch(entity, now)
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND state = 0 AND +expires_at > ? ORDER BY seq LIMIT ?",
            (entity, now, count),
        ).fetchall()
        db.executemany("DELETE FROM messages WHERE seq = ?", [(row[0],) for row in rows])
        return [_row(row) for row in rows]

    def _lock(
        self, db: sqlite3.Connection, rows: list[tuple[object, ...]], state: State, lock_ms: int, now: int
    ) -> list[StoredMessage]:
        locked = []
        updates = []
        for row in rows:
            token = uuid.uuid4()
            updates.append((state, token.bytes, now + lock_ms, row[0]))
            locked.append((row[0], state, row[2], row[3], token.bytes, now + lock_ms, *row[6:]))
        db.executemany("UPDATE messages SET state = ?, lock_token = ?, locked_until = ? WHERE seq = ?", updates)
        return [_row(row) for row in locked]

    def lock_deferred(
        self, entity: str, seqs: Sequence[int], lock_ms: int, now: int, *, delete: bool = False
    ) -> list[StoredMessage]:
        """Receive deferred messages by sequence number (peek-lock, or delete for receive-and-delete)."""
        db = self._write()
        self._touch(entity, now)
        marks = ",".join("?" * len(seqs))
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND state = 2 AND number IN ({marks}) ORDER BY number",
            (entity, *seqs),
        ).fetchall()
        if delete:
            db.executemany("DELETE FROM messages WHERE seq = ?", [(row[0],) for row in rows])
            return [_row(row) for row in rows]
        return self._lock(db, rows, State.DEFERRED_LOCKED, lock_ms, now)

    def count_deferred(self, entity: str, seqs: Sequence[int]) -> int:
        """How many of ``seqs`` (distinct) are deferred messages of ``entity`` that can be received now."""
        marks = ",".join("?" * len(seqs))
        (count,) = self._db.execute(
            f"SELECT count(*) FROM messages WHERE queue = ? AND state = 2 AND number IN ({marks})", (entity, *seqs)
        ).fetchone()
        return int(count)

    def peek(self, entity: str, from_seq: int, count: int) -> list[StoredMessage]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND number >= ? ORDER BY number LIMIT ?",
            (entity, from_seq, count),
        ).fetchall()
        return [_row(row) for row in rows]

    # -- settle ---------------------------------------------------------------------------------------------------
    def settle(
        self, entity: str, token: uuid.UUID, outcome: Outcome, now: int, reason: str = "", description: str = ""
    ) -> bool:
        """Apply an outcome to a locked message; False when the lock is unknown, expired or already settled."""
        db = self._write()
        if outcome == Outcome.COMPLETE:  # the hot path: one statement
            return bool(
                db.execute(
                    "DELETE FROM messages"
                    " WHERE lock_token = ? AND +queue = ? AND +state IN (1, 4) AND +locked_until > ?",
                    (token.bytes, entity, now),
                ).rowcount
            )
        row = db.execute(
            "SELECT seq, state, delivery_count FROM messages"
            " WHERE lock_token = ? AND +queue = ? AND +state IN (1, 4) AND +locked_until > ?",
            (token.bytes, entity, now),
        ).fetchone()
        if row is None:
            return False
        seq, state, delivery_count = row
        back = State.DEFERRED if state == State.DEFERRED_LOCKED else State.AVAILABLE
        if outcome == Outcome.RELEASE:
            self._unlock(db, seq, back, delivery_count)
        elif outcome == Outcome.DEFER:
            self._unlock(db, seq, State.DEFERRED, delivery_count)
        elif outcome == Outcome.DEAD_LETTER:
            self._dead_letter(db, seq, reason, description)
        else:
            self._fail_delivery(db, entity, seq, back, delivery_count)
        return True

    def settle_all(
        self,
        entity: str,
        tokens: Sequence[uuid.UUID],
        outcome: Outcome,
        now: int,
        reason: str = "",
        description: str = "",
    ) -> bool:
        """Settle every lock or none (a management request): False, changing nothing, when one is lost."""
        tokens = list(dict.fromkeys(tokens))
        if not self._all_held(entity, tokens, now):
            return False
        for token in tokens:
            self.settle(entity, token, outcome, now, reason, description)
        return True

    def renew_all(self, entity: str, tokens: Sequence[uuid.UUID], lock_ms: int, now: int) -> int | None:
        """Renew every lock or none: the new expiry, or None, changing nothing, when one is lost."""
        tokens = list(dict.fromkeys(tokens))
        if not self._all_held(entity, tokens, now):
            return None
        for token in tokens:
            self.renew(entity, token, lock_ms, now)
        return now + lock_ms

    def _all_held(self, entity: str, tokens: Sequence[uuid.UUID], now: int) -> bool:
        marks = ",".join("?" * len(tokens))
        (held,) = self._db.execute(
            f"SELECT count(*) FROM messages WHERE lock_token IN ({marks})"
            " AND +queue = ? AND +state IN (1, 4) AND +locked_until > ?",
            (*(token.bytes for token in tokens), entity, now),
        ).fetchone()
        return bool(held == len(tokens))

    def renew(self, entity: str, token: uuid.UUID, lock_ms: int, now: int) -> int | None:
        db = self._write()
        cursor = db.execute(
            "UPDATE messages SET locked_until = ?"
            " WHERE lock_token = ? AND +queue = ? AND +state IN (1, 4) AND +locked_until > ?",
            (now + lock_ms, token.bytes, entity, now),
        )
        return now + lock_ms if cursor.rowcount else None

    def cancel_scheduled(self, entity: str, seqs: Sequence[int]) -> None:
        db = self._write()
        db.executemany("DELETE FROM messages WHERE queue = ? AND number = ? AND state = 3", [(entity, s) for s in seqs])

    def _unlock(self, db: sqlite3.Connection, seq: int, state: State, delivery_count: int) -> None:
        db.execute(
            "UPDATE messages SET state = ?, lock_token = NULL, locked_until = NULL, delivery_count = ? WHERE seq = ?",
            (state, delivery_count, seq),
        )

    def _fail_delivery(self, db: sqlite3.Connection, entity: str, seq: int, back: State, delivery_count: int) -> None:
        queue = self.queues.get(entity)
        delivery_count += 1
        if queue is not None and delivery_count >= queue.max_delivery_count:
            db.execute("UPDATE messages SET delivery_count = ? WHERE seq = ?", (delivery_count, seq))
            self._dead_letter(
                db,
                seq,
                "MaxDeliveryCountExceeded",
                f"Message could not be consumed after {queue.max_delivery_count} delivery attempts.",
            )
        else:
            self._unlock(db, seq, back, delivery_count)

    def _dead_letter(self, db: sqlite3.Connection, seq: int, reason: str, description: str) -> None:
        queue, bare, app_start, app_end = db.execute(
            "SELECT queue, bare, app_start, app_end FROM messages WHERE seq = ?", (seq,)
        ).fetchone()
        props = {"DeadLetterReason": reason or "", "DeadLetterErrorDescription": description or ""}
        bare, app_start, app_end = add_application_properties(bare, app_start, app_end, props)
        target = queue if queue.endswith(DLQ_SUFFIX) else queue + DLQ_SUFFIX
        db.execute(
            "UPDATE messages SET queue = ?, state = 0, lock_token = NULL, locked_until = NULL, visible_at = NULL,"
            " expires_at = ?, bare = ?, app_start = ?, app_end = ? WHERE seq = ?",
            (target, _NEVER, bare, app_start, app_end, seq),
        )

    # -- time -----------------------------------------------------------------------------------------------------
    def sweep(self, now: int) -> set[str]:
        """Expire locks, activate scheduled messages, expire TTLs; returns the entities that gained messages."""
        db = self._write()
        woken: set[str] = set()
        for seq, queue, state, count in db.execute(
            "SELECT seq, queue, state, delivery_count FROM messages WHERE locked_until <= ? AND +state IN (1, 4)",
            (now,),
        ).fetchall():
            back = State.DEFERRED if state == State.DEFERRED_LOCKED else State.AVAILABLE
            self._fail_delivery(db, queue, seq, back, count)
            woken.update((queue, queue + DLQ_SUFFIX))
        for (queue,) in db.execute(
            "UPDATE messages SET state = 0, visible_at = NULL WHERE visible_at <= ? AND +state = 3 RETURNING queue",
            (now,),
        ).fetchall():
            woken.add(queue)
        for seq, queue in db.execute(
            "SELECT seq, queue FROM messages WHERE expires_at <= ? AND +state IN (0, 2)", (now,)
        ).fetchall():
            config = self.queues.get(queue)
            if config is not None and config.dead_lettering_on_message_expiration:
                self._dead_letter(db, seq, "TTLExpiredException", "The message expired and was dead lettered.")
                woken.add(queue + DLQ_SUFFIX)
            else:
                db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
        db.execute("DELETE FROM duplicates WHERE expires_at <= ?", (now,))
        return woken

    def recover(self) -> None:
        """At start-up: locks held when the process stopped are lost, which counts as a failed delivery."""
        db = self._write()
        for seq, queue, state, count in db.execute(
            "SELECT seq, queue, state, delivery_count FROM messages WHERE state IN (1, 4)"
        ).fetchall():
            back = State.DEFERRED if state == State.DEFERRED_LOCKED else State.AVAILABLE
            self._fail_delivery(db, queue, seq, back, count)
        self.commit()

    # -- runtime properties ---------------------------------------------------------------------------------------
    def record_definitions(self, now: int) -> None:
        """At start-up: remember when each configured queue was first seen (CreatedAt) and when its definition
        last changed (UpdatedAt)."""
        db = self._write()
        for queue in self.queues.values():
            definition = repr(queue)
            db.execute(
                "INSERT INTO queues VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET definition = excluded.definition, updated_at = excluded.updated_at"
                " WHERE queues.definition <> excluded.definition",
                (queue.name, definition, now, now),
            )
        self.commit()

    def _touch(self, entity: str, now: int) -> None:
        self._accessed[entity.removesuffix(DLQ_SUFFIX)] = now

    def runtime(self, queue: str) -> QueueRuntime:
        """Message counts, size and times of a configured queue (read-only: no transaction needed)."""
        counts = {"active": 0, "scheduled": 0, "dead_letter": 0, "size_in_bytes": 0}
        for entity, state, count, size in self._db.execute(
            "SELECT queue, state, count(*), sum(length(bare)) FROM messages WHERE queue IN (?, ?) GROUP BY 1, 2",
            (queue, queue + DLQ_SUFFIX),
        ):
            if entity != queue:
                counts["dead_letter"] += count
            elif state == State.SCHEDULED:
                counts["scheduled"] += count
            else:
                counts["active"] += count
            counts["size_in_bytes"] += size
        times = self._db.execute("SELECT created_at, updated_at FROM queues WHERE name = ?", (queue,)).fetchone()
        created, updated = times or (0, 0)
        return QueueRuntime(**counts, created_at=created, updated_at=updated, accessed_at=self._accessed.get(queue, 0))

    def count(self, entity: str) -> int:
        return int(self._db.execute("SELECT count(*) FROM messages WHERE queue = ?", (entity,)).fetchone()[0])
