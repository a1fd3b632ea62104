"""The workers' heartbeat rows (table ``workers``): which workers are alive, on which host and device, running which
job. Each worker upserts its own row every ``WORKER_REGISTRY_INTERVAL`` and deletes it on a clean exit
(:mod:`gpu_worker.registry`); ``GET /api/stats`` reads them, counting a worker alive while its ``last_beat`` is
recent (a worker that died leaves a row that only ages). Database errors become
:class:`~shared.errors.DatabaseUnavailable`.
"""

from __future__ import annotations

from uuid import UUID

from psycopg_pool import ConnectionPool

from shared.db import translated

_BEAT = (
    "INSERT INTO workers (worker_id, host, device, current_job) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (worker_id) DO UPDATE SET host = EXCLUDED.host, device = EXCLUDED.device,"
    " current_job = EXCLUDED.current_job, last_beat = now()"
)


class WorkerRegistry:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    @translated
    def beat(self, worker_id: str, host: str, device: str, current_job: UUID | None) -> None:
        """Insert or refresh the worker's row (``last_beat = now()``; ``started_at`` is kept from the first beat)."""
        with self._pool.connection() as conn:
            conn.execute(_BEAT, (worker_id, host, device, current_job))

    @translated
    def gone(self, worker_id: str) -> None:
        """Delete the worker's row (a clean exit)."""
        with self._pool.connection() as conn:
            conn.execute("DELETE FROM workers WHERE worker_id = %s", (worker_id,))
