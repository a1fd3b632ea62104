"""This worker's row in ``workers``: beats on a timer and at once when the job in hand changes; errors never stop the
worker; a clean exit deletes the row. (On PostgreSQL: tests/integration/test_worker_api.py.)"""

from __future__ import annotations

import threading
import time
from uuid import UUID, uuid4

import pytest

from gpu_worker.registry import Presence
from shared.errors import DatabaseUnavailable

pytestmark = pytest.mark.timeout(10)
WAIT = 2.0  # a bound on a hang, never a speed claim


class Registry:
    """The workers table in memory: worker id -> (host, device, current job), plus every beat."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str, UUID | None]] = {}
        self.beats: list[UUID | None] = []
        self.failure: Exception | None = None
        self.beaten = threading.Condition()

    def beat(self, worker_id: str, host: str, device: str, current_job: UUID | None) -> None:
        with self.beaten:
            self.beats.append(current_job)
            self.beaten.notify_all()
        if self.failure is not None:
            raise self.failure
        self.rows[worker_id] = (host, device, current_job)

    def gone(self, worker_id: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.rows.pop(worker_id, None)

    def wait_for(self, count: int) -> None:
        with self.beaten:
            assert self.beaten.wait_for(lambda: len(self.beats) >= count, WAIT)


def test_the_row_appears_at_start_names_the_job_in_hand_at_once_and_goes_on_close() -> None:
    registry = Registry()
    presence = Presence(registry, "host-1:42", "host-1", "cuda:0 (NVIDIA H100)", interval=60).start()
    registry.wait_for(1)
    assert registry.rows == {"host-1:42": ("host-1", "cuda:0 (NVIDIA H100)", None)}
    job = uuid4()
    presence.working_on(job)
    registry.wait_for(2)  # not after the 60 s interval: at once
    assert registry.rows["host-1:42"][2] == job
    presence.working_on(None)
    registry.wait_for(3)
    presence.close()
    assert registry.rows == {}
    assert registry.beats == [None, job, None]


def test_it_beats_every_interval() -> None:
    registry = Registry()
    presence = Presence(registry, "w", "h", "cpu", interval=0.05).start()
    started = time.monotonic()
    registry.wait_for(4)
    presence.close()
    assert time.monotonic() - started >= 0.15


def test_database_errors_are_logged_once_and_never_stop_the_beats(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    registry.failure = DatabaseUnavailable("connection refused")
    presence = Presence(registry, "w", "h", "cpu", interval=0.02).start()
    registry.wait_for(5)
    registry.failure = None
    count = len(registry.beats)
    registry.wait_for(count + 2)
    assert registry.rows["w"] == ("h", "cpu", None)
    registry.failure = DatabaseUnavailable("gone again")
    presence.close()  # the delete fails too: logged, not raised
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert actions.count("registry_failed") == 2  # the outage once, the failed delete once
