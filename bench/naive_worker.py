"""The seeds' naive consumer, the baseline of ``bench/worker_throughput.py``; not a worker to deploy.

``python -m bench.naive_worker --ready-file PATH`` with the stack's environment (``ServiceBusConnection``,
``AzureWebJobsStorage``, ``DATABASE_URL``, ``JOBS_QUEUE_NAME``, read through ``Settings``). In a loop: receive one
message (peek-lock, no prefetch) from the normal-priority queue, download the input blob, run the same analysis
(``gpu_worker.analysis.Analyzer(...).analyse``), upload the outputs one after another, write the result row and mark
the job succeeded in one statement (bypassing the lifecycle: no claim, no lease, no fencing), complete the message.
It sets no thread counts (torch and OpenMP defaults), renews no lock and retries nothing.

It writes ``PATH`` once its model is loaded and its receiver has answered one receive, and stops at SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import psycopg
from azure.servicebus import ServiceBusClient, ServiceBusReceivedMessage
from psycopg.types.json import Jsonb

from gpu_worker.analysis import AnalysisRequest, Analyzer, select_device
from shared.messages import JobMessage, decode
from shared.settings import Settings
from shared.storage import BlobStore

log = logging.getLogger("bench.naive_worker")

SUCCEED = (
    "WITH moved AS (UPDATE jobs SET status = 'succeeded', attempts = attempts + 1, started_at = %(started)s,"
    " first_started_at = coalesce(first_started_at, %(started)s), finished_at = now(), updated_at = now()"
    " WHERE job_id = %(job_id)s RETURNING job_id, attempts)"
    " INSERT INTO results (job_id, attempt, result) SELECT job_id, attempts, %(result)s FROM moved"
)


def handle(job: JobMessage, analyzer: Analyzer, store: BlobStore, conn: psycopg.Connection[object]) -> None:
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix=f"naive-{job.job_id}-") as tmp:
        image, out = Path(tmp) / "input.tif", Path(tmp) / "out"
        out.mkdir()
        store.download_input(job.input_blob, image)
        output = analyzer.analyse(image, AnalysisRequest(job.analysis, job.bands, job.scale), out)
        urls = {key: store.put_result(job.job_id, 1, p.name, p, kind) for key, (p, kind) in output.files.items()}
    result = {**output.result, "attempt": 1, "outputs": urls}
    conn.execute(SUCCEED, {"job_id": job.job_id, "started": started, "result": Jsonb(result)})


def body(message: ServiceBusReceivedMessage) -> bytes:
    return b"".join(bytes(part) for part in message.body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stop = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_sigterm)
    settings = Settings.from_env()
    analyzer = Analyzer(select_device(settings.worker_device))
    store = BlobStore.from_settings(settings)
    assert settings.servicebus_connection_string, "the local stack's connection string"
    assert settings.database_url, "the local stack's DATABASE_URL"
    with (
        ServiceBusClient.from_connection_string(settings.servicebus_connection_string) as client,
        client.get_queue_receiver(settings.jobs_queue) as receiver,
        psycopg.connect(settings.database_url, autocommit=True) as conn,
    ):
        first = True
        while not stop:
            for message in receiver.receive_messages(max_message_count=1, max_wait_time=1):
                handle(decode(body(message)), analyzer, store, conn)
                receiver.complete_message(message)
            if first:
                args.ready_file.write_text("ready\n")
                first = False
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
