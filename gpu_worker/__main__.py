"""``python -m gpu_worker``: the consumer process. Wiring only: settings once, clients opened with ``with``.

Flags: ``--once`` (one receive batch, then drain and exit), ``--max-jobs N`` (exit after N messages),
``--healthcheck [--max-age S]`` (exit 0 when the heartbeat file is fresh; the Dockerfile's HEALTHCHECK runs it).
Exit status 0 after a drain (SIGTERM/SIGINT, preemption notice, ``--once``/``--max-jobs``), 1 when the heartbeat is
stale, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from azure.servicebus import AutoLockRenewer

from gpu_worker.consumer import Consumer, LockLosses
from gpu_worker.deadletters import DeadLetterWatcher
from gpu_worker.handler import Analyzer, JobHandler
from gpu_worker.heartbeat import Heartbeat, check
from gpu_worker.shutdown import Shutdown
from shared.bus import servicebus_client
from shared.db import PostgresJobRepository, open_pool
from shared.settings import Settings
from shared.storage import BlobStore
from shared.telemetry import configure_telemetry

logger = logging.getLogger("gpu_worker")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="handle one receive batch, then exit")
    parser.add_argument("--max-jobs", type=int, metavar="N", help="exit after handling N messages")
    parser.add_argument("--healthcheck", action="store_true", help="exit 0 if the heartbeat file is fresh")
    parser.add_argument("--max-age", type=float, metavar="S", help="heartbeat age limit (WORKER_HEARTBEAT_MAX_AGE)")
    return parser.parse_args(argv)


def healthcheck(settings: Settings, max_age: float | None) -> int:
    healthy, why = check(
        Path(settings.worker_heartbeat_file),
        max_age=settings.worker_heartbeat_max_age if max_age is None else max_age,
        busy_limit=settings.worker_max_lock_renewal.total_seconds(),
    )
    print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


def _load_analyzer(settings: Settings) -> Analyzer:
    from gpu_worker.analysis import Analyzer as TorchAnalyzer  # torch: only in the consumer, not the healthcheck
    from gpu_worker.analysis import select_device

    models_dir = Path(settings.models_dir) if settings.models_dir else None
    return TorchAnalyzer(select_device(settings.worker_device), models_dir)


def _start_preemption_watch(shutdown: Shutdown, stop: threading.Event) -> None:
    from gpu_worker.preemption import PreemptionWatcher

    PreemptionWatcher(lambda: shutdown.request("preemption notice"), drained=shutdown.drained.wait).start(stop)


def run(
    settings: Settings, *, analyzer: Analyzer | None = None, max_jobs: int | None = None, once: bool = False
) -> int:
    """Consume until drained; ``analyzer`` replaces the torch one (tests inject a slow or failing one)."""
    configure_telemetry(settings, role="gpu-worker")
    analyzer = analyzer or _load_analyzer(settings)
    shutdown = Shutdown(settings.worker_shutdown_grace)
    restore_signals = shutdown.install()
    stop_watchers = threading.Event()
    if settings.worker_preemption_watch:
        _start_preemption_watch(shutdown, stop_watchers)
    pool = open_pool(settings)
    store = BlobStore.from_settings(settings)
    try:
        repo = PostgresJobRepository(pool)
        lock_losses = LockLosses()
        renewer = AutoLockRenewer(
            max_lock_renewal_duration=settings.worker_max_lock_renewal.total_seconds(),
            on_lock_renew_failure=lock_losses,
        )
        with (
            servicebus_client(settings) as client,
            renewer,
            client.get_queue_receiver(settings.jobs_queue, auto_lock_renewer=renewer) as receiver,
        ):
            watcher = DeadLetterWatcher(
                client, settings.jobs_queue, repo, interval=settings.worker_deadletter_poll_interval
            )
            consumer = Consumer(
                receiver,
                JobHandler(repo, store, analyzer),
                repo,
                shutdown,
                Heartbeat(Path(settings.worker_heartbeat_file)),
                lock_losses,
                max_delivery_count=settings.queue.max_delivery_count,
                max_message_count=settings.worker_max_message_count,
                max_wait_time=settings.worker_max_wait_time,
                after_batch=watcher.poll_if_due,
            )
            logger.info("worker ready on queue %s", settings.jobs_queue, extra={"action": "ready"})
            handled = consumer.run(max_jobs=max_jobs, once=once)
            renewer.close(wait=False)  # before the receiver closes: no renewal may race the link's detach
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


def main(argv: list[str] | None = None, *, analyzer: Analyzer | None = None) -> int:
    args = _arguments(argv)
    settings = Settings.from_env()
    if args.healthcheck:
        return healthcheck(settings, args.max_age)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(settings, analyzer=analyzer, max_jobs=args.max_jobs, once=args.once)


if __name__ == "__main__":
    sys.exit(main())
