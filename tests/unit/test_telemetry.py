from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import azure.monitor.opentelemetry
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan

from shared import telemetry
from shared.bus import job_message
from shared.messages import CONTENT_TYPE, SUBJECT, JobMessage
from shared.settings import Settings
from shared.telemetry import configure_telemetry, context_from_properties, trace_properties

SETTINGS = Settings.from_env({"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x"})


def test_no_span_no_trace_context() -> None:
    assert "traceparent" not in trace_properties()


def test_trace_context_round_trip_through_application_properties() -> None:
    configure_telemetry(SETTINGS, role="test")
    configure_telemetry(SETTINGS, role="test")  # idempotent
    tracer = trace.get_tracer(__name__)
    with tracer.start_as_current_span("submit") as submit:
        properties = trace_properties()
    parent = submit.get_span_context()
    assert properties["traceparent"].startswith(f"00-{parent.trace_id:032x}-{parent.span_id:016x}-")
    # The SDK hands application properties back with bytes keys and values.
    received = {k.encode(): v.encode() for k, v in properties.items()}
    with tracer.start_as_current_span("process", context=context_from_properties(received)) as process:
        pass
    assert process.get_span_context().trace_id == parent.trace_id
    assert isinstance(process, ReadableSpan)
    assert process.parent is not None
    assert process.parent.span_id == parent.span_id


def test_context_from_nothing_is_a_new_trace() -> None:
    assert trace.get_current_span(context_from_properties(None)).get_span_context().is_valid is False


def test_job_message_envelope() -> None:
    configure_telemetry(SETTINGS, role="test")
    job_id = uuid.uuid4()
    message = JobMessage(
        job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256="0" * 64, bands=["red", "nir"], scale=1.0,
        submitted_at=datetime.now(UTC),
    )  # fmt: skip
    with trace.get_tracer(__name__).start_as_current_span("submit"):
        sb = job_message(message)
    assert sb.message_id == f"{job_id}:1"
    assert sb.content_type == CONTENT_TYPE
    assert sb.subject == SUBJECT
    assert JobMessage.model_validate_json(b"".join(sb.body)) == message
    assert sb.application_properties is not None
    assert str(sb.application_properties["traceparent"]).startswith("00-")


def test_the_plain_sdk_has_a_meter_provider() -> None:
    """The SDK's, with no reader unless given one: the instruments record, nothing leaves the process."""
    configure_telemetry(SETTINGS, role="test")
    assert isinstance(metrics.get_meter_provider(), MeterProvider)


def test_azure_monitor_gets_the_resource_and_the_extra_metric_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(azure.monitor.opentelemetry, "configure_azure_monitor", lambda **kw: calls.append(kw))
    monkeypatch.setattr(telemetry, "_configured", False)  # this process's real set-up is left alone
    reader = InMemoryMetricReader()
    settings = Settings.from_env(
        {"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x",
         "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000"}
    )  # fmt: skip
    configure_telemetry(settings, role="gpu-worker", metric_readers=[reader])
    (call,) = calls
    assert call["connection_string"].startswith("InstrumentationKey=")
    assert call["metric_readers"] == [reader]
    assert call["resource"].attributes["service.name"] == "gpu-worker"
