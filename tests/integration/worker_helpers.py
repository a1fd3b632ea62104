"""What the worker's integration tests share: a stack of real backends, job submission, broker inspection, and
stand-in analyzers with the :class:`gpu_worker.analysis.Analyzer` interface.

Run as ``python -m tests.integration.worker_helpers [worker flags]`` it is ``python -m gpu_worker`` with a slow
stand-in analyzer (``SLOW_ANALYZER_SECONDS``), for the SIGTERM tests.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.storage.blob import BlobServiceClient, ContainerClient
from psycopg_pool import ConnectionPool

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from shared.bus import DeadLetterInbox, JobPublisher, job_message
from shared.db import PostgresJobStore, open_pool
from shared.jobs import Callback, Job, Priority
from shared.messages import JobMessage
from shared.migrate import migrate
from shared.reconciler import Policy, Reconciler
from shared.settings import Settings
from shared.storage import BlobStore
from tests.fakes import RecordingOutbox
from tests.fixtures.servicebus import EmulatorHandle

DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_rgbn_fields_128.tif"
RGBN = ["B02", "B03", "B04", "B08"]


class SlowAnalyzer:
    """Sleeps (the GIL is free meanwhile, as in torch's kernels), then returns a small result, reporting its progress
    as the real analysis does per window: ``decode``, then ``indices`` every ``tick`` seconds (each report is a
    checkpoint: a cancellation stops it there). ``stubborn``: a call that swallows every interruption and reports
    nothing while it runs (as a call that never returns to Python would)."""

    def __init__(self, seconds: float, *, stubborn: bool = False, tick: float = 0.05) -> None:
        self.seconds = seconds
        self.stubborn = stubborn
        self.tick = tick
        self.calls = 0
        self.finished = 0

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        self.calls += 1
        request.progress("decode", 0.0)
        started = time.monotonic()
        deadline = started + self.seconds
        while (now := time.monotonic()) < deadline:
            if not self.stubborn:
                request.progress("indices", (now - started) / self.seconds)
            try:
                time.sleep(min(self.tick, max(deadline - time.monotonic(), 0)))
            except BaseException:
                if not self.stubborn:
                    raise
        self.finished += 1
        return AnalysisOutput(result={"analysis": request.analysis, "slept": self.seconds})


@dataclass
class WorkerStack:
    """Real PostgreSQL (migrated), Azurite and the Service Bus emulator, and the worker's environment for them."""

    env: dict[str, str]
    queue_name: str
    pool: ConnectionPool
    store: BlobStore
    client: ServiceBusClient

    @property
    def jobs(self) -> PostgresJobStore:
        return PostgresJobStore(self.pool)

    @property
    def queues(self) -> dict[str, str]:
        """Priority -> queue, as the stack's settings name them."""
        return self.settings().priority_queues

    def settings(self, **overrides: str) -> Settings:
        return Settings.from_env({**self.env, **overrides})

    def create_job(
        self,
        data: bytes | None = None,
        *,
        bands: list[str] | None = None,
        priority: Priority = "normal",
        callback: Callback | None = None,
    ) -> JobMessage:
        """A queued job whose input blob holds ``data`` (no blob when ``None``); the message is not sent."""
        job_id = uuid4()
        payload = data if data is not None else FIELDS.read_bytes()
        sha256 = hashlib.sha256(payload).hexdigest()
        blob = f"{job_id}/input.tif"
        if data is not None:
            blob = self.store.put_input(job_id, data, sha256)
        params = {"bands": bands or RGBN, "scale": 10000.0, "analysis": "crop-health"}
        job, _ = self.jobs.create(
            job_id=job_id, input_blob=blob, input_sha256=sha256, params=params, idempotency_key=None,
            priority=priority, callback=callback,
        )  # fmt: skip
        return JobMessage.for_job(job)

    def send(self, message: JobMessage | ServiceBusMessage, *, ttl: timedelta | None = None) -> None:
        sb_message = job_message(message) if isinstance(message, JobMessage) else message
        if ttl is not None:
            sb_message.time_to_live = ttl
        queue = self.queues[message.priority] if isinstance(message, JobMessage) else self.queue_name
        with self.client.get_queue_sender(queue) as sender:
            sender.send_messages(sb_message)

    def submit(self, data: bytes | None = None, **kwargs: Any) -> UUID:
        """What the submit path does: create, send generation 1, confirm the send."""
        message = self.create_job(data, **kwargs)
        self.send(message)
        assert self.jobs.confirm_sent(message.job_id, message.generation) is not None
        return message.job_id

    def job(self, job_id: UUID) -> Job:
        job = self.jobs.get(job_id)
        assert job is not None
        return job

    def reconcile(self, **overrides: str) -> Any:
        """One run of the reconciler (the timer Function's work) against these backends."""
        settings = self.settings(**overrides)
        policy = Policy(
            settings.reconcile_resend_after,
            settings.job_max_attempts,
            settings.reconcile_batch,
            settings.reconcile_abort_after,
        )
        with DeadLetterInbox(self.client, [self.queue_name]) as inbox:
            publisher = JobPublisher(self.client, self.queues)
            return Reconciler(self.jobs, self.store, publisher, inbox, policy, outbox=RecordingOutbox()).run()

    def results(self, job_id: UUID) -> set[str]:
        """The names of the job's result blobs."""
        return {b.name for b in self.results_container().list_blobs(name_starts_with=f"{job_id}/")}

    def queued(self) -> list[ServiceBusReceivedMessage]:
        with self.client.get_queue_receiver(self.queue_name) as receiver:
            return receiver.peek_messages(max_message_count=100)

    def dead_letters(self) -> list[ServiceBusReceivedMessage]:
        with self.client.get_queue_receiver(self.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
            return receiver.peek_messages(max_message_count=100)

    def wait_for(self, job_id: UUID, *statuses: str, timeout: float = 60.0) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status.value in statuses or time.monotonic() > deadline:
                return job
            time.sleep(0.1)

    def results_container(self) -> ContainerClient:
        service = BlobServiceClient.from_connection_string(self.env["AzureWebJobsStorage"])
        return service.get_container_client(self.store.results_container)

    def close(self) -> None:
        self.client.close()
        self.store.close()
        self.pool.close()


def open_worker_stack(
    servicebus_connection_string: str, database_url: str, blob_connection_string: str, tmp: Path, **env: str
) -> WorkerStack:
    migrate(database_url)
    full_env = {
        "ServiceBusConnection": servicebus_connection_string,
        "AzureWebJobsStorage": blob_connection_string,
        "DATABASE_URL": database_url,
        "WORKER_MAX_WAIT_TIME": "1",
        "WORKER_HEARTBEAT_FILE": str(tmp / "worker.heartbeat"),
        "RETRY_BACKOFF": "PT1S",
        "RETRY_BACKOFF_MAX": "PT2S",
        "JOB_LEASE": "PT6S",
        "WORKER_PROBE_MAX_INTERVAL": "1",
        "WORKER_DEVICE": "cpu",
        "DB_POOL_MIN_SIZE": "1",
        **env,
    }
    settings = Settings.from_env(full_env)
    store = BlobStore.from_settings(settings)
    store.ensure_containers()
    return WorkerStack(
        env=full_env,
        queue_name=settings.jobs_queue,
        pool=open_pool(settings),
        store=store,
        client=ServiceBusClient.from_connection_string(servicebus_connection_string),
    )


StackFactory = Callable[..., WorkerStack]


@pytest.fixture
def stack_factory(
    servicebus_emulator_factory: Callable[..., EmulatorHandle],
    database_url: str,
    blob_connection_string: str,
    tmp_path: Path,
) -> Iterator[StackFactory]:
    """``stack_factory(queue_properties, **env)``: a fresh emulator (queue "jobs" with those properties, in
    Config.json spelling) with PostgreSQL and Azurite. Import it into a test module to use it."""
    stacks: list[WorkerStack] = []

    def factory(queue: dict[str, Any] | None = None, **env: str) -> WorkerStack:
        emulator = servicebus_emulator_factory({"jobs": queue} if queue else None)
        stack = open_worker_stack(emulator.connection_string, database_url, blob_connection_string, tmp_path, **env)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.close()


if __name__ == "__main__":
    from gpu_worker.__main__ import main

    seconds = float(os.environ.get("SLOW_ANALYZER_SECONDS", "5"))
    stubborn = os.environ.get("SLOW_ANALYZER_STUBBORN") == "1"
    sys.exit(main(sys.argv[1:], analyzer=SlowAnalyzer(seconds, stubborn=stubborn)))
