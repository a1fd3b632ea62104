"""The Scheduled Events watcher against a real HTTP server on 127.0.0.1 serving canned IMDS documents."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from gpu_worker.preemption import (
    DRAIN_EVENT_TYPES,
    PreemptionWatcher,
    ScheduledEventsUnavailable,
    drain_events,
)
from tests.http_server import LoopbackServer

VM = "vmss-cropai_3"
WAIT = 10.0  # a deadlock guard, never a speed assertion


def event(
    event_type: str = "Preempt", *, vm: str = VM, event_id: str = "E1", status: str = "Scheduled"
) -> dict[str, Any]:
    return {
        "EventId": event_id,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": [vm],
        "EventStatus": status,
        "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT",
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }


class IMDS:
    """What the fake metadata service answers, and what it was asked."""

    def __init__(self) -> None:
        self.responses: list[tuple[int, bytes]] = []  # served in order for GET scheduledevents; the last repeats
        self.acks: list[dict[str, Any]] = []
        self.headers: list[str | None] = []
        self.acked = threading.Event()

    def serve(self, *documents: dict[str, Any] | bytes | int) -> None:
        self.responses = [
            (d, b"") if isinstance(d, int) else (200, d if isinstance(d, bytes) else json.dumps(d).encode())
            for d in documents
        ]

    def next_response(self) -> tuple[int, bytes]:
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]


@pytest.fixture
def imds() -> Iterator[tuple[IMDS, str]]:
    state = IMDS()
    state.serve({"DocumentIncarnation": 1, "Events": []})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            state.headers.append(self.headers.get("Metadata"))
            if self.path.startswith("/metadata/instance/compute/name"):
                self._answer(200, VM.encode())
            else:
                self._answer(*state.next_response())

        def do_POST(self) -> None:
            state.headers.append(self.headers.get("Metadata"))
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.acks.append(json.loads(body))
            self._answer(200, b"")
            state.acked.set()

    server = LoopbackServer(Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state, base
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def watcher(base: str, on_notice: Any, **kwargs: Any) -> PreemptionWatcher:
    return PreemptionWatcher(
        on_notice,
        url=f"{base}/metadata/scheduledevents?api-version=2020-07-01",
        instance_name_url=f"{base}/metadata/instance/compute/name?api-version=2021-02-01&format=text",
        poll_interval=0.01,
        timeout=2.0,
        **kwargs,
    )


@pytest.mark.parametrize("event_type", sorted(DRAIN_EVENT_TYPES))
def test_drain_event_triggers_drain_then_acknowledges_once_drained(imds: tuple[IMDS, str], event_type: str) -> None:
    state, base = imds
    state.serve({"DocumentIncarnation": 1, "Events": []}, {"DocumentIncarnation": 2, "Events": [event(event_type)]})
    drain_requested, drain_finished, stop = threading.Event(), threading.Event(), threading.Event()

    thread = watcher(base, drain_requested.set, drained=drain_finished.wait).start(stop)
    assert drain_requested.wait(WAIT)
    assert state.acks == []  # not before the drain has finished
    drain_finished.set()
    assert state.acked.wait(WAIT)
    thread.join(WAIT)

    assert not thread.is_alive()
    assert state.acks == [{"StartRequests": [{"EventId": "E1"}]}]
    assert set(state.headers) == {"true"}  # every request carried Metadata: true


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([], id="no-events"),
        pytest.param([event(vm="vmss-cropai_7")], id="another-vm"),
        pytest.param([event("Reboot"), event("Redeploy"), event("Freeze")], id="not-a-drain-type"),
        pytest.param([event(status="Completed")], id="not-pending"),
    ],
)
def test_events_that_are_not_ours_do_nothing(imds: tuple[IMDS, str], events: list[dict[str, Any]]) -> None:
    state, base = imds
    state.serve({"DocumentIncarnation": 3, "Events": events})
    calls: list[None] = []
    w = watcher(base, lambda: calls.append(None))
    assert w.poll_once() == []
    assert calls == []
    assert not w.noticed.is_set()
    assert state.acks == []


def test_started_event_still_triggers(imds: tuple[IMDS, str]) -> None:
    state, base = imds
    state.serve({"Events": [event(status="Started")]})
    calls: list[None] = []
    assert [e.event_id for e in watcher(base, lambda: calls.append(None)).poll_once()] == ["E1"]
    assert calls == [None]


def test_notice_fires_once_for_repeated_and_further_events(imds: tuple[IMDS, str]) -> None:
    state, base = imds
    state.serve(
        {"Events": [event()]},
        {"Events": [event()]},
        {"Events": [event(), event("Terminate", event_id="E2")]},
    )
    calls: list[None] = []
    w = watcher(base, lambda: calls.append(None), vm_name=VM)
    assert [e.event_id for e in w.poll_once()] == ["E1"]
    assert w.poll_once() == []
    assert [e.event_id for e in w.poll_once()] == ["E2"]
    assert calls == [None]


def test_without_drained_callback_nothing_is_acknowledged(imds: tuple[IMDS, str]) -> None:
    state, base = imds
    state.serve({"Events": [event()]})
    drain_requested, stop = threading.Event(), threading.Event()
    thread = watcher(base, drain_requested.set).start(stop)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert drain_requested.is_set()
    assert state.acks == []


@pytest.mark.parametrize(
    "failure",
    [pytest.param(500, id="http-500"), pytest.param(b"<html>", id="not-json"), pytest.param(b"[]", id="not-object")],
)
def test_endpoint_failures_raise_unavailable_and_the_loop_survives(
    imds: tuple[IMDS, str], failure: int | bytes
) -> None:
    state, base = imds
    state.serve(failure, failure, {"Events": [event()]})
    w = watcher(base, lambda: None)
    with pytest.raises(ScheduledEventsUnavailable):
        w.poll_once()

    drain_requested, stop = threading.Event(), threading.Event()
    thread = watcher(base, drain_requested.set).start(stop)
    assert drain_requested.wait(WAIT)
    thread.join(WAIT)
    assert not thread.is_alive()


def test_unreachable_endpoint_is_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    w = PreemptionWatcher(lambda: None, url=f"http://127.0.0.1:{port}/x", vm_name=VM, timeout=2.0)
    with pytest.raises(ScheduledEventsUnavailable):
        w.poll_once()


def test_stop_ends_the_thread_without_a_notice(imds: tuple[IMDS, str]) -> None:
    _, base = imds
    calls: list[None] = []
    stop = threading.Event()
    thread = watcher(base, lambda: calls.append(None)).start(stop)
    assert thread.daemon
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert calls == []


def test_stop_while_waiting_for_the_drain_skips_the_acknowledgement(imds: tuple[IMDS, str]) -> None:
    state, base = imds
    state.serve({"Events": [event()]})
    drain_requested, never_drained, stop = threading.Event(), threading.Event(), threading.Event()
    thread = watcher(base, drain_requested.set, drained=never_drained.wait).start(stop)
    assert drain_requested.wait(WAIT)
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert state.acks == []


@pytest.mark.parametrize(
    "document",
    [{"Events": [{"EventType": "Preempt"}]}, {"Events": [None]}, {"Events": "nope"}],
    ids=["no-event-id", "null-event", "events-not-a-list"],
)
def test_malformed_documents_are_unavailable(document: dict[str, Any]) -> None:
    with pytest.raises(ScheduledEventsUnavailable):
        drain_events(document, VM)
