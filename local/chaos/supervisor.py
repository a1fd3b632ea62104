"""The chaos run's stack: started as ``local.stack.up`` starts it, then stopped, killed and restarted service by
service, as a process supervisor would, on the same ports and data directories.

``ROOT/stack.json`` is kept current after every change, so ``python -m local.stack down --root ROOT`` stops what a
crashed harness left behind. Methods may be called from several threads: victims are chosen and the registry is
changed under one lock; starting a service (which waits until it is ready) happens outside it. Once :meth:`close`
ran, a service that finishes starting is stopped at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from local import services
from local.postgres import reachable_data_dir, start_postgres
from local.processes import Service, command_line, is_alive, stop
from local.services import Launcher
from local.stack import REPO_ROOT, StackConfig, stack_file, up

logger = logging.getLogger(__name__)

BACKENDS = ("postgres", "azurite", "servicebus", "functions")
CODE = ("function_app.py", "host.json", "shared", "functions", "gpu_worker", "local")  # what the services import


class SupervisorError(RuntimeError):
    """A service could not be stopped or started again."""


class Supervisor:
    def __init__(self, config: StackConfig, environ: Mapping[str, str], rng: random.Random) -> None:
        self.config = config
        self.root = config.root.resolve()
        self.environ = dict(environ)
        self.rng = rng
        self.state: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.backends: dict[str, Service] = {}
        self.workers: list[Service] = []
        self._launcher = Launcher(self.root, config.repo, self.environ)
        self._lock = threading.Lock()
        self._next_worker = config.workers
        self._closed = False

    def start(self) -> None:
        durable_postgres(self.root)
        self.state = up(self.config, self.environ)
        for service in map(Service.from_json, self.state["services"]):
            if service.name in BACKENDS:
                self.backends[service.name] = service
            else:
                self.workers.append(service)
        self.env = services.service_env(
            self.environ,
            self.state["database_url"],
            self.state["blob_connection_string"],
            self.state["servicebus_connection_string"],
            self.state["queue_name"],
            self.config.service_settings(),
        )

    # Workers

    def kill_worker(self, sig: signal.Signals, prefer_busy_for: float) -> dict[str, Any]:
        """Signal a worker (a busy one if one gets busy within ``prefer_busy_for`` s), wait until it exited, start
        a replacement; what happened."""
        waited = time.monotonic()
        victim, busy = self._pick_worker(prefer_busy_for)
        if victim is None:
            return {"skipped": "no live worker"}
        waited = time.monotonic() - waited
        exited = self._end(victim, sig, victim.grace if sig is signal.SIGTERM else 10.0)
        replacement = self._start_worker()
        return {
            "worker": victim.name,
            "pid": victim.pid,
            "busy": busy,
            "waited_s": round(waited, 2),  # for a busy worker
            "exited": exited,
            "replacement": replacement.name,
        }

    def _pick_worker(self, prefer_busy_for: float) -> tuple[Service | None, bool]:
        deadline = time.monotonic() + prefer_busy_for
        while True:
            with self._lock:
                live = [w for w in self.workers if is_alive(w.pid)]
                busy = [w for w in live if self._busy(w)]
                if busy or (live and time.monotonic() >= deadline):
                    victim = self.rng.choice(busy or live)
                    self.workers.remove(victim)
                    return victim, bool(busy)
                if not live and time.monotonic() >= deadline:
                    return None, False
            time.sleep(0.005)

    def _busy(self, worker: Service) -> bool:
        try:
            beat = json.loads((self.root / f"{worker.name}.heartbeat").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(beat, dict) and beat.get("busy_since") is not None

    def _start_worker(self) -> Service:
        with self._lock:
            index = self._next_worker
            self._next_worker += 1
        service = self._launcher.worker(index, self.env)
        with self._lock:
            self.workers.append(service)
        self._changed(service)
        return service

    # Backends: stop, then start again on the same port and data directory

    def kill_backend(self, name: str, sig: signal.Signals, grace: float = 30.0) -> Service:
        with self._lock:
            service = self.backends.pop(name)
        self._end(service, sig, grace)
        self._write_state()
        return service

    def restart_crashed(self) -> list[dict[str, Any]]:
        """Start again, as a supervisor would, every service that exited without being told to; what was found."""
        with self._lock:
            workers = [w for w in self.workers if not is_alive(w.pid)]
            backends = [b for b in self.backends.values() if not is_alive(b.pid)]
            self.workers = [w for w in self.workers if w not in workers]
            for backend in backends:
                del self.backends[backend.name]
            if self._closed:
                return []
        crashed = []
        for service in [*backends, *workers]:
            logger.error("chaos: %s (PID %d) exited on its own; starting it again", service.name, service.pid)
            replacement = self._start_worker() if service in workers else self.start_backend(service)
            crashed.append({"service": service.name, "pid": service.pid, "replacement_pid": replacement.pid})
        return crashed

    def start_backend(self, old: Service) -> Service:
        assert old.port is not None, "every backend listens on a port"
        if old.name == "postgres":
            url, started = self._launcher.postgres(old.port)
            if url != self.state["database_url"]:
                raise SupervisorError(f"postgres came back at {url}, not {self.state['database_url']}")
            assert started is not None, "the stack's own PostgreSQL, not a DATABASE_URL"
            service = started
        elif old.name == "azurite":
            service = self._launcher.azurite(old.port)[1]
        elif old.name == "servicebus":
            service = self._launcher.servicebus(old.port, self.config.servicebus_config)[2]
        else:
            service = self._launcher.functions_host(old.port, self.env)[1]
        with self._lock:
            self.backends[old.name] = service
        self._changed(service)
        return service

    # Bookkeeping

    def _signal(self, service: Service, sig: signal.Signals) -> None:
        if not is_alive(service.pid) or service.marker not in command_line(service.pid):
            raise SupervisorError(f"{service.name} (PID {service.pid}) is not running")
        logger.warning("chaos: %s %s (PID %d)", sig.name, service.name, service.pid, extra={"action": "chaos_signal"})
        os.kill(service.pid, sig)

    def _end(self, service: Service, sig: signal.Signals, grace: float) -> bool:
        """Send ``sig``; SIGKILL after ``grace`` seconds. Whether ``sig`` alone ended it."""
        self._signal(service, sig)
        if self._wait_exit(service, grace):
            return True
        logger.warning("%s (PID %d) ignored %s for %g s; SIGKILL", service.name, service.pid, sig.name, grace)
        os.kill(service.pid, signal.SIGKILL)
        self._wait_exit(service, 30.0)
        return False

    def _wait_exit(self, service: Service, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while is_alive(service.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _changed(self, service: Service) -> None:
        """A service just started: record it, or stop it at once when the run is over."""
        with self._lock:
            closed = self._closed
        if closed:
            stop(service)
        self._write_state()

    def _write_state(self) -> None:
        with self._lock:
            live = [*self.backends.values(), *self.workers]
            state = {**self.state, "services": [s.to_json() for s in live]}
            path = stack_file(self.root)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            os.replace(tmp, path)

    def close(self) -> None:
        """Stop everything: workers first, then the backends, newest first; remove ``stack.json``."""
        with self._lock:
            self._closed = True
            order = [*reversed(self.workers), *reversed(list(self.backends.values()))]
        for service in order:
            logger.info("%s (PID %d): %s", service.name, service.pid, stop(service), extra={"action": "stop"})
        stack_file(self.root).unlink(missing_ok=True)


def data_root(base: Path) -> Path:
    """A new directory for one run under ``base`` (``.local/chaos/<UTC time>``), searchable by PostgreSQL's user."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root = base / stamp
    root.mkdir(parents=True)
    root.chmod(0o755)  # PostgreSQL runs as nobody when we are root (local.postgres falls back to /tmp otherwise)
    return root


def durable_postgres(root: Path) -> None:
    """Create the run's database with ``synchronous_commit = on`` for every session, as on Azure's servers.

    The stack's PostgreSQL runs with ``synchronous_commit=off`` (fast; data that may be lost): a commit is
    acknowledged before its WAL is written, so the crash this run inflicts (an immediate shutdown) would lose jobs
    the API had accepted. A database-level setting overrides the server's command line; ``local.stack.up`` then
    starts the server again on this data directory.
    """
    log = root / "logs" / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = start_postgres(reachable_data_dir(root / "postgres"), None, log)
    try:
        with psycopg.connect(server.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("ALTER DATABASE postgres SET synchronous_commit = on")
    finally:
        server.stop()


def synchronous_commit(database_url: str) -> str:
    """The ``synchronous_commit`` a new session of the stack's services gets."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    return str(row[0]) if row else "unknown"


def copy_code(root: Path) -> Path:
    """A copy of the services' code in ``ROOT/code``: the run tests the tree as it was when it started, whatever is
    edited meanwhile (a restarted host or worker would otherwise run newer code than the migrated schema)."""
    code = root / "code"
    code.mkdir()
    for name in CODE:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, code / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, code / name)
    return code
