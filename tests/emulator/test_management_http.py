"""The management (ATOM) API with the real ``ServiceBusAdministrationClient``, on the emulator's AMQP port.

One emulator serves the module; each test has its own queue, so the tests stay independent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.management import QueueRuntimeProperties, ServiceBusAdministrationClient

from local.servicebus_emulator import EmulatorStartError, start_emulator
from local.servicebus_emulator.atom import duration
from local.servicebus_emulator.process import connection_string
from shared.queue_stats import PlainHttpTransport
from tests.fixtures.backends import unavailable

ROOT = Path(__file__).resolve().parents[2]
QUEUES = ["sent", "scheduled", "dead", "settled", "props", "zeta"]
LOCK = "PT30S"


@dataclass(frozen=True)
class Emulator:
    connection_string: str
    port: int


def _config(path: Path) -> Path:
    queues: list[dict[str, Any]] = [
        {"Name": name, "Properties": {"LockDuration": LOCK, "MaxDeliveryCount": 4}} for name in QUEUES
    ]
    queues[QUEUES.index("props")]["Properties"].update(
        DefaultMessageTimeToLive="P2DT3H",
        RequiresDuplicateDetection=True,
        DeadLetteringOnMessageExpiration=True,
        MaxMessageSizeInKilobytes=2048,
    )
    document = {"UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": queues, "Topics": []}]}}
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    root = tmp_path_factory.mktemp("management")
    try:
        process, port = start_emulator(_config(root / "config.json"), root / "data")
    except (EmulatorStartError, OSError) as exc:
        unavailable(f"Service Bus emulator: {exc}")
        raise  # unreachable: unavailable() skips or fails
    try:
        yield Emulator(connection_string("127.0.0.1", port), port)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def bus(emulator: Emulator) -> Iterator[ServiceBusClient]:
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        yield client


@pytest.fixture
def admin(emulator: Emulator) -> Iterator[ServiceBusAdministrationClient]:
    client = ServiceBusAdministrationClient.from_connection_string(
        emulator.connection_string, transport=PlainHttpTransport(), retry_total=0
    )
    with client:
        yield client


def _send(bus: ServiceBusClient, queue: str, *messages: ServiceBusMessage) -> None:
    with bus.get_queue_sender(queue) as sender:
        sender.send_messages(list(messages))


def _counts(props: QueueRuntimeProperties) -> tuple[int | None, ...]:
    return (
        props.active_message_count,
        props.scheduled_message_count,
        props.dead_letter_message_count,
        props.total_message_count,
    )


def test_counts_after_sends(bus: ServiceBusClient, admin: ServiceBusAdministrationClient) -> None:
    before = admin.get_queue_runtime_properties("sent")
    assert _counts(before) == (0, 0, 0, 0)
    assert before.size_in_bytes == 0
    _send(bus, "sent", *(ServiceBusMessage(f"body-{i}") for i in range(3)))

    props = admin.get_queue_runtime_properties("SENT")  # entity names are case-insensitive

    assert props.name == "SENT"
    assert _counts(props) == (3, 0, 0, 3)
    assert props.transfer_message_count == 0
    assert props.transfer_dead_letter_message_count == 0
    assert (props.size_in_bytes or 0) > 3 * len("body-0")
    now = datetime.now(UTC)
    assert props.created_at_utc is not None
    assert props.created_at_utc <= now
    assert props.updated_at_utc == props.created_at_utc
    assert props.accessed_at_utc is not None
    assert now - timedelta(seconds=30) < props.accessed_at_utc <= now


def test_scheduled_messages(bus: ServiceBusClient, admin: ServiceBusAdministrationClient) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    with bus.get_queue_sender("scheduled") as sender:
        sequence_numbers = sender.schedule_messages([ServiceBusMessage("a"), ServiceBusMessage("b")], later)
        sender.send_messages(ServiceBusMessage("now"))
        assert _counts(admin.get_queue_runtime_properties("scheduled")) == (1, 2, 0, 3)
        sender.cancel_scheduled_messages(sequence_numbers[0])

    assert _counts(admin.get_queue_runtime_properties("scheduled")) == (1, 1, 0, 2)


def test_dead_lettered_messages(bus: ServiceBusClient, admin: ServiceBusAdministrationClient) -> None:
    _send(bus, "dead", ServiceBusMessage("poison"), ServiceBusMessage("fine"))
    with bus.get_queue_receiver("dead") as receiver:
        (poison,) = receiver.receive_messages(max_message_count=1, max_wait_time=5)
        receiver.dead_letter_message(poison, reason="bad", error_description="unreadable")

    assert _counts(admin.get_queue_runtime_properties("dead")) == (1, 0, 1, 2)


def test_receive_lock_defer_and_complete(bus: ServiceBusClient, admin: ServiceBusAdministrationClient) -> None:
    """A locked or deferred message is still active, as in the service; completing removes it."""
    _send(bus, "settled", *(ServiceBusMessage(str(i)) for i in range(3)))
    with bus.get_queue_receiver("settled") as receiver:
        received = receiver.receive_messages(max_message_count=3, max_wait_time=5)
        while len(received) < 3:
            received += receiver.receive_messages(max_message_count=3 - len(received), max_wait_time=5)
        assert _counts(admin.get_queue_runtime_properties("settled")) == (3, 0, 0, 3)
        receiver.complete_message(received[0])
        receiver.defer_message(received[1])
        receiver.complete_message(received[2])

    assert _counts(admin.get_queue_runtime_properties("settled")) == (1, 0, 0, 1)


def test_unknown_queue_is_resource_not_found(admin: ServiceBusAdministrationClient) -> None:
    with pytest.raises(ResourceNotFoundError):
        admin.get_queue_runtime_properties("no-such-queue")
    with pytest.raises(ResourceNotFoundError):
        admin.get_queue("no-such-queue")


def test_get_queue_properties_are_the_configuration(admin: ServiceBusAdministrationClient) -> None:
    props = admin.get_queue("props")

    assert props.name == "props"
    assert props.lock_duration == timedelta(seconds=30)
    assert props.max_delivery_count == 4
    assert props.default_message_time_to_live == timedelta(days=2, hours=3)
    assert props.requires_duplicate_detection is True
    assert props.duplicate_detection_history_time_window == timedelta(minutes=10)
    assert props.dead_lettering_on_message_expiration is True
    assert props.requires_session is False
    assert props.status == "Active"
    assert props.max_message_size_in_kilobytes == 2048
    assert admin.get_queue("zeta").max_message_size_in_kilobytes == 256  # the Standard tier's default
    assert props.forward_to is None


def test_list_queues_pages_through_every_queue(admin: ServiceBusAdministrationClient) -> None:
    names = [queue.name for queue in admin.list_queues(max_page_size=4)]
    runtime = {queue.name: queue.total_message_count for queue in admin.list_queues_runtime_properties()}

    assert names == sorted(QUEUES)
    assert set(runtime) == set(QUEUES)
    assert runtime["zeta"] == 0
    with pytest.raises(HttpResponseError) as refused:  # queues come from the configuration file
        admin.create_queue("new-queue")
    assert refused.value.status_code == 405


def _get(emulator: Emulator, path: str, **headers: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{emulator.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize(
    ("path", "auth", "status", "body"),
    [
        ("/$Resources/subscriptions", "SharedAccessSignature sr=x", 404, "<Error><Code>404</Code><Detail>"),
        ("/sent/messages/head", "Bearer token", 404, "<Error><Code>404</Code>"),
        ("/$Resources/queues?$top=0", "Bearer token", 400, "<Error><Code>400</Code>"),
        ("/sent?api-version=2021-05", None, 401, "<Error><Code>401</Code><Detail>MissingToken"),
        ("/nothing?api-version=2021-05", "Bearer token", 200, "Publicly Listed Services"),
    ],
    ids=["unknown-resource", "unknown-path", "bad-page", "no-token", "unknown-entity"],
)
def test_raw_responses(emulator: Emulator, path: str, auth: str | None, status: int, body: str) -> None:
    code, text = _get(emulator, path, **({"Authorization": auth} if auth else {}))
    assert code == status
    assert body in text


def test_plain_sdk_client_is_refused(emulator: Emulator) -> None:
    """Without PlainHttpTransport the SDK speaks TLS to the port: the emulator closes the connection at once, rather
    than leave the handshake waiting for the client's timeout."""
    client = ServiceBusAdministrationClient.from_connection_string(
        emulator.connection_string, retry_total=0, connection_timeout=60, read_timeout=60
    )
    with client, pytest.raises(ServiceRequestError) as raised:
        client.get_queue_runtime_properties("sent")
    text = str(raised.value)
    assert "EOF" in text or "reset" in text.lower(), text  # the peer ended the handshake, no timeout of ours


def test_extra_http_port_is_announced_served_and_stopped(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "local.servicebus_emulator", "--config", str(_config(tmp_path / "c.json"))]
    command += ["--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"ready: amqp://127\.0\.0\.1:(\d+) management: http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        amqp_port, http_port = int(match.group(1)), int(match.group(2))
        assert http_port != amqp_port
        admin = ServiceBusAdministrationClient.from_connection_string(
            connection_string("127.0.0.1", http_port), transport=PlainHttpTransport(), retry_total=0
        )
        with admin:
            assert _counts(admin.get_queue_runtime_properties("zeta")) == (0, 0, 0, 0)
            process.terminate()  # with the client's connection still open: the emulator closes it and exits
            assert process.wait(timeout=10) == 0
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(minutes=1), "PT1M"),
        (timedelta(days=1), "P1D"),
        (timedelta(seconds=0.5), "PT0.5S"),
        (timedelta(days=2, hours=3, seconds=4), "P2DT3H4S"),
        (timedelta(0), "PT0S"),
    ],
)
def test_durations_are_written_as_the_service_writes_them(value: timedelta, text: str) -> None:
    assert duration(value) == text
