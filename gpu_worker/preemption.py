"""Spot evictions and scale-in notices from Azure Scheduled Events trigger the worker's graceful drain.

Azure announces a Spot eviction (``Preempt``, at least 30 s ahead) and, when the scale set's terminate notification
is on, a scale-in deletion (``Terminate``) through the Instance Metadata Service. The watcher polls
``SCHEDULED_EVENTS_URL`` from a daemon thread; when such an event names this VM it calls ``on_notice`` (the same
drain trigger SIGTERM pulls) once, then, if it was given ``drained``, waits for the drain to finish and acknowledges
the event (``StartRequests``) so that Azure goes ahead without waiting out the notice. Without ``drained`` Azure
proceeds at the event's ``NotBefore`` time.

Off by default: the worker starts it only when its settings enable it (it is meaningless outside an Azure VM)::

    watcher = PreemptionWatcher(drain_requested.set, drained=drain_finished.wait)
    watcher.start(stop)

IMDS is link-local and must never go through a proxy; the client here ignores proxy environment variables.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SCHEDULED_EVENTS_URL = "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"
INSTANCE_NAME_URL = "http://169.254.169.254/metadata/instance/compute/name?api-version=2021-02-01&format=text"
DRAIN_EVENT_TYPES = frozenset({"Preempt", "Terminate"})
_PENDING = frozenset({"Scheduled", "Started"})


class ScheduledEventsUnavailable(Exception):
    """The metadata endpoint could not be reached or answered something unreadable."""


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    event_type: str
    status: str
    resources: tuple[str, ...]
    not_before: str

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ScheduledEvent:
        return cls(
            event_id=str(raw["EventId"]),
            event_type=str(raw["EventType"]),
            status=str(raw.get("EventStatus", "Scheduled")),
            resources=tuple(str(r) for r in raw.get("Resources", ())),
            not_before=str(raw.get("NotBefore", "")),
        )


def drain_events(document: Mapping[str, Any], vm_name: str) -> list[ScheduledEvent]:
    """The pending ``Preempt``/``Terminate`` events of a Scheduled Events document that name ``vm_name``."""
    try:
        events = [ScheduledEvent.from_json(raw) for raw in document.get("Events", ())]
    except (KeyError, TypeError, AttributeError) as e:
        raise ScheduledEventsUnavailable(f"unreadable scheduled events document: {e!r}") from e
    return [e for e in events if e.event_type in DRAIN_EVENT_TYPES and e.status in _PENDING and vm_name in e.resources]


class ScheduledEventsClient:
    """GET the events, POST acknowledgements; stdlib HTTP with ``Metadata: true`` and no proxy."""

    def __init__(self, url: str = SCHEDULED_EVENTS_URL, *, timeout: float = 5.0) -> None:
        self.url = url
        self._timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, url: str, body: bytes | None = None) -> bytes:
        headers = {"Metadata": "true"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return bytes(response.read())
        except (urllib.error.URLError, OSError) as e:  # HTTPError and timeouts are both subclasses
            raise ScheduledEventsUnavailable(f"{url}: {e}") from e

    def fetch(self) -> dict[str, Any]:
        try:
            document = json.loads(self._request(self.url))
        except ValueError as e:
            raise ScheduledEventsUnavailable(f"{self.url}: not JSON: {e}") from e
        if not isinstance(document, dict):
            raise ScheduledEventsUnavailable(f"{self.url}: not a JSON object")
        return document

    def acknowledge(self, event_ids: Iterable[str]) -> None:
        body = {"StartRequests": [{"EventId": event_id} for event_id in event_ids]}
        self._request(self.url, json.dumps(body).encode())

    def text(self, url: str) -> str:
        return self._request(url).decode().strip()


class PreemptionWatcher:
    """Polls Scheduled Events; on a drain event for this VM calls ``on_notice`` once and acknowledges when drained."""

    def __init__(
        self,
        on_notice: Callable[[], object],
        *,
        drained: Callable[[float], bool] | None = None,
        url: str = SCHEDULED_EVENTS_URL,
        instance_name_url: str = INSTANCE_NAME_URL,
        vm_name: str | None = None,
        poll_interval: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        self._on_notice = on_notice
        self._drained = drained
        self._client = ScheduledEventsClient(url, timeout=timeout)
        self._instance_name_url = instance_name_url
        self._vm_name = vm_name
        self._poll_interval = poll_interval
        self._seen: set[str] = set()
        self.noticed = threading.Event()

    def poll_once(self) -> list[ScheduledEvent]:
        """One poll: the new drain events for this VM (``on_notice`` is called on the first ever)."""
        if self._vm_name is None:
            self._vm_name = self._client.text(self._instance_name_url)
        new = [e for e in drain_events(self._client.fetch(), self._vm_name) if e.event_id not in self._seen]
        for event in new:
            self._seen.add(event.event_id)
            logger.warning(
                "scheduled event %s for %s not before %s: draining",
                event.event_type,
                self._vm_name,
                event.not_before,
                extra={"action": "drain_notice", "event_id": event.event_id, "event_type": event.event_type},
            )
        if new and not self.noticed.is_set():
            self.noticed.set()
            self._on_notice()
        return new

    def run(self, stop: threading.Event) -> None:
        """Poll until a drain notice (then acknowledge it once drained) or until ``stop`` is set."""
        failures = 0
        while not stop.is_set():
            try:
                events = self.poll_once()
            except ScheduledEventsUnavailable as e:
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("scheduled events unavailable: %s", e, extra={"action": "poll_failed", "failures": failures})
                stop.wait(min(self._poll_interval * 2**failures, 30.0))
                continue
            failures = 0
            if events:
                self._acknowledge_when_drained(events, stop)
                return
            stop.wait(self._poll_interval)

    def _acknowledge_when_drained(self, events: list[ScheduledEvent], stop: threading.Event) -> None:
        if self._drained is None:
            return
        while not self._drained(0.5):
            if stop.is_set():
                return
        event_ids = [e.event_id for e in events]
        try:
            self._client.acknowledge(event_ids)
        except ScheduledEventsUnavailable as e:
            logger.warning("could not acknowledge %s: %s", event_ids, e, extra={"action": "ack_failed"})
            return
        logger.info("acknowledged %s", event_ids, extra={"action": "drain_acknowledged"})

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread; set ``stop`` to end it."""
        thread = threading.Thread(target=self.run, args=(stop,), name="preemption-watcher", daemon=True)
        thread.start()
        return thread
