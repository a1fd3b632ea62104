"""Settings, built once at an entrypoint with ``Settings.from_env()`` and injected from there.

Nothing in this package reads the environment at import time. Names are the Azure Functions app-setting names, so
the same variables work in ``local.settings.json``, in the Function App and in the worker's container:

* keyless in Azure: ``ServiceBusConnection__fullyQualifiedNamespace``, ``AzureWebJobsStorage__blobServiceUri`` and
  ``POSTGRES_HOST``/``POSTGRES_DATABASE``/``POSTGRES_USER`` (Entra token), all with ``DefaultAzureCredential``;
* locally: ``ServiceBusConnection``, ``AzureWebJobsStorage`` and ``DATABASE_URL`` connection strings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    # Service Bus
    servicebus_connection_string: str | None = Field(None, alias="ServiceBusConnection")
    servicebus_namespace: str | None = Field(None, alias="ServiceBusConnection__fullyQualifiedNamespace")
    jobs_queue: str = Field("jobs", alias="JOBS_QUEUE_NAME")  # normal priority
    jobs_high_queue: str = Field("jobs-high", alias="JOBS_HIGH_QUEUE_NAME")  # high priority (Priority Queue pattern)
    job_events_queue: str = Field("job-events", alias="JOB_EVENTS_QUEUE_NAME")  # webhook deliveries

    # Blob Storage
    storage_connection_string: str | None = Field(None, alias="AzureWebJobsStorage")
    blob_service_uri: str | None = Field(None, alias="AzureWebJobsStorage__blobServiceUri")
    images_container: str = Field("images", alias="IMAGES_CONTAINER")
    results_container: str = Field("results", alias="RESULTS_CONTAINER")
    result_sas_ttl: timedelta = Field(timedelta(hours=1), alias="RESULT_SAS_TTL")

    # PostgreSQL: a URL (local, may carry a password) or host/database/user with an Entra token (Azure)
    database_url: str | None = Field(None, alias="DATABASE_URL")
    postgres_host: str | None = Field(None, alias="POSTGRES_HOST")
    postgres_port: int = Field(5432, alias="POSTGRES_PORT")
    postgres_database: str = Field("cropai", alias="POSTGRES_DATABASE")
    postgres_user: str | None = Field(None, alias="POSTGRES_USER")
    db_pool_min_size: int = Field(1, alias="DB_POOL_MIN_SIZE")
    db_pool_max_size: int = Field(4, alias="DB_POOL_MAX_SIZE")
    # Seconds a call waits for a connection: while the database is down, submit answers 503 after this long.
    db_pool_timeout: float = Field(2.0, alias="DB_POOL_TIMEOUT")

    # Submit limits (validated before anything is stored)
    max_upload_bytes: int = Field(100 * 1024 * 1024, alias="MAX_UPLOAD_BYTES")
    max_pixels: int = Field(130_000_000, alias="MAX_PIXELS")  # a full 10980 x 10980 Sentinel-2 tile fits
    max_bands: int = Field(32, alias="MAX_BANDS")
    retry_after_seconds: int = Field(5, alias="RETRY_AFTER_SECONDS")
    max_backlog: int = Field(10_000, alias="MAX_BACKLOG", ge=1)  # queued jobs above which submit answers 429
    max_batch_size: int = Field(100, alias="MAX_BATCH_SIZE", ge=1)
    max_fields: int = Field(100, alias="MAX_FIELDS", ge=1)  # field boundaries per job (shared.fields)

    # Inputs by reference (shared.inputs): a direct upload (POST /api/uploads) or an image_url
    max_input_bytes: int = Field(8 * 1024**3, alias="MAX_INPUT_BYTES", ge=1)  # an uploaded or referenced image
    # the upload URL's lifetime: a user delegation SAS lives at most 7 days
    upload_sas_ttl: timedelta = Field(timedelta(hours=1), alias="UPLOAD_SAS_TTL", gt=timedelta(0), le=timedelta(days=7))
    # Hosts an image_url may name outside the deployment's storage account (https COGs): exact names or *.suffix,
    # comma-separated. Empty: only blobs of the account's images container.
    image_url_allowed_hosts: str = Field("", alias="IMAGE_URL_ALLOWED_HOSTS")

    # Webhooks (Standard Webhooks, delivered by the job-events queue's Service Bus-triggered function)
    webhook_allow_private: bool = Field(False, alias="WEBHOOK_ALLOW_PRIVATE")  # local only: http, loopback targets
    webhook_timeout: float = Field(10.0, alias="WEBHOOK_TIMEOUT")  # seconds per delivery attempt
    webhook_max_attempts: int = Field(8, alias="WEBHOOK_MAX_ATTEMPTS", ge=1)
    webhook_backoff: timedelta = Field(timedelta(seconds=5), alias="WEBHOOK_BACKOFF")  # doubled per attempt
    webhook_backoff_max: timedelta = Field(timedelta(minutes=10), alias="WEBHOOK_BACKOFF_MAX")

    # The job lifecycle (shared.lifecycle): attempts, leases, time limit, retries, reconciliation
    job_max_attempts: int = Field(5, alias="JOB_MAX_ATTEMPTS", ge=1)
    job_lease: timedelta = Field(timedelta(minutes=2), alias="JOB_LEASE")  # renewed every third of it while running
    job_timeout: timedelta = Field(timedelta(hours=1), alias="JOB_TIMEOUT")  # one attempt's time limit
    retry_backoff: timedelta = Field(timedelta(seconds=10), alias="RETRY_BACKOFF")  # doubled per attempt
    retry_backoff_max: timedelta = Field(timedelta(minutes=5), alias="RETRY_BACKOFF_MAX")
    reconcile_resend_after: timedelta = Field(timedelta(minutes=2), alias="RECONCILE_RESEND_AFTER")
    # A never-attempted job whose image is missing is failed this long after its submit (> host.json functionTimeout)
    reconcile_abort_after: timedelta = Field(timedelta(minutes=10), alias="RECONCILE_ABORT_AFTER")
    reconcile_batch: int = Field(100, alias="RECONCILE_BATCH", ge=1)  # jobs (and dead letters) per step and run
    reconcile_schedule: str = Field("0 */1 * * * *", alias="RECONCILE_SCHEDULE")  # NCRONTAB; read by the trigger
    # Short on purpose: a submit while a backend is down answers within ~2 s; the worker retries whole attempts.
    bus_send_timeout: float = Field(2.0, alias="BUS_SEND_TIMEOUT")  # seconds one send may take, retries included
    storage_retry_total: int = Field(1, alias="STORAGE_RETRY_TOTAL")

    # Worker
    # Seconds an idle worker waits on each job queue per receive (jobs-high, then jobs), capped at 0.5
    # (gpu_worker.inbox.IDLE_WAIT): about the longest an idle worker takes to pick up a job.
    worker_max_wait_time: float = Field(0.5, alias="WORKER_MAX_WAIT_TIME")
    worker_shutdown_grace: float = Field(30.0, alias="WORKER_SHUTDOWN_GRACE")
    worker_device: str = Field("auto", alias="WORKER_DEVICE")  # auto | cpu | cuda | cuda:N
    # CPU threads one worker process gives torch, LightGBM and GDAL's decoding. 0: the CPUs this process may run on
    # divided by WORKER_PROCESSES (the worker processes sharing the machine), so that they do not fight over cores.
    worker_threads: int = Field(0, alias="WORKER_THREADS", ge=0)
    worker_processes: int = Field(1, alias="WORKER_PROCESSES", ge=1)
    worker_heartbeat_file: str = Field("/tmp/crop-ai-worker.heartbeat", alias="WORKER_HEARTBEAT_FILE")
    worker_heartbeat_max_age: float = Field(120.0, alias="WORKER_HEARTBEAT_MAX_AGE")  # seconds, for --healthcheck
    worker_probe_max_interval: float = Field(30.0, alias="WORKER_PROBE_MAX_INTERVAL")  # circuit breaker backoff cap
    # After this many high-priority jobs in a row, a worker takes one normal job if one waits (no starvation).
    worker_high_priority_burst: int = Field(4, alias="WORKER_HIGH_PRIORITY_BURST", ge=1)
    # Messages a worker holds at once, received and not yet settled (gpu_worker.pipeline): 1 is strictly one at a
    # time; 2 downloads the next job (or uploads the last) while one is analysed. Each extra one is a message locked
    # to this worker that an idle worker elsewhere cannot take.
    worker_jobs_in_flight: int = Field(2, alias="WORKER_JOBS_IN_FLIGHT", ge=1)
    # Jobs a worker analyses at once, at most WORKER_JOBS_IN_FLIGHT (gpu_worker.pipeline). 0: 1 on the CPU (the torch
    # threads are sized for one analysis), 2 on CUDA (two scenes' windows share the GPU's cover-MLP batches).
    worker_analyses: int = Field(0, alias="WORKER_ANALYSES", ge=0)
    # The cover MLP through the process's dynamic batcher (gpu_worker.analysis.batcher). Unset: on CUDA only.
    analysis_batching: bool | None = Field(None, alias="ANALYSIS_BATCHING")
    # The cover MLP under torch.autocast (bfloat16 | float16; empty: float32). Faster, not exact: the tolerance is in
    # gpu_worker/analysis/batcher.py and docs/performance.md.
    analysis_mixed_precision: Literal["", "bfloat16", "float16"] = Field("", alias="ANALYSIS_MIXED_PRECISION")
    worker_registry_interval: float = Field(15.0, alias="WORKER_REGISTRY_INTERVAL")  # heartbeat row in Postgres
    worker_preemption_watch: bool = Field(False, alias="WORKER_PREEMPTION_WATCH")  # Azure Scheduled Events (Spot VMs)
    models_dir: str | None = Field(None, alias="MODELS_DIR")

    # Observability
    applicationinsights_connection_string: str | None = Field(None, alias="APPLICATIONINSIGHTS_CONNECTION_STRING")
    service_name: str = Field("crop-ai", alias="OTEL_SERVICE_NAME")
    otel_traces_exporter: str = Field("none", alias="OTEL_TRACES_EXPORTER")  # none | console (no App Insights)

    @model_validator(mode="after")
    def _one_way_to_each_backend(self) -> Settings:
        if not (self.servicebus_connection_string or self.servicebus_namespace):
            raise ValueError("set ServiceBusConnection or ServiceBusConnection__fullyQualifiedNamespace")
        if not (self.storage_connection_string or self.blob_service_uri):
            raise ValueError("set AzureWebJobsStorage or AzureWebJobsStorage__blobServiceUri")
        if not (self.database_url or (self.postgres_host and self.postgres_user)):
            raise ValueError("set DATABASE_URL, or POSTGRES_HOST and POSTGRES_USER for Entra authentication")
        if self.job_timeout <= self.job_lease:
            raise ValueError("JOB_TIMEOUT must be longer than JOB_LEASE")
        if self.worker_analyses > self.worker_jobs_in_flight:
            raise ValueError("WORKER_ANALYSES must be at most WORKER_JOBS_IN_FLIGHT")
        return self

    @property
    def allowed_image_hosts(self) -> tuple[str, ...]:
        """``IMAGE_URL_ALLOWED_HOSTS`` as lower-case names (``*.example.com`` allows every subdomain)."""
        return tuple(h.strip().lower().rstrip(".") for h in self.image_url_allowed_hosts.split(",") if h.strip())

    def queue(self, priority: str) -> str:
        """The queue that carries jobs of ``priority``."""
        return self.jobs_high_queue if priority == "high" else self.jobs_queue

    @property
    def priority_queues(self) -> dict[str, str]:
        """Priority -> the queue that carries it."""
        return {"high": self.jobs_high_queue, "normal": self.jobs_queue}

    @property
    def analysis_threads(self) -> int:
        """``WORKER_THREADS``, or (0) this process's CPUs divided among ``WORKER_PROCESSES``, at least 1."""
        if self.worker_threads:
            return self.worker_threads
        return max(1, len(os.sched_getaffinity(0)) // self.worker_processes)

    @property
    def job_queues(self) -> tuple[str, str]:
        """Both job queues, high priority first."""
        return (self.jobs_high_queue, self.jobs_queue)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``); unknown variables are ignored."""
        return cls.model_validate(dict(os.environ if environ is None else environ))
