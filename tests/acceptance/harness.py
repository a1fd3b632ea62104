"""The running stack as the acceptance tests see it: its state, its service settings, and workers to start and kill."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local.processes import Service, is_alive, stop
from local.services import Launcher


@dataclass
class Stack:
    root: Path
    state: dict[str, Any]
    launcher: Launcher
    workers: list[Service] = field(default_factory=list)
    _started: int = 0

    @property
    def api_url(self) -> str:
        return str(self.state["api_url"])

    @property
    def database_url(self) -> str:
        return str(self.state["database_url"])

    @property
    def service_env(self) -> dict[str, str]:
        return {**os.environ, **self.state["env"]}

    def start_worker(self) -> Service:
        service = self.launcher.worker(self._started, self.service_env)
        self._started += 1
        self.workers.append(service)
        return service

    def live_workers(self) -> list[Service]:
        self.workers = [w for w in self.workers if is_alive(w.pid)]
        return self.workers

    def ensure_worker(self) -> Service:
        live = self.live_workers()
        return live[0] if live else self.start_worker()

    def stop_workers(self) -> None:
        for worker in self.live_workers():
            stop(worker)
        self.workers.clear()

    def kill(self, worker: Service) -> None:
        os.kill(worker.pid, signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")
