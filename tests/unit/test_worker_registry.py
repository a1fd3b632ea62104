"""This worker's row in ``workers``: beats on a timer and at once when the job in hand changes; errors never stop the
worker; a clean exit deletes the row. (On PostgreSQL: tests/integration/test_worker_api.py.)"""

from __future__ import annotations

from uuid import uuid4

import pytest

from gpu_worker.registry import Presence
from shared.errors import DatabaseUnavailable
from tests.fakes import InMemoryWorkerRegistry

pytestmark = pytest.mark.timeout(10)


def test_the_row_appears_at_start_names_the_job_in_hand_at_once_and_goes_on_close() -> None:
    registry = InMemoryWorkerRegistry()
    presence = Presence(registry, "host-1:42", "host-1", "cuda:0 (NVIDIA H100)", interval=60).start()
    registry.wait_for(1)
    assert registry.rows == {"host-1:42": ("host-1", "cuda:0 (NVIDIA H100)", None)}
    job = uuid4()
    presence.holding(job)
    registry.wait_for(2)  # not after the 60 s interval: at once
    assert registry.rows["host-1:42"][2] == job
    presence.released(job)
    registry.wait_for(3)
    presence.close()
    assert registry.rows == {}
    assert registry.beats == [None, job, None]


def test_with_several_jobs_in_hand_the_row_names_the_first_analysed_else_the_latest_claimed() -> None:
    registry = InMemoryWorkerRegistry()
    presence = Presence(registry, "w", "h", "cpu", interval=60).start()
    registry.wait_for(1)
    first, second, third = uuid4(), uuid4(), uuid4()
    steps = [
        (presence.holding, first, first),
        (presence.computing, first, first),  # no change: no write
        (presence.holding, second, first),  # prepared ahead while the first is analysed
        (presence.computed, first, second),  # the first is being finished: the latest in hand is named
        (presence.holding, third, third),
        (presence.released, first, third),
        (presence.computing, second, second),
        (presence.computing, third, second),  # two analysed at once (WORKER_ANALYSES 2): the first one started
        (presence.computed, second, third),
        (presence.released, second, third),
        (presence.computed, third, third),
        (presence.released, third, None),
    ]
    for call, argument, named in steps:
        call(argument)
        assert presence._job == named
    registry.wait_for(2)
    presence.close()
    assert set(registry.beats) <= {None, first, second, third}


def test_it_beats_every_interval() -> None:
    """Beats repeat on their own, with nothing changed in between (that none comes sooner than the interval: the
    first test's 60 s interval gives exactly one beat per change)."""
    registry = InMemoryWorkerRegistry()
    presence = Presence(registry, "w", "h", "cpu", interval=0.05).start()
    registry.wait_for(4)
    presence.close()
    assert registry.beats[:4] == [None] * 4


def test_database_errors_are_logged_once_and_never_stop_the_beats(caplog: pytest.LogCaptureFixture) -> None:
    registry = InMemoryWorkerRegistry()
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
