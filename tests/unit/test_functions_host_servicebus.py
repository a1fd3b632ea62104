"""Service Bus triggers of the local Functions host: discovery from a FunctionApp, %NAME% and connection resolution,
Disabled, the host.json options, and the ServiceBusMessage the worker would build (its converter, our binding data)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus._pyamqp.message import Header, Message, Properties
from azure.servicebus.exceptions import ServiceBusConnectionError

from local.functions_host import servicebus_listener
from local.functions_host.__main__ import IndexedApp
from local.functions_host.invoke import EventLoopThread
from local.functions_host.servicebus import (
    BindingError,
    Connection,
    ServiceBusFunction,
    resolve_connection,
    resolve_names,
    servicebus_functions_of,
)
from local.functions_host.servicebus_listener import ServiceBusListener
from local.functions_host.servicebus_message import function_message, net_datetime
from local.functions_host.servicebus_options import (
    HostJsonError,
    ServiceBusOptions,
    load_servicebus_options,
    parse_servicebus_options,
)

CONNECTION_STRING = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;"


def _logged(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def _app() -> IndexedApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.function_name("deliver_webhook")
    @app.service_bus_queue_trigger(
        arg_name="msg", queue_name="%JOB_EVENTS_QUEUE_NAME%", connection="ServiceBusConnection"
    )
    def deliver_webhook(msg: func.ServiceBusMessage) -> None: ...

    @app.service_bus_queue_trigger(arg_name="message", queue_name="plain", connection="ServiceBusConnection")
    def plain(message: func.ServiceBusMessage) -> None: ...

    @app.service_bus_topic_trigger(
        arg_name="msg", topic_name="t", subscription_name="s", connection="ServiceBusConnection"
    )
    def on_topic(msg: func.ServiceBusMessage) -> None: ...

    @app.service_bus_queue_trigger(
        arg_name="msg", queue_name="sessions", connection="ServiceBusConnection", is_sessions_enabled=True
    )
    def in_sessions(msg: func.ServiceBusMessage) -> None: ...

    @app.service_bus_queue_trigger(
        arg_name="msgs", queue_name="batches", connection="ServiceBusConnection", cardinality=func.Cardinality.MANY
    )
    def in_batches(msgs: list[func.ServiceBusMessage]) -> None: ...

    @app.service_bus_queue_trigger(arg_name="msg", queue_name="%MISSING_QUEUE%", connection="ServiceBusConnection")
    def unresolved(msg: func.ServiceBusMessage) -> None: ...

    @app.service_bus_queue_trigger(arg_name="msg", queue_name="other", connection="OtherConnection")
    def unconnected(msg: func.ServiceBusMessage) -> None: ...

    @app.route(route="hello")
    def hello(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("hello")

    return IndexedApp(app)


# --- bindings ------------------------------------------------------------------------------------------------------


def test_reads_queue_triggers_resolving_names_and_leaving_out_what_it_cannot_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {"ServiceBusConnection": CONNECTION_STRING, "job_events_queue_name": "job-events"}
    with caplog.at_level(logging.ERROR):
        functions = servicebus_functions_of(_app(), environ)

    assert [(f.function_name, f.declared_queue, f.queue_name, f.binding_name) for f in functions] == [
        ("deliver_webhook", "%JOB_EVENTS_QUEUE_NAME%", "job-events", "msg"),  # app settings match ignoring case
        ("plain", "plain", "plain", "message"),
    ]
    assert {f.connection for f in functions} == {
        Connection("ServiceBusConnection", connection_string=CONNECTION_STRING)
    }
    assert not any(f.disabled for f in functions)
    unsupported = {r.function: r.getMessage() for r in _logged(caplog, "servicebus_unsupported")}  # type: ignore[attr-defined]
    assert set(unsupported) == {"on_topic", "in_sessions", "in_batches"}
    assert "topic triggers are not supported" in unsupported["on_topic"]
    assert "sessions" in unsupported["in_sessions"]
    assert "batches" in unsupported["in_batches"]
    invalid = {r.function: r.getMessage() for r in _logged(caplog, "servicebus_invalid")}  # type: ignore[attr-defined]
    assert "'%MISSING_QUEUE%' does not resolve to a value" in invalid["unresolved"]
    assert "connection string 'OtherConnection' does not exist" in invalid["unconnected"]


@pytest.mark.parametrize("name", ["AzureWebJobs.plain.Disabled", "AzureWebJobs_plain_Disabled"])
@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_disabled_function_is_listed_without_looking_up_its_connection(name: str, value: str) -> None:
    environ = {"JOB_EVENTS_QUEUE_NAME": "job-events", name: value}  # no ServiceBusConnection at all
    functions = servicebus_functions_of(_app(), environ)

    [plain] = [f for f in functions if f.function_name == "plain"]
    assert plain.disabled
    assert plain.connection is None
    assert "deliver_webhook" not in {f.function_name for f in functions}  # enabled: its missing connection is an error


@pytest.mark.parametrize("value", ["false", "0", ""])
def test_disabled_false_keeps_the_function(value: str) -> None:
    environ = {"ServiceBusConnection": CONNECTION_STRING, "AzureWebJobs.plain.Disabled": value}
    [plain] = [f for f in servicebus_functions_of(_app(), environ) if f.function_name == "plain"]
    assert not plain.disabled


@pytest.mark.parametrize(
    ("expression", "resolved"),
    [
        ("jobs", "jobs"),
        ("%Q%", "job-events"),
        ("%q%-dlq", "job-events-dlq"),
        ("%P%-%Q%", "x-job-events"),
    ],
)
def test_resolves_app_setting_references(expression: str, resolved: str) -> None:
    assert resolve_names(expression, {"Q": "job-events", "P": "x"}) == resolved


@pytest.mark.parametrize(("expression", "detail"), [("%Q", "without its closing '%'"), ("%NOPE%", "does not resolve")])
def test_refuses_unresolvable_names(expression: str, detail: str) -> None:
    with pytest.raises(BindingError, match=detail):
        resolve_names(expression, {"Q": "job-events"})


@pytest.mark.parametrize(
    ("name", "environ", "expected"),
    [
        ("Sb", {"Sb": "cs"}, Connection("Sb", connection_string="cs")),
        ("Sb", {"AzureWebJobsSb": "cs"}, Connection("AzureWebJobsSb", connection_string="cs")),
        ("Sb", {"Sb": "first", "AzureWebJobsSb": "second"}, Connection("Sb", connection_string="first")),
        ("", {"AzureWebJobsServiceBus": "cs"}, Connection("AzureWebJobsServiceBus", connection_string="cs")),
        (
            "Sb",
            {"Sb__fullyQualifiedNamespace": "ns.servicebus.windows.net"},
            Connection("Sb__fullyQualifiedNamespace", namespace="ns.servicebus.windows.net"),
        ),
        (
            "Sb",
            {"Sb:fullyQualifiedNamespace": "ns.servicebus.windows.net"},
            Connection("Sb__fullyQualifiedNamespace", namespace="ns.servicebus.windows.net"),
        ),
        (
            "Sb",
            {"Sb": "cs", "Sb__fullyQualifiedNamespace": "ns.servicebus.windows.net"},
            Connection("Sb", connection_string="cs"),
        ),
    ],
)
def test_resolves_connections_as_the_extension_does(name: str, environ: dict[str, str], expected: Connection) -> None:
    assert resolve_connection(name, environ) == expected


@pytest.mark.parametrize("environ", [{}, {"Sb": "  "}, {"Sb__clientId": "id"}])
def test_a_missing_connection_is_an_error(environ: dict[str, str]) -> None:
    with pytest.raises(BindingError, match="'Sb' does not exist"):
        resolve_connection("Sb", environ)


def test_connection_string_makes_a_client_without_connecting() -> None:
    with Connection("Sb", connection_string=CONNECTION_STRING).client() as client:
        assert client.fully_qualified_namespace == "127.0.0.1:5672"


# --- host.json -----------------------------------------------------------------------------------------------------


def test_defaults_follow_the_extension() -> None:
    assert parse_servicebus_options({}, processors=3) == ServiceBusOptions(
        max_concurrent_calls=48, auto_complete_messages=True, max_auto_lock_renewal_duration=timedelta(minutes=5)
    )


def test_reads_extension_5_options() -> None:
    config = {
        "version": "2.0",
        "extensions": {
            "serviceBus": {
                "maxConcurrentCalls": 4,
                "autoCompleteMessages": False,
                "maxAutoLockRenewalDuration": "00:10:00",
                "prefetchCount": 10,
            }
        },
    }
    assert parse_servicebus_options(config, processors=2) == ServiceBusOptions(4, False, timedelta(minutes=10), 10)


def test_keys_match_ignoring_case_and_values_may_be_strings() -> None:
    config = {"Extensions": {"ServiceBus": {"MAXCONCURRENTCALLS": "3", "autocompletemessages": "False"}}}
    options = parse_servicebus_options(config, processors=1)
    assert (options.max_concurrent_calls, options.auto_complete_messages) == (3, False)


def test_reads_the_2x_message_handler_options() -> None:
    handler = {"maxConcurrentCalls": 5, "autoComplete": False, "maxAutoRenewDuration": "00:02:00"}
    options = parse_servicebus_options({"extensions": {"serviceBus": {"messageHandlerOptions": handler}}}, 1)
    assert options == ServiceBusOptions(5, False, timedelta(minutes=2))


def test_top_level_options_override_the_2x_ones() -> None:
    section = {
        "maxConcurrentCalls": 7,
        "autoCompleteMessages": True,
        "maxAutoLockRenewalDuration": "00:00:30",
        "messageHandlerOptions": {"maxConcurrentCalls": 5, "autoComplete": False, "maxAutoRenewDuration": "00:02:00"},
    }
    options = parse_servicebus_options({"extensions": {"serviceBus": section}}, 1)
    assert options == ServiceBusOptions(7, True, timedelta(seconds=30))


@pytest.mark.parametrize(
    ("section", "auto_complete", "renewal"),
    [
        ({"sessionHandlerOptions": {"autoComplete": False, "maxAutoRenewDuration": "00:01:00"}}, False, 60),
        ({"batchOptions": {"autoComplete": False}}, False, 300),
        (
            {"messageHandlerOptions": {"autoComplete": True}, "sessionHandlerOptions": {"autoComplete": False}},
            True,
            300,
        ),
    ],
)
def test_falls_back_to_session_and_batch_options_as_the_extension_does(
    section: dict[str, Any], auto_complete: bool, renewal: int
) -> None:
    options = parse_servicebus_options({"extensions": {"serviceBus": section}}, 1)
    assert (options.auto_complete_messages, options.max_auto_lock_renewal_duration) == (
        auto_complete,
        timedelta(seconds=renewal),
    )


def test_warns_about_message_handler_keys_the_host_ignores(caplog: pytest.LogCaptureFixture) -> None:
    handler = {"maxAutoLockRenewalDuration": "00:10:00", "autoCompleteMessages": False}
    with caplog.at_level(logging.WARNING):
        options = parse_servicebus_options({"extensions": {"serviceBus": {"messageHandlerOptions": handler}}}, 1)
    assert options == ServiceBusOptions(16)  # both ignored, as the host ignores them
    warned = [r.getMessage() for r in _logged(caplog, "host_json_ignored")]
    assert len(warned) == 2
    assert "messageHandlerOptions.maxAutoLockRenewalDuration is not read by the host" in warned[0]


@pytest.mark.parametrize(
    ("section", "detail"),
    [
        ({"maxConcurrentCalls": 0}, "maxConcurrentCalls: 0 is less than 1"),
        ({"maxConcurrentCalls": "many"}, "'many' is not an integer"),
        ({"autoCompleteMessages": "yes"}, "'yes' is not a boolean"),
        ({"maxAutoLockRenewalDuration": "five minutes"}, "not a TimeSpan"),
        ({"maxAutoLockRenewalDuration": "-00:01:00"}, "not a TimeSpan"),
        ({"prefetchCount": -1}, "prefetchCount: -1 is less than 0"),
        ({"messageHandlerOptions": {"maxAutoRenewDuration": "x"}}, "maxAutoRenewDuration: 'x'"),
    ],
)
def test_refuses_invalid_values_naming_them(section: dict[str, Any], detail: str) -> None:
    with pytest.raises(HostJsonError, match=detail):
        parse_servicebus_options({"extensions": {"serviceBus": section}}, 1)


def test_renewal_may_be_turned_off_and_timespans_may_count_days() -> None:
    off = parse_servicebus_options({"extensions": {"serviceBus": {"maxAutoLockRenewalDuration": "00:00:00"}}}, 1)
    assert off.max_auto_lock_renewal_duration == timedelta(0)
    days = parse_servicebus_options({"extensions": {"serviceBus": {"maxAutoLockRenewalDuration": "1.02:00:00"}}}, 1)
    assert days.max_auto_lock_renewal_duration == timedelta(days=1, hours=2)


def test_loads_host_json_or_the_defaults_without_one(tmp_path: Path) -> None:
    assert load_servicebus_options(tmp_path / "absent.json", processors=1) == ServiceBusOptions(16)
    host_json = tmp_path / "host.json"
    host_json.write_text('{"version": "2.0", "extensions": {"serviceBus": {"maxConcurrentCalls": 2}}}')
    assert load_servicebus_options(host_json, processors=1).max_concurrent_calls == 2


def test_the_repository_host_json_is_valid() -> None:
    load_servicebus_options(Path(__file__).resolve().parents[2] / "host.json", processors=1)


# --- the message ---------------------------------------------------------------------------------------------------

ENQUEUED = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
TOKEN = uuid.UUID("6f1bd8a1-1111-4222-8333-944444444444")


def _received(**properties: Any) -> ServiceBusReceivedMessage:
    """A message as the SDK hands it over after a receive (no broker needed to build one)."""
    annotations: dict[str | bytes, Any] = {
        b"x-opt-sequence-number": 42,
        b"x-opt-enqueued-time": int(ENQUEUED.timestamp() * 1000),
        b"x-opt-locked-until": int((ENQUEUED + timedelta(seconds=30)).timestamp() * 1000),
    }
    message = Message(
        header=Header(delivery_count=properties.pop("prior_deliveries", 0), ttl=properties.pop("ttl", None)),
        message_annotations=annotations,
        properties=Properties(
            message_id=b"job-1:1",
            correlation_id=b"corr",
            content_type=b"application/json",
            subject=b"job-event",
            reply_to=None,
        ),
        application_properties=properties.pop("application_properties", None),
        data=[b'{"job_id": ', b'"j1"}'],
    )
    return ServiceBusReceivedMessage(message, receiver=None, lock_token=TOKEN)


def test_builds_the_message_the_worker_builds() -> None:
    app_properties = {b"traceparent": b"00-abc-def-01", b"attempt": 2, b"binary": b"\xff\x00", b"ok": True}
    msg = function_message(_received(prior_deliveries=2, application_properties=app_properties))

    assert isinstance(msg, func.ServiceBusMessage)
    assert msg.get_body() == b'{"job_id": "j1"}'
    assert (msg.message_id, msg.correlation_id, msg.content_type) == ("job-1:1", "corr", "application/json")
    assert msg.delivery_count == 3  # two prior deliveries: this is the third, as .NET counts
    assert (msg.subject, msg.label) == ("job-event", "job-event")
    assert msg.lock_token == str(TOKEN)
    assert msg.sequence_number == 42
    assert msg.enqueued_time_utc == ENQUEUED.replace(tzinfo=None)  # naive UTC: the host sends a DateTime
    assert msg.expires_at_utc == datetime(9999, 12, 31, 23, 59, 59, 999999)  # no time to live: DateTime.MaxValue
    expected = {"traceparent": "00-abc-def-01", "attempt": 2, "binary": "/wA=", "ok": True}
    assert msg.application_properties == msg.user_properties == expected
    assert msg.locked_until is None  # not in the host's binding data
    assert msg.time_to_live is None
    assert msg.dead_letter_reason is None
    metadata = msg.metadata or {}
    assert metadata["MessageId"] == "job-1:1"
    assert metadata["DeliveryCount"] == 3
    assert metadata["EnqueuedTimeUtc"] == "2024-05-06T07:08:09.123"
    assert metadata["EnqueuedTime"] == "2024-05-06T07:08:09.123+00:00"
    assert "ReplyTo" not in metadata  # a None value is not sent


def test_expiry_is_the_enqueued_time_plus_the_time_to_live() -> None:
    msg = function_message(_received(ttl=60_000))
    assert msg.expires_at_utc == (ENQUEUED + timedelta(minutes=1)).replace(tzinfo=None)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), "2024-05-06T07:08:09+00:00"),
        (datetime(2024, 5, 6, 7, 8, 9, 120000, tzinfo=UTC), "2024-05-06T07:08:09.12+00:00"),
        (datetime(2024, 5, 6, 7, 8, 9, 120000), "2024-05-06T07:08:09.12"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.9999999+00:00"),
    ],
)
def test_formats_dates_as_json_net_does(moment: datetime, text: str) -> None:
    assert net_datetime(moment) == text


# --- the listener, on an in-memory receiver ------------------------------------------------------------------------


class MemoryQueue:
    """The broker side of ``MemoryReceiver``: what is waiting, what the listener asked for and how it settled."""

    def __init__(self, *message_ids: str) -> None:
        self.waiting = [_received_as(message_id) for message_id in message_ids]
        self.asked: list[int] = []  # max_message_count of each receive
        self.completed: list[str] = []
        self.abandoned: list[str] = []
        self.receivers: list[MemoryReceiver] = []
        self.fail_receives = 0  # the next receives that raise, as on a dropped connection

    def client(self) -> Any:
        return MemoryClient(self)


class MemoryReceiver:
    def __init__(self, broker: MemoryQueue) -> None:
        self.broker = broker
        self.closed = False

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[ServiceBusReceivedMessage]:
        self.broker.asked.append(max_message_count)
        if self.broker.fail_receives:
            self.broker.fail_receives -= 1
            raise ServiceBusConnectionError(message="connection dropped")
        taken = self.broker.waiting[:max_message_count]
        del self.broker.waiting[:max_message_count]
        if not taken:
            time.sleep(min(max_wait_time, 0.01))
        return taken

    def complete_message(self, message: ServiceBusReceivedMessage) -> None:
        self.broker.completed.append(str(message.message_id))

    def abandon_message(self, message: ServiceBusReceivedMessage) -> None:
        self.broker.abandoned.append(str(message.message_id))

    def close(self) -> None:
        self.closed = True


class MemoryClient:
    def __init__(self, broker: MemoryQueue) -> None:
        self.broker = broker

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_queue_receiver(self, queue_name: str, **options: Any) -> MemoryReceiver:
        self.broker.receivers.append(MemoryReceiver(self.broker))
        return self.broker.receivers[-1]


def _received_as(message_id: str) -> ServiceBusReceivedMessage:
    message = Message(
        header=Header(delivery_count=0), properties=Properties(message_id=message_id.encode()), data=[b"x"]
    )
    return ServiceBusReceivedMessage(message, receiver=None, lock_token=uuid.uuid4())


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.close()


def _listener(
    user_function: Callable[..., Any], broker: MemoryQueue, loop: EventLoopThread, *, auto_complete: bool = True
) -> ServiceBusListener:
    function = ServiceBusFunction(
        function_name="fn",
        declared_queue="q",
        queue_name="q",
        connection=Connection("Sb", connection_string=CONNECTION_STRING),
        binding_name="msg",
        disabled=False,
        user_function=user_function,
    )
    settings = ServiceBusOptions(2, auto_complete_messages=auto_complete, max_auto_lock_renewal_duration=timedelta(0))
    return ServiceBusListener(function, settings, loop, client=broker.client)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _stop(listener: ServiceBusListener, grace: float = 5.0) -> None:
    listener.request_stop(grace)
    assert listener.join(grace + 5)


def test_completes_on_return_and_abandons_on_an_exception(
    loop: EventLoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    def function(msg: func.ServiceBusMessage) -> None:
        if msg.message_id == "bad":
            raise ValueError("boom")

    broker = MemoryQueue("good", "bad")
    listener = _listener(function, broker, loop)
    with caplog.at_level(logging.INFO):
        listener.start()
        assert _wait_for(lambda: broker.completed == ["good"] and broker.abandoned == ["bad"])
        _stop(listener)
    [failed] = _logged(caplog, "servicebus_failed")
    assert failed.exc_info is not None
    assert "ValueError: boom" in caplog.text
    assert broker.receivers[0].closed


def test_leaves_a_message_to_its_lock_when_auto_complete_is_off(loop: EventLoopThread) -> None:
    broker = MemoryQueue("m1")
    listener = _listener(lambda msg: None, broker, loop, auto_complete=False)
    listener.start()
    assert _wait_for(lambda: not broker.waiting and len(broker.asked) > 2)
    _stop(listener)
    assert (broker.completed, broker.abandoned) == ([], [])


def test_asks_for_one_message_at_a_time_and_only_with_a_free_slot(loop: EventLoopThread) -> None:
    release = threading.Event()
    running: list[str] = []
    broker = MemoryQueue(*(f"m{n}" for n in range(5)))

    async def function(msg: func.ServiceBusMessage) -> None:  # a coroutine function: runs on the host's loop
        running.append(msg.message_id)
        await asyncio.to_thread(release.wait, 5)

    listener = _listener(function, broker, loop)
    listener.start()
    assert _wait_for(lambda: len(running) == 2)
    time.sleep(0.2)
    assert len(running) == 2  # both slots taken: nothing more received
    assert len(broker.waiting) == 3
    release.set()
    assert _wait_for(lambda: len(broker.completed) == 5)
    _stop(listener)
    assert set(broker.asked) == {1}  # one per receive (the SDK would wait 0.2 s more for a second one)


def test_reconnects_after_a_failure_and_does_not_settle_what_the_old_connection_held(
    loop: EventLoopThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicebus_listener, "INITIAL_BACKOFF", 0.05)
    release = threading.Event()
    broker = MemoryQueue("held")

    def function(msg: func.ServiceBusMessage) -> None:
        if msg.message_id == "held":
            broker.fail_receives = 2  # the connection drops while this one runs
            release.wait(5)

    listener = _listener(function, broker, loop)
    with caplog.at_level(logging.INFO):
        listener.start()
        assert _wait_for(lambda: len(broker.receivers) == 3 and len(broker.asked) > 4)  # failed twice, connected again
        release.set()
        broker.waiting.append(_received_as("after"))
        assert _wait_for(lambda: broker.completed == ["after"])
        _stop(listener)
    assert broker.abandoned == []
    assert len(_logged(caplog, "servicebus_reconnect")) == 2
    [lost] = _logged(caplog, "lock_lost")
    assert "held" in lost.getMessage()
    assert all(receiver.closed for receiver in broker.receivers)


def test_stop_lets_running_invocations_finish_then_abandons_the_rest(
    loop: EventLoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    forever = threading.Event()
    began: list[str] = []
    ended: list[str] = []
    broker = MemoryQueue("quick", "stuck")

    def function(msg: func.ServiceBusMessage) -> None:
        began.append(msg.message_id)
        time.sleep(0.2) if msg.message_id == "quick" else forever.wait(10)
        ended.append(msg.message_id)

    listener = _listener(function, broker, loop)
    with caplog.at_level(logging.WARNING):
        listener.start()
        assert _wait_for(lambda: len(began) == 2)  # a message received as the stop comes is not run at all
        _stop(listener, grace=0.5)
    assert ended == ["quick"]  # the stop returned while "stuck" still ran
    assert (broker.completed, broker.abandoned) == (["quick"], ["stuck"])
    assert _logged(caplog, "servicebus_stop_timeout")
    forever.set()
