"""The worker process, wired: settings in, clients opened with ``with``, the consumer run until drained.

The consumer returns once every message in hand is settled; only then is the shutdown ``drained`` (a preemption
notice is acknowledged then).

Kept apart from ``__main__`` so that ``python -m gpu_worker --healthcheck`` does not import torch or the SDKs.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from gpu_worker.breaker import Breaker
from gpu_worker.consumer import AttemptLimits, Consumer
from gpu_worker.gauges import CudaProbe, GpuProbe, watch_worker
from gpu_worker.handler import Analyzer, JobHandler
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.inbox import RECEIVE_SOCKET_TIMEOUT, PriorityInbox
from gpu_worker.locks import LostLocks
from gpu_worker.malloc import limit_arenas
from gpu_worker.registry import Presence
from gpu_worker.renewal import LockRenewer
from gpu_worker.settlement import RetryPolicy
from gpu_worker.shutdown import Shutdown
from shared.bus import JobPublisher, servicebus_client
from shared.db import PostgresJobStore, QuickCheck, open_pool
from shared.events import open_notifier
from shared.settings import Settings
from shared.storage import BlobStore
from shared.telemetry import configure_telemetry
from shared.workers import WorkerRegistry

logger = logging.getLogger("gpu_worker")


def _load_analyzer(settings: Settings) -> tuple[Analyzer, str, GpuProbe | None]:
    """The torch analyzer, its device as the ``workers`` row shows it (``cuda:0 (NVIDIA H100 ...)``, ``cpu``), and
    the probe of its GPU's metrics (``None`` without CUDA)."""
    import torch

    from gpu_worker.analysis import Analyzer as TorchAnalyzer  # torch: only in the consumer, not the healthcheck
    from gpu_worker.analysis import select_device

    models_dir = Path(settings.models_dir) if settings.models_dir else None
    device = select_device(settings.worker_device)
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    probe = CudaProbe(device) if device.type == "cuda" else None
    precision = getattr(torch, settings.analysis_mixed_precision) if settings.analysis_mixed_precision else None
    analyzer = TorchAnalyzer(
        device, models_dir, threads=settings.analysis_threads, batching=settings.analysis_batching, precision=precision
    )
    return analyzer, name, probe


def analyses(settings: Settings, device: str) -> int:
    """Jobs analysed at once: ``WORKER_ANALYSES``, or by default 2 on CUDA (their windows share the cover MLP's
    batches) and 1 elsewhere; never more than ``WORKER_JOBS_IN_FLIGHT``."""
    wanted = settings.worker_analyses or (2 if device.startswith("cuda") else 1)
    return min(wanted, settings.worker_jobs_in_flight)


def pool_size(settings: Settings) -> int:
    """Connections the worker may use at once: per job in flight, the thread of its stage and its attempt's guard
    (:mod:`gpu_worker.attempt`); then the registry and a notifier's flush. ``DB_POOL_MAX_SIZE`` if larger. Fewer
    would make a thread wait for a connection, and past ``DB_POOL_TIMEOUT`` read that as the database being down."""
    return max(settings.db_pool_max_size, 2 * settings.worker_jobs_in_flight + 2)


def start_preemption_watch(shutdown: Shutdown, stop: threading.Event, **watcher: Any) -> threading.Thread:
    """Spot ``Preempt`` / scale-in ``Terminate``: the same drain as SIGTERM, acknowledged once drained."""
    from gpu_worker.preemption import PreemptionWatcher

    on_notice = functools.partial(shutdown.request, "preemption notice")
    return PreemptionWatcher(on_notice, drained=shutdown.drained.wait, **watcher).start(stop)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run(settings: Settings, *, analyzer: Analyzer | None = None, max_jobs: int | None = None) -> int:
    """Consume until drained; ``analyzer`` replaces the torch one (tests inject a slow or failing one)."""
    limit_arenas()  # before any thread of ours starts
    configure_telemetry(settings, role="gpu-worker")
    analyzer, device, gpu = (analyzer, settings.worker_device, None) if analyzer else _load_analyzer(settings)
    shutdown = Shutdown(settings.worker_shutdown_grace)
    restore_signals = shutdown.install()
    stop_watchers = threading.Event()
    if settings.worker_preemption_watch:
        start_preemption_watch(shutdown, stop_watchers)
    pool = open_pool(settings, max_size=pool_size(settings), check=QuickCheck())
    store = BlobStore.from_settings(settings)
    try:
        jobs = PostgresJobStore(pool)
        locks = LostLocks()
        renewer = LockRenewer(locks.on_renew_failure)  # each message in hand, until its settlement
        with (
            servicebus_client(settings) as client,
            renewer,
            # No auto_lock_renewer of their own: the inbox registers each message through its SerialReceiver.
            client.get_queue_receiver(settings.jobs_high_queue, socket_timeout=RECEIVE_SOCKET_TIMEOUT) as high,
            client.get_queue_receiver(settings.jobs_queue, socket_timeout=RECEIVE_SOCKET_TIMEOUT) as normal,
        ):
            me = worker_id()
            heartbeat = Heartbeat(Path(settings.worker_heartbeat_file))
            unwatch = watch_worker(
                heartbeat,
                worker=me,
                device=device,
                max_age=settings.worker_heartbeat_max_age,
                busy_limit=settings.job_timeout.total_seconds(),
                gpu=gpu,
            )
            presence = Presence(
                WorkerRegistry(pool), me, socket.gethostname(), device, interval=settings.worker_registry_interval
            ).start()
            consumer = Consumer(
                PriorityInbox(
                    normal,
                    high,
                    burst=settings.worker_high_priority_burst,
                    wait=settings.worker_max_wait_time,
                    locks=locks,
                    renewer=renewer,
                ),
                jobs,
                JobHandler(
                    jobs,
                    store,
                    analyzer,
                    remote=store,
                    read_ttl=settings.job_timeout + timedelta(minutes=10),
                    allowed_hosts=settings.allowed_image_hosts,
                ),
                # Its sender is closed with the client (JobPublisher.close would close the shared client).
                JobPublisher(client, settings.priority_queues, timeout=settings.bus_send_timeout),
                shutdown,
                heartbeat,
                locks,
                Breaker(
                    {"postgres": jobs.ping, "storage": store.ping}, max_interval=settings.worker_probe_max_interval
                ),
                worker_id=me,
                device=device,
                retry=RetryPolicy(settings.job_max_attempts, settings.retry_backoff, settings.retry_backoff_max),
                limits=AttemptLimits(settings.job_lease, settings.job_timeout, settings.worker_shutdown_grace),
                notifier=open_notifier(pool, client, settings.job_events_queue, timeout=settings.bus_send_timeout),
                presence=presence,
                in_flight=settings.worker_jobs_in_flight,
                analyses=analyses(settings, device),
            )
            logger.info("worker ready on queues %s", ", ".join(settings.job_queues), extra={"action": "ready"})
            try:
                handled = consumer.run(max_jobs=max_jobs)
            finally:
                presence.close()
                unwatch()
            renewer.close()  # before the receivers close: no renewal may race the links' detach
        logger.info(
            "worker stopped after %d messages: %s",
            handled,
            {a.value: n for a, n in consumer.settled.items()},
            extra={"action": "stopped"},
        )
    finally:
        shutdown.finished()
        stop_watchers.set()
        store.close()
        pool.close()
        restore_signals()
    return 0
