"""``GET /api/stats``: job counts, recent throughput, run and queue-wait percentiles, workers and queue depths.

Everything but the queues is aggregated by PostgreSQL (:class:`PostgresStats`, two statements on the database's
clock): counts by status; the oldest queued job's age; jobs submitted (``created_at``) and finished (``finished_at``,
by their status now) in the last 5 and 60 minutes; ``percentile_cont`` p50/p95 of the run time
(``finished_at - started_at``, the last attempt) of jobs that succeeded in the last 60 minutes and of the queue wait
(``first_started_at - created_at``) of jobs first started in the last 60 minutes; the ``workers`` heartbeat rows seen
in the last day, alive when the last beat is within 3 x ``WORKER_REGISTRY_INTERVAL``.

Queue depths come from Service Bus (:class:`QueueCounter`, ``shared.queue_stats.QueueStats`` in the app), read
concurrently with the database and bounded by ``queue_timeout``: a bus that cannot be read in time or at all gives
``queues: []`` and ``queues_error: "unavailable"``, and the rest still answers. The database being down is a
:class:`~shared.errors.DatabaseUnavailable` (503).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any, Literal, Protocol
from uuid import UUID

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict

from shared.db import translated
from shared.errors import TransientError
from shared.status import Timestamp

log = logging.getLogger(__name__)

WORKERS_SEEN_WITHIN = timedelta(days=1)  # older heartbeat rows are left out: scale-set instances come and go


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class JobCounts(_Model):
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class Window(_Model):
    """Jobs submitted in the window, and jobs that finished in it (by the status they have now)."""

    submitted: int
    succeeded: int
    failed: int
    cancelled: int


class Percentiles(_Model):
    """Seconds; ``null`` when no job is in the sample."""

    p50: float | None
    p95: float | None


class Worker(_Model):
    worker_id: str
    host: str
    device: str
    current_job: UUID | None
    last_beat: Timestamp
    alive: bool


class QueueDepth(_Model):
    name: str
    active: int
    scheduled: int
    dead_letter: int


class JobStats(_Model):
    """What the database knows."""

    jobs: JobCounts
    oldest_queued_age_seconds: float | None
    last_5_minutes: Window
    last_60_minutes: Window
    run_seconds: Percentiles
    queue_wait_seconds: Percentiles
    workers: list[Worker]


class Stats(JobStats):
    """``GET /api/stats``."""

    queues: list[QueueDepth]
    queues_error: Literal["unavailable"] | None


class StatsSource(Protocol):
    def job_stats(self, alive_within: timedelta) -> JobStats: ...


class QueueCount(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def active(self) -> int: ...
    @property
    def scheduled(self) -> int: ...
    @property
    def dead_letter(self) -> int: ...


class QueueCounter(Protocol):
    """``shared.queue_stats.QueueStats``: raises a :class:`~shared.errors.TransientError` when the bus cannot say."""

    def counts(self, queue_names: Sequence[str]) -> Sequence[QueueCount]: ...


def read_stats(
    source: StatsSource,
    queues: QueueCounter,
    queue_names: Sequence[str],
    *,
    alive_within: timedelta,
    queue_timeout: float = 2.0,
) -> Stats:
    """The database's numbers and the queues' depths, all read at the same time (one request per queue)."""
    started = time.monotonic()
    executor = ThreadPoolExecutor(max_workers=max(1, len(queue_names)), thread_name_prefix="queue-stats")
    try:
        counting = [executor.submit(queues.counts, [name]) for name in queue_names]
        job_stats = source.job_stats(alive_within)
    finally:
        executor.shutdown(wait=False)  # a call past its deadline ends on its own (the client's timeouts)
    depths = _depths(counting, deadline=started + queue_timeout)
    return Stats(**dict(job_stats), queues=depths or [], queues_error=None if depths is not None else "unavailable")


def _depths(counting: list[Future[Sequence[QueueCount]]], deadline: float) -> list[QueueDepth] | None:
    """Every queue's depth, or ``None`` when one of them could not be read by the deadline."""
    depths = []
    try:
        for future in counting:
            for c in future.result(timeout=max(0.0, deadline - time.monotonic())):
                depths.append(
                    QueueDepth(name=c.name, active=c.active, scheduled=c.scheduled, dead_letter=c.dead_letter)
                )
    except FutureTimeout:
        log.warning("queue counts took too long", extra={"action": "queue_stats_timeout"})
        return None
    except TransientError as e:
        log.warning("queue counts unavailable: %s", e.message, extra={"action": "queue_stats_unavailable"})
        return None
    return depths


_SUMMARY = """
WITH finished AS (
    SELECT status, finished_at, started_at FROM jobs WHERE finished_at > now() - interval '60 minutes'
), submitted AS (
    SELECT created_at FROM jobs WHERE created_at > now() - interval '60 minutes'
)
SELECT
    (SELECT coalesce(jsonb_object_agg(status, n), '{}') FROM (SELECT status, count(*) AS n FROM jobs GROUP BY status) c)
        AS counts,
    (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM jobs WHERE status = 'queued')
        AS oldest_queued_age_seconds,
    (SELECT jsonb_build_object(
        'submitted_5', count(*) FILTER (WHERE created_at > now() - interval '5 minutes'),
        'submitted_60', count(*)) FROM submitted) AS submitted,
    (SELECT coalesce(jsonb_object_agg(status || '_' || minutes, n), '{}') FROM (
        SELECT status, 60 AS minutes, count(*) AS n FROM finished GROUP BY status
        UNION ALL
        SELECT status, 5, count(*) FROM finished WHERE finished_at > now() - interval '5 minutes' GROUP BY status
    ) f) AS finished,
    (SELECT ARRAY[percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s)]
        FROM (SELECT extract(epoch FROM finished_at - started_at)::float8 AS s FROM finished
              WHERE status = 'succeeded' AND started_at IS NOT NULL) r) AS run_seconds,
    (SELECT ARRAY[percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s)]
        FROM (SELECT extract(epoch FROM first_started_at - created_at)::float8 AS s FROM jobs
              WHERE first_started_at > now() - interval '60 minutes'
              -- the same rows (a job first started within the hour is not finished, or finished within it), but
              -- through the status and finished_at indexes instead of a scan of every job
              AND (status IN ('queued', 'running') OR finished_at > now() - interval '60 minutes')) w)
        AS queue_wait_seconds
"""
_WORKERS = """
SELECT worker_id, host, device, current_job, last_beat, last_beat > now() - %(alive)s AS alive
FROM workers WHERE last_beat > now() - %(seen)s ORDER BY worker_id
"""


class PostgresStats:
    """:class:`StatsSource` on PostgreSQL (the tables of ``shared/migrations``)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    @translated
    def job_stats(self, alive_within: timedelta) -> JobStats:
        with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(_SUMMARY).fetchone()
            workers = cur.execute(_WORKERS, {"alive": alive_within, "seen": WORKERS_SEEN_WITHIN}).fetchall()
        assert row is not None, "an aggregate query returns one row"
        return _job_stats(row, workers)


def _job_stats(row: dict[str, Any], workers: list[dict[str, Any]]) -> JobStats:
    counts, submitted, finished = row["counts"], row["submitted"], row["finished"]

    def window(minutes: int) -> Window:
        return Window(
            submitted=submitted[f"submitted_{minutes}"],
            **{status: finished.get(f"{status}_{minutes}", 0) for status in ("succeeded", "failed", "cancelled")},
        )

    return JobStats(
        jobs=JobCounts(**{status: counts.get(status, 0) for status in JobCounts.model_fields}),
        oldest_queued_age_seconds=row["oldest_queued_age_seconds"],
        last_5_minutes=window(5),
        last_60_minutes=window(60),
        run_seconds=Percentiles(p50=row["run_seconds"][0], p95=row["run_seconds"][1]),
        queue_wait_seconds=Percentiles(p50=row["queue_wait_seconds"][0], p95=row["queue_wait_seconds"][1]),
        workers=[Worker.model_validate(w) for w in workers],
    )
