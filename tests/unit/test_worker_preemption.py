"""The worker's wiring of the Scheduled Events watcher: a Spot ``Preempt`` notice drains like SIGTERM."""

from __future__ import annotations

import threading

from gpu_worker.app import start_preemption_watch
from gpu_worker.shutdown import Shutdown
from tests.unit.test_preemption import IMDS, WAIT, event
from tests.unit.test_preemption import imds as imds


def test_a_preemption_notice_drains_the_worker_and_is_acknowledged_once_drained(imds: tuple[IMDS, str]) -> None:
    state, base = imds
    state.serve({"DocumentIncarnation": 1, "Events": []}, {"DocumentIncarnation": 2, "Events": [event("Preempt")]})
    shutdown, stop = Shutdown(grace=300), threading.Event()
    thread = start_preemption_watch(
        shutdown,
        stop,
        url=f"{base}/metadata/scheduledevents?api-version=2020-07-01",
        instance_name_url=f"{base}/metadata/instance/compute/name?api-version=2021-02-01&format=text",
        poll_interval=0.01,
    )
    try:
        assert shutdown.requested.wait(WAIT)
        assert not shutdown.forced.is_set()
        assert state.acks == []  # Azure waits while the worker drains
        shutdown.finished()
        assert state.acked.wait(WAIT)
        assert state.acks == [{"StartRequests": [{"EventId": "E1"}]}]
    finally:
        stop.set()
        thread.join(WAIT)
