"""A small Function App for tests/integration/test_functions_host_servicebus.py: one Service Bus queue-triggered
function per behaviour under test. Each appends one JSON line per invocation to ``$SB_APP_OUT/<function>.jsonl``."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import azure.functions as func

app = func.FunctionApp()
bp = func.Blueprint()  # type: ignore[no-untyped-call]  # registered like the project's blueprints
_write = threading.Lock()
_running = 0  # invocations of ``bounded`` in progress (they all run on the host's one event loop)


def record(function: str, **fields: Any) -> None:
    with _write, (Path(os.environ["SB_APP_OUT"]) / f"{function}.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(fields, default=str) + "\n")


@bp.function_name("deliver")
@bp.service_bus_queue_trigger(arg_name="msg", queue_name="%DELIVER_QUEUE_NAME%", connection="ServiceBusConnection")
def deliver(msg: func.ServiceBusMessage) -> None:
    record(
        "deliver",
        body=msg.get_body().decode("utf-8"),
        message_id=msg.message_id,
        delivery_count=msg.delivery_count,
        content_type=msg.content_type,
        correlation_id=msg.correlation_id,
        subject=msg.subject,
        label=msg.label,
        application_properties=msg.application_properties,
        user_properties=msg.user_properties,
        lock_token=msg.lock_token,
        sequence_number=msg.sequence_number,
        enqueued_time_utc=msg.enqueued_time_utc.isoformat() if msg.enqueued_time_utc else None,
        expires_at_utc=msg.expires_at_utc.isoformat() if msg.expires_at_utc else None,
        locked_until=msg.locked_until,
        metadata_keys=sorted(msg.metadata or {}),
    )


@bp.service_bus_queue_trigger(arg_name="msg", queue_name="sb-fail", connection="ServiceBusConnection")
def flaky(msg: func.ServiceBusMessage) -> None:
    record("flaky", message_id=msg.message_id, delivery_count=msg.delivery_count)
    raise ValueError(f"boom on delivery {msg.delivery_count}")


@bp.service_bus_queue_trigger(arg_name="msg", queue_name="sb-slow", connection="ServiceBusConnection")
def slow(msg: func.ServiceBusMessage) -> None:
    started = time.monotonic()
    time.sleep(float(msg.get_body()))
    record("slow", message_id=msg.message_id, delivery_count=msg.delivery_count, took=time.monotonic() - started)


@bp.service_bus_queue_trigger(arg_name="msg", queue_name="sb-bounded", connection="ServiceBusConnection")
async def bounded(msg: func.ServiceBusMessage) -> None:
    global _running
    _running += 1
    try:
        record("bounded", message_id=msg.message_id, delivery_count=msg.delivery_count, running=_running)
        await asyncio.sleep(0.5)
    finally:
        _running -= 1


@bp.service_bus_queue_trigger(arg_name="msg", queue_name="sb-muted", connection="MissingConnection")
def muted(msg: func.ServiceBusMessage) -> None:  # disabled by the test: its connection is never looked up
    record("muted", message_id=msg.message_id)


app.register_functions(bp)
