"""How the stack starts each service: command, settings, readiness, and the ``Service`` record for ``stack.json``.

Every service listens on 127.0.0.1. A port of 0 means any free port; a chosen port that is taken is reported as
such (PostgreSQL alone falls back to a free port: clients only ever read its URL from ``stack.json``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

from local.azurite import AzuriteError, start_azurite
from local.functions_host.routes import load_route_prefix
from local.ports import LOOPBACK, ensure_free, free_port, is_listening
from local.postgres import PostgresError, reachable_data_dir, start_postgres
from local.processes import Service, spawn, wait_bound, wait_ready
from local.servicebus_emulator.process import connection_string
from shared.settings import Settings

logger = logging.getLogger(__name__)

SERVICEBUS_READY = "Service Bus emulator ready: "
FUNCTIONS_READY = "Functions host ready: "
# Settings that would point the services somewhere else than the stack's own backends.
_REPLACED = (
    "ServiceBusConnection__fullyQualifiedNamespace",
    "AzureWebJobsStorage__blobServiceUri",
    "POSTGRES_HOST",
    "POSTGRES_USER",
)


class SetupFailed(RuntimeError):
    """A step between services (a backend, migrations, containers) failed."""


def first_queue(config: Path) -> str:
    data = json.loads(config.read_text())
    return str(data["UserConfig"]["Namespaces"][0]["Queues"][0]["Name"])


def service_env(
    environ: Mapping[str, str], database_url: str, blob: str, bus: str, queue: str, extra: Mapping[str, str]
) -> dict[str, str]:
    """The settings every Python service of the stack gets (the Settings aliases), over the caller's environment."""
    env = {k: v for k, v in environ.items() if k not in _REPLACED}
    env.update(
        DATABASE_URL=database_url,
        AzureWebJobsStorage=blob,
        ServiceBusConnection=bus,
        JOBS_QUEUE_NAME=queue,
        FUNCTIONS_WORKER_RUNTIME="python",
        PYTHONUNBUFFERED="1",
    )
    # The reconciler's timer resolves %RECONCILE_SCHEDULE% from the app settings, as in Azure (Bicep sets it there).
    env.setdefault("RECONCILE_SCHEDULE", str(Settings.model_fields["reconcile_schedule"].default))
    # So does the webhook deliverer's Service Bus trigger with %JOB_EVENTS_QUEUE_NAME%.
    env.setdefault("JOB_EVENTS_QUEUE_NAME", str(Settings.model_fields["job_events_queue"].default))
    # Webhook receivers in local development and tests listen on loopback over http (refused in Azure).
    env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    env.update(extra)
    return env


def worker_env(env: Mapping[str, str], workers: int) -> dict[str, str]:
    """``env`` for each of ``workers`` worker processes on this machine: ``WORKER_PROCESSES`` tells each to take its
    share of the CPUs (``Settings.analysis_threads``), and ``OMP_NUM_THREADS`` sizes the OpenMP pool to it before
    torch starts. Without them, two workers on two cores ran 2 x 2 threads and were slower than one worker."""
    out = dict(env)
    out.setdefault("WORKER_PROCESSES", str(max(1, workers)))
    threads = max(1, len(os.sched_getaffinity(0)) // int(out["WORKER_PROCESSES"]))
    out.setdefault("OMP_NUM_THREADS", str(int(out.get("WORKER_THREADS") or 0) or threads))
    return out


class Launcher:
    def __init__(self, root: Path, repo: Path, environ: Mapping[str, str]) -> None:
        self.root = root
        self.repo = repo
        self.environ = environ
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def postgres(self, port: int) -> tuple[str, Service | None]:
        url = self.environ.get("DATABASE_URL")
        if url:
            logger.info("postgres: using DATABASE_URL from the environment; nothing started")
            return url, None
        if port == 0 or is_listening(port):
            if port:
                logger.info("postgres: port %d is busy; using a free port", port)
            port = free_port()
        log = self.logs / "postgres.log"
        try:
            server = start_postgres(reachable_data_dir(self.root / "postgres"), port, log)
        except (PostgresError, OSError) as e:
            raise SetupFailed(f"postgres: {e}") from e
        if server.pid is None:
            raise SetupFailed("postgres: started by pgserver, which the stack cannot stop by PID; set DATABASE_URL")
        logger.info("postgres: ready on port %d", port)
        return server.url, Service("postgres", server.pid, str(server.log or log), "postgres", port, "SIGINT", 30.0)

    def migrate(self, env: Mapping[str, str]) -> None:
        if importlib.util.find_spec("shared.migrate") is None:
            logger.warning("migrations: shared.migrate is not there yet; the database schema was NOT created")
            return
        log = self.logs / "migrate.log"
        with log.open("ab") as out:
            done = subprocess.run(
                [sys.executable, "-m", "shared.migrate"],
                env=dict(env),
                cwd=self.repo,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise SetupFailed(f"migrations failed (exit {done.returncode}); see {log}")
        logger.info("migrations: applied")

    def azurite(self, port: int) -> tuple[str, Service]:
        """On ``port``, or (0) on one Azurite binds itself."""
        log = self.logs / "azurite.log"
        try:
            azurite = start_azurite(self.root / "azurite", port or None, log)
        except AzuriteError as e:
            raise SetupFailed(f"azurite: {e}") from e
        logger.info("azurite: ready on port %d", azurite.port)
        service = Service("azurite", azurite.process.pid, str(log), "azurite-blob", azurite.port)
        return azurite.connection_string, service

    def containers(self, blob: str, extra: Mapping[str, str]) -> None:
        names = (extra.get("IMAGES_CONTAINER", "images"), extra.get("RESULTS_CONTAINER", "results"))
        with BlobServiceClient.from_connection_string(blob) as client:
            for name in names:
                with contextlib.suppress(ResourceExistsError):
                    client.create_container(name)

    def servicebus(self, port: int, config: Path) -> tuple[str, str, Service]:
        """On ``port``, or (0) on one the emulator binds itself and names in its ready line."""
        if port:
            ensure_free(port, "the Service Bus emulator")
        log = self.logs / "servicebus.log"
        argv = [sys.executable, "-m", "local.servicebus_emulator", "--config", str(config)]
        argv += ["--host", LOOPBACK, "--port", str(port), "--data-dir", str(self.root / "servicebus")]
        proc, offset = spawn(argv, log, self.environ, self.repo)
        try:
            port = wait_bound("servicebus", proc, log, timeout=60, ready_line=SERVICEBUS_READY, offset=offset)
        except Exception:
            proc.kill()
            raise
        logger.info("servicebus: ready on port %d", port)
        service = Service("servicebus", proc.pid, str(log), "local.servicebus_emulator", port)
        return connection_string(LOOPBACK, port), first_queue(config), service

    def functions_host(self, port: int, env: Mapping[str, str]) -> tuple[str, Service]:
        """On ``port``, or (0) on one the host binds itself and names in its ready line."""
        if port:
            ensure_free(port, "the Functions host")
        log = self.logs / "functions.log"
        argv = [sys.executable, "-m", "local.functions_host", "--app", "function_app:app"]
        argv += ["--host", LOOPBACK, "--port", str(port), "--host-json", str(self.repo / "host.json")]
        argv += ["--state-dir", str(self.root / "functions-host")]  # the timers' schedule monitor keeps its state here
        proc, offset = spawn(argv, log, env, self.repo)
        try:
            port = wait_bound("functions host", proc, log, timeout=60, ready_line=FUNCTIONS_READY, offset=offset)
        except Exception:
            proc.kill()
            raise
        prefix = load_route_prefix(self.repo / "host.json")
        api_url = f"http://{LOOPBACK}:{port}" + (f"/{prefix}" if prefix else "")
        logger.info("functions host: ready at %s", api_url)
        return api_url, Service("functions", proc.pid, str(log), "local.functions_host", port)

    def worker(self, index: int, env: Mapping[str, str]) -> Service:
        name = f"worker-{index}"
        log = self.logs / f"{name}.log"
        heartbeat = self.root / f"{name}.heartbeat"
        heartbeat.unlink(missing_ok=True)
        env = {**env, "WORKER_HEARTBEAT_FILE": str(heartbeat)}
        proc, _ = spawn([sys.executable, "-m", "gpu_worker"], log, env, self.repo)
        try:
            wait_ready(name, proc, log, timeout=180, probe=heartbeat.exists)
        except Exception:
            proc.kill()
            raise
        grace = float(env.get("WORKER_SHUTDOWN_GRACE", "30")) + 15
        logger.info("%s: ready (PID %d)", name, proc.pid)
        return Service(name, proc.pid, str(log), "gpu_worker", None, "SIGTERM", grace)
