"""The worker's circuit breaker: what opens it, how it probes, what ends the wait."""

from __future__ import annotations

import logging
import threading

import pytest
from azure.servicebus.exceptions import ServiceBusServerBusyError

from gpu_worker.breaker import Breaker
from gpu_worker.settlement import AttemptLost, Interrupted
from shared.errors import (
    BusUnavailable,
    CropAIError,
    DatabaseUnavailable,
    InputMissing,
    InvalidImage,
    InvalidMessage,
    StorageUnavailable,
)

pytestmark = pytest.mark.timeout(10)


class Stop(threading.Event):
    """A stop event whose waits return at once and are recorded (the backoff, without sleeping); set after
    ``set_after`` waits."""

    def __init__(self, set_after: int | None = None) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self._set_after = set_after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self._set_after is not None and len(self.waits) >= self._set_after:
            self.set()
        return self.is_set()


class Probe:
    """Fails with ``error`` for its first ``failures`` calls, then answers."""

    def __init__(self, failures: int = 0, error: CropAIError | None = None) -> None:
        self.calls = 0
        self._failures = failures
        self._error = error or DatabaseUnavailable("connection refused")

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self._failures:
            raise self._error


class Ticks:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def state(breaker: Breaker) -> str | None:
    return breaker.open_because


def test_open_at_start_it_probes_before_the_first_receive() -> None:
    """A worker started during an outage must not take a job it cannot run."""
    database, ticks, stop = Probe(failures=2), Ticks(), Stop()
    breaker = Breaker({"database": database}, max_interval=30)
    assert state(breaker) == "startup"
    assert breaker.wait_until_closed(stop, tick=ticks)
    assert (database.calls, state(breaker)) == (3, None)


def test_closed_it_returns_at_once_without_probing() -> None:
    database, ticks, stop = Probe(), Ticks(), Stop()
    breaker = Breaker({"database": database}, max_interval=30, open_because=None)
    assert breaker.wait_until_closed(stop, tick=ticks)
    assert (database.calls, ticks.count, stop.waits) == (0, 0, [])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DatabaseUnavailable("db down"), "database_unavailable"),
        (StorageUnavailable("throttled"), "storage_unavailable"),
    ],
)
def test_a_database_or_storage_outage_opens_it(error: CropAIError, code: str) -> None:
    breaker = Breaker({}, max_interval=30, open_because=None)
    breaker.record(error)
    assert breaker.open_because == code


@pytest.mark.parametrize(
    "error",
    [None, BusUnavailable("bus down"), ServiceBusServerBusyError(message="busy"), InvalidImage("x"),
     InvalidMessage("x"), InputMissing("x"), AttemptLost("x"), Interrupted("x"), ValueError("a bug")],
    ids=lambda e: type(e).__name__,
)  # fmt: skip
def test_other_outcomes_leave_it_closed(error: BaseException | None) -> None:
    breaker = Breaker({}, max_interval=30, open_because=None)
    breaker.record(error)
    assert breaker.open_because is None


def test_the_first_outage_is_the_reason_given(caplog: pytest.LogCaptureFixture) -> None:
    breaker = Breaker({}, max_interval=30, open_because=None)
    breaker.record(StorageUnavailable("x"))
    breaker.record(DatabaseUnavailable("y"))
    assert breaker.open_because == "storage_unavailable"
    assert [getattr(r, "action", None) for r in caplog.records] == ["breaker_open"]


def test_it_probes_with_backoff_until_every_backend_answers(caplog: pytest.LogCaptureFixture) -> None:
    database = Probe(failures=5)
    storage = Probe()
    ticks, stop = Ticks(), Stop()
    breaker = Breaker({"database": database, "storage": storage}, max_interval=8, first_interval=1)
    breaker.record(DatabaseUnavailable("db down"))
    with caplog.at_level(logging.INFO, logger="gpu_worker.breaker"):
        assert breaker.wait_until_closed(stop, tick=ticks)
    assert breaker.open_because is None
    assert stop.waits == [1, 2, 4, 8, 8]  # doubling from first_interval, capped at max_interval
    assert (database.calls, ticks.count) == (6, 6)  # a tick with each probe: waiting is not a hung worker
    assert storage.calls == 1  # probed once the database answered
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert actions.count("breaker_probe") == 5
    assert actions[-1] == "breaker_closed"


def test_every_probe_must_pass() -> None:
    database, storage = Probe(), Probe(failures=2, error=StorageUnavailable("throttled"))
    stop = Stop()
    breaker = Breaker({"database": database, "storage": storage}, max_interval=30, first_interval=0.5)
    breaker.record(StorageUnavailable("throttled"))
    assert breaker.wait_until_closed(stop)
    assert stop.waits == [0.5, 1.0]
    assert (database.calls, storage.calls) == (3, 3)


def test_a_stop_ends_the_wait_and_the_breaker_stays_open() -> None:
    database, stop = Probe(failures=1000), Stop(set_after=3)
    breaker = Breaker({"database": database}, max_interval=30, open_because=None)
    breaker.record(DatabaseUnavailable("db down"))
    assert not breaker.wait_until_closed(stop)
    assert (database.calls, len(stop.waits)) == (3, 3)
    assert breaker.open_because == "database_unavailable"


def test_a_stop_already_set_returns_false_even_when_closed() -> None:
    stop = Stop()
    stop.set()
    assert not Breaker({}, max_interval=30, open_because=None).wait_until_closed(stop)


def test_a_real_stop_event_wakes_the_wait() -> None:
    stop = threading.Event()
    breaker = Breaker({"database": Probe(failures=1000)}, max_interval=60, first_interval=60)
    breaker.record(DatabaseUnavailable("db down"))
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    try:
        assert not breaker.wait_until_closed(stop)
    finally:
        timer.cancel()


def test_an_outage_recorded_while_the_probes_run_is_probed_again_not_forgotten() -> None:
    """Another thread (the finishing one, at a settlement) records an outage while this one's probes run: the round
    that answered does not close the breaker over it; the next round decides."""
    calls: list[int] = []
    breaker = Breaker({"postgres": lambda: calls.append(len(calls))}, max_interval=1)

    def first_probe_sees_another_thread_trip() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            breaker.record(DatabaseUnavailable("connection reset"))

    breaker._probes = {"postgres": first_probe_sees_another_thread_trip}
    assert breaker.wait_until_closed(Stop())
    assert (len(calls), breaker.open_because) == (2, None)
