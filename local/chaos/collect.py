"""Read the run's outcome from the stack's own backends: wait until the tracked jobs are terminal, then take the
rows (``jobs``, ``results``, ``dead_letters``) and the result blob names that :mod:`local.chaos.report` judges."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from azure.storage.blob import BlobServiceClient
from psycopg.rows import dict_row

from local.chaos.report import TERMINAL, JobRow, ResultRow, Snapshot

logger = logging.getLogger(__name__)


def _connect(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(database_url, autocommit=True, connect_timeout=5, row_factory=dict_row)


def pending(database_url: str, job_ids: list[str]) -> int:
    """How many of ``job_ids`` have a row that is not terminal (a missing row cannot move: it is not counted)."""
    with _connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) AS n FROM jobs WHERE job_id = ANY(%s::uuid[]) AND status <> ALL(%s)",
            (job_ids, sorted(TERMINAL)),
        ).fetchone()
    return int(row["n"]) if row else 0


def wait_settled(database_url: str, job_ids: list[str], timeout: float, stop: threading.Event) -> bool:
    """Poll until every tracked job with a row is terminal (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    reported = 0.0
    while True:
        try:
            left = pending(database_url, job_ids)
        except psycopg.OperationalError as e:
            logger.warning("chaos: cannot read the jobs yet: %s", e)
            left = -1
        if left == 0:
            return True
        if time.monotonic() - reported > 30:
            logger.info("chaos: %d jobs not terminal yet", left)
            reported = time.monotonic()
        if time.monotonic() > deadline or stop.wait(2.0):
            return False


def snapshot(database_url: str, blob_connection_string: str, container: str, job_ids: list[str]) -> Snapshot:
    with _connect(database_url) as conn:
        jobs = conn.execute(
            "SELECT job_id::text, status, attempts, error_code, error_message, generation FROM jobs"
            " WHERE job_id = ANY(%s::uuid[])",
            (job_ids,),
        ).fetchall()
        results = conn.execute(
            "SELECT job_id::text, attempt, result FROM results WHERE job_id = ANY(%s::uuid[])", (job_ids,)
        ).fetchall()
        letters = conn.execute("SELECT reason, action FROM dead_letters").fetchall()
    with BlobServiceClient.from_connection_string(blob_connection_string) as service:
        blobs = frozenset(b.name for b in service.get_container_client(container).list_blobs())
    return Snapshot(
        jobs=[JobRow(**r) for r in jobs],
        results=[ResultRow(r["job_id"], r["attempt"], r["result"]) for r in results],
        result_blobs=blobs,
        dead_letters=[(r["reason"], r["action"]) for r in letters],
    )
