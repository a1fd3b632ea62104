"""QueueStats against our Service Bus emulator, through the real ServiceBusAdministrationClient."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError, ServiceResponseError
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from local.servicebus_emulator.process import connection_string
from shared.errors import BusUnavailable
from shared.queue_stats import QueueCounts, QueueStats
from shared.settings import Settings
from tests.fixtures.servicebus import EmulatorHandle
from tests.silent_server import SilentServer

pytestmark = pytest.mark.integration

QUEUES: dict[str, dict[str, Any]] = {"stats-a": {}, "stats-b": {}}


@pytest.fixture
def emulator(servicebus_emulator_factory: Callable[..., EmulatorHandle]) -> EmulatorHandle:
    return servicebus_emulator_factory(QUEUES)


def test_counts_in_the_order_asked(emulator: EmulatorHandle) -> None:
    with ServiceBusClient.from_connection_string(emulator.connection_string) as client:
        with client.get_queue_sender("stats-a") as sender:
            sender.send_messages([ServiceBusMessage("1"), ServiceBusMessage("2"), ServiceBusMessage("poison")])
            sender.schedule_messages(ServiceBusMessage("later"), datetime.now(UTC) + timedelta(hours=1))
        with client.get_queue_receiver("stats-a") as receiver:
            (first,) = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            receiver.dead_letter_message(first, reason="test")

    with QueueStats.from_connection_string(emulator.connection_string) as stats:
        counts = stats.counts(["stats-b", "stats-a"])

    assert counts == [
        QueueCounts(name="stats-b", active=0, scheduled=0, dead_letter=0, total=0),
        QueueCounts(name="stats-a", active=2, scheduled=1, dead_letter=1, total=4),
    ]


def test_from_settings_reads_the_configured_namespace(emulator: EmulatorHandle) -> None:
    settings = Settings.from_env(
        {"ServiceBusConnection": emulator.connection_string, "AzureWebJobsStorage": "x", "DATABASE_URL": "x"}
    )
    with QueueStats.from_settings(settings) as stats:
        assert [c.name for c in stats.counts(["stats-a"])] == ["stats-a"]


def test_unknown_queue_is_bus_unavailable(emulator: EmulatorHandle) -> None:
    with (
        QueueStats.from_connection_string(emulator.connection_string) as stats,
        pytest.raises(BusUnavailable, match="no-such-queue") as raised,
    ):
        stats.counts(["stats-a", "no-such-queue"])
    assert isinstance(raised.value.__cause__, ResourceNotFoundError)


def test_bus_down_is_bus_unavailable(emulator: EmulatorHandle) -> None:
    stats = QueueStats.from_connection_string(emulator.connection_string, timeout=1.0)
    with stats:
        assert stats.counts(["stats-a"])[0].total == 0
        emulator.stop()
        with pytest.raises(BusUnavailable) as raised:
            stats.counts(["stats-a"])
    assert isinstance(raised.value.__cause__, ServiceRequestError | ServiceResponseError)


def test_a_bus_that_never_answers_is_given_up_after_one_retry() -> None:
    """Each request is bounded by the read timeout, and a failed one is tried once more: two requests, then
    BusUnavailable (without the bounds, the call would hang for as long as the server does)."""
    with SilentServer() as server:
        stats = QueueStats.from_connection_string(connection_string("127.0.0.1", server.port), timeout=0.5)
        with stats, pytest.raises(BusUnavailable) as raised:
            stats.counts(["stats-a"])
        assert server.requests == 2
    assert isinstance(raised.value.__cause__, ServiceResponseError)


def test_one_client_serves_many_threads(emulator: EmulatorHandle) -> None:
    with (
        QueueStats.from_connection_string(emulator.connection_string) as stats,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        results = list(pool.map(lambda _: stats.counts(["stats-a", "stats-b"]), range(40)))

    assert all([c.total for c in result] == [0, 0] for result in results)
