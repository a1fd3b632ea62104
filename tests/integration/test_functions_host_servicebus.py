"""The local Functions host as a subprocess runs Service Bus queue-triggered functions against the emulator, through
the real SDK: a message is delivered as the worker builds it and completed on return; an exception abandons it until
the queue's MaxDeliveryCount dead-letters it; a function running past the LockDuration keeps its lock; at most
maxConcurrentCalls run at once; SIGTERM lets a running invocation finish; an emulator restart is survived.

The app is ``sb_app/sb_function_app.py``; every queue has a short LockDuration so that a lost lock would show within
the test as a second delivery."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
    ServiceBusSender,
    ServiceBusSubQueue,
)

from local.servicebus_emulator import EmulatorStartError, start_emulator
from local.servicebus_emulator.process import connection_string
from tests.fixtures.backends import unavailable
from tests.fixtures.functions_host import HostProcess
from tests.fixtures.servicebus import EmulatorHandle

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).resolve().parent / "sb_app" / "sb_function_app.py"
QUEUES: dict[str, dict[str, object]] = {
    "sb-deliver": {"LockDuration": "PT5S"},
    "sb-fail": {"LockDuration": "PT5S", "MaxDeliveryCount": 3},
    "sb-slow": {"LockDuration": "PT4S"},  # the SDK's renewer renews 2.25 s before expiry, checking every 0.5 s
    "sb-bounded": {"LockDuration": "PT2S"},
    "sb-muted": {},
}
HOST_JSON = {"version": "2.0", "extensions": {"serviceBus": {"maxConcurrentCalls": 2}}}


def _emulator_config(path: Path) -> None:
    defaults = {"MaxDeliveryCount": 10, "RequiresDuplicateDetection": False, "DefaultMessageTimeToLive": "PT1H"}
    queues = [{"Name": name, "Properties": defaults | overrides} for name, overrides in QUEUES.items()]
    namespace = {"Name": "sbemulatorns", "Queues": queues, "Topics": []}
    path.write_text(json.dumps({"UserConfig": {"Namespaces": [namespace], "Logging": {"Type": "File"}}}))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    root = tmp_path_factory.mktemp("servicebus")
    config, data = root / "config.json", root / "data"
    _emulator_config(config)
    try:
        process, port = start_emulator(config, data)
    except (EmulatorStartError, OSError) as exc:
        unavailable(f"Service Bus emulator: {exc}")
        raise  # unreachable: unavailable() skips or fails
    handle = EmulatorHandle(connection_string("127.0.0.1", port), "127.0.0.1", port, config, data, process=process)
    yield handle
    handle.stop()


class Host(HostProcess):
    """The local Functions host serving the Service Bus test app in ``cwd``."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        super().__init__(cwd, env, "sb_function_app:app")


def _start(emulator: EmulatorHandle, root: Path) -> Host:
    shutil.copy(APP, root / APP.name)
    (root / "host.json").write_text(json.dumps(HOST_JSON))
    (root / "out").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "ServiceBusConnection": emulator.connection_string,
        "DELIVER_QUEUE_NAME": "sb-deliver",
        "SB_APP_OUT": str(root / "out"),
        "AzureWebJobs.muted.Disabled": "true",
    }
    host = Host(root, env)
    assert host.ready.wait(30), host.log
    return host


@pytest.fixture(scope="class")
def shared_host(emulator: EmulatorHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Path]]:
    """One host for the tests of a class (each uses its own function and queue); stopped when the class ends."""
    root = tmp_path_factory.mktemp("host")
    host = _start(emulator, root)
    yield host, root
    host.kill()


@pytest.fixture
def start_host(emulator: EmulatorHandle, tmp_path: Path) -> Iterator[Callable[[], Host]]:
    """A host of the test's own, for tests that stop it or the emulator."""
    hosts: list[Host] = []

    def start() -> Host:
        hosts.append(_start(emulator, tmp_path))
        return hosts[-1]

    yield start
    for host in hosts:
        host.kill()


def records(tmp_path: Path, function: str) -> list[dict[str, Any]]:
    path = tmp_path / "out" / f"{function}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Bus:
    """The test's side of the emulator: one client, a sender and a peeking receiver per queue, kept open (opening
    and closing an SDK client takes about a second)."""

    def __init__(self, emulator: EmulatorHandle) -> None:
        self.client = ServiceBusClient.from_connection_string(emulator.connection_string)
        self._senders: dict[str, ServiceBusSender] = {}
        self._peekers: dict[tuple[str, bool], ServiceBusReceiver] = {}

    def send(self, queue: str, *messages: ServiceBusMessage) -> None:
        if queue not in self._senders:
            self._senders[queue] = self.client.get_queue_sender(queue)
        self._senders[queue].send_messages(list(messages))

    def peek(self, queue: str, *, dead_letters: bool = False) -> list[ServiceBusReceivedMessage]:
        """The queue's messages (over the management link: a peeking receiver locks nothing)."""
        if (queue, dead_letters) not in self._peekers:
            sub_queue = ServiceBusSubQueue.DEAD_LETTER if dead_letters else None
            self._peekers[queue, dead_letters] = self.client.get_queue_receiver(queue, sub_queue=sub_queue)
        peeker = self._peekers[queue, dead_letters]
        return list(peeker.peek_messages(max_message_count=50, sequence_number=1))  # from the start, every time

    def close(self) -> None:
        with ThreadPoolExecutor() as pool:  # each close waits about half a second for the link's keep-alive thread
            list(pool.map(lambda link: link.close(), [*self._senders.values(), *self._peekers.values()]))
        self._senders.clear()
        self._peekers.clear()
        self.client.close()


@pytest.fixture(scope="module")
def bus(emulator: EmulatorHandle) -> Iterator[Bus]:
    bus = Bus(emulator)
    yield bus
    bus.close()


class TestOneHost:
    """Behaviours that one running host shows, each on a function and queue of its own."""

    def test_message_is_delivered_as_the_worker_builds_it_and_completed(
        self, bus: Bus, shared_host: tuple[Host, Path]
    ) -> None:
        host, tmp_path = shared_host
        declared = 'deliver: serviceBusTrigger queue "%DELIVER_QUEUE_NAME%" = "sb-deliver"'
        assert f"{declared} (connection ServiceBusConnection)" in host.log
        assert 'muted: serviceBusTrigger queue "sb-muted" (disabled)' in host.log
        properties = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "attempt": 2}
        message = ServiceBusMessage(
            b'{"job_id": "j1"}',
            message_id="job-1:1",
            content_type="application/json",
            correlation_id="corr-1",
            subject="job-event",
            application_properties=properties,  # type: ignore[arg-type]  # dict[str, object] is accepted
        )
        bus.send("sb-deliver", message)
        bus.send("sb-muted", ServiceBusMessage(b"never run"))

        assert wait_for(lambda: bool(records(tmp_path, "deliver")), timeout=10), host.log
        [seen] = records(tmp_path, "deliver")
        assert {
            key: seen[key] for key in ("body", "message_id", "delivery_count", "content_type", "correlation_id")
        } == {
            "body": '{"job_id": "j1"}',
            "message_id": "job-1:1",
            "delivery_count": 1,
            "content_type": "application/json",
            "correlation_id": "corr-1",
        }
        assert (seen["subject"], seen["label"]) == ("job-event", "job-event")
        assert seen["application_properties"] == seen["user_properties"] == properties
        assert seen["lock_token"]
        assert seen["sequence_number"] >= 1
        assert "+" not in seen["enqueued_time_utc"]  # a naive datetime holding UTC, as the worker builds it
        assert seen["expires_at_utc"].startswith("9999-12-31")  # no time to live
        assert seen["locked_until"] is None  # the host does not send it
        assert {"MessageId", "DeliveryCount", "EnqueuedTimeUtc", "ApplicationProperties"} <= set(seen["metadata_keys"])
        assert wait_for(lambda: "Executed 'Functions.deliver' (Succeeded" in host.log, timeout=5), host.log
        assert "Trigger Details: MessageId: job-1:1, SequenceNumber: " in host.log
        assert wait_for(lambda: not bus.peek("sb-deliver"), timeout=5), "the message was not completed"
        assert [m.body for m in bus.peek("sb-muted")] != []  # a disabled function receives nothing
        assert records(tmp_path, "muted") == []

    def test_exception_abandons_until_max_delivery_count_dead_letters(
        self, bus: Bus, shared_host: tuple[Host, Path]
    ) -> None:
        host, tmp_path = shared_host
        bus.send("sb-fail", ServiceBusMessage(b"{}", message_id="poison-1"))

        assert wait_for(lambda: len(bus.peek("sb-fail", dead_letters=True)) == 1, timeout=15), host.log
        assert [r["delivery_count"] for r in records(tmp_path, "flaky")] == [1, 2, 3]  # MaxDeliveryCount 3
        [dead] = bus.peek("sb-fail", dead_letters=True)
        assert (dead.message_id, dead.dead_letter_reason) == ("poison-1", "MaxDeliveryCountExceeded")
        assert bus.peek("sb-fail") == []
        assert host.log.count("Executed 'Functions.flaky' (Failed") == 3
        assert "ValueError: boom on delivery 3" in host.log  # the exception is logged with its invocation
        assert host.log.count("abandoned message poison-1 of Functions.flaky") == 3

    def test_lock_is_renewed_past_the_lock_duration_and_the_message_completed(
        self, bus: Bus, shared_host: tuple[Host, Path]
    ) -> None:
        host, tmp_path = shared_host
        bus.send("sb-slow", ServiceBusMessage(b"5.5", message_id="slow-1"))  # runs 5.5 s; LockDuration is 4 s

        assert wait_for(lambda: bool(records(tmp_path, "slow")), timeout=15), host.log
        assert wait_for(lambda: not bus.peek("sb-slow"), timeout=5), "the message was not completed"
        [run] = records(tmp_path, "slow")
        assert (run["message_id"], run["delivery_count"]) == ("slow-1", 1)
        assert run["took"] >= 5.5
        # Without renewal the lock would have run out 1.5 s before the end: the message delivered again meanwhile.
        assert host.log.count("Executing 'Functions.slow'") == 1, host.log
        assert "lock of message" not in host.log
        assert "could not complete" not in host.log

    def test_at_most_max_concurrent_calls_run_at_once(self, bus: Bus, shared_host: tuple[Host, Path]) -> None:
        host, tmp_path = shared_host
        assert "maxConcurrentCalls=2" in host.log
        bus.send("sb-bounded", *(ServiceBusMessage(b"x", message_id=f"b-{n}") for n in range(6)))

        assert wait_for(lambda: len(records(tmp_path, "bounded")) == 6, timeout=15), host.log
        runs = records(tmp_path, "bounded")
        assert max(r["running"] for r in runs) == 2  # two at once (async functions run on the host's loop), never three
        assert {r["delivery_count"] for r in runs} == {1}  # none was locked while waiting for a free slot
        assert wait_for(lambda: not bus.peek("sb-bounded"), timeout=5)


def test_sigterm_lets_a_running_invocation_finish_and_complete(
    bus: Bus, start_host: Callable[[], Host], tmp_path: Path
) -> None:
    host = start_host()
    bus.send("sb-slow", ServiceBusMessage(b"1.5", message_id="slow-stop"))
    assert wait_for(lambda: "Executing 'Functions.slow'" in host.log, timeout=10), host.log

    assert host.stop() == 0
    assert [r["message_id"] for r in records(tmp_path, "slow")] == ["slow-stop"]
    assert "Functions host stopped" in host.log
    assert bus.peek("sb-slow") == []  # completed before the host closed its connection


def test_host_survives_an_emulator_restart(
    emulator: EmulatorHandle, bus: Bus, start_host: Callable[[], Host], tmp_path: Path
) -> None:
    host = start_host()
    bus.close()  # the module's client would lose its connection with the emulator
    emulator.stop()
    time.sleep(1.5)  # long enough for the listeners' receives to fail
    emulator.start()
    after = Bus(emulator)
    try:
        after.send("sb-deliver", ServiceBusMessage(b"after restart", message_id="after-restart"))
    finally:
        after.close()

    assert wait_for(lambda: bool(records(tmp_path, "deliver")), timeout=20), host.log
    assert records(tmp_path, "deliver")[0]["message_id"] == "after-restart"
    assert "connecting again" in host.log
    assert host.stop() == 0
