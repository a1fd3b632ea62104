"""OpenTelemetry set-up and W3C trace context in Service Bus application properties.

``configure_telemetry`` runs once per process, at the entrypoint: Azure Monitor when
``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set (``configure_azure_monitor`` raises without one), else the plain
OpenTelemetry SDK, exporting nowhere (``OTEL_TRACES_EXPORTER=none``) or to the console (``console``). Either way
spans get real ids, so the submit span's ``traceparent`` reaches the worker, whose span becomes its child.

Metrics (:mod:`shared.metrics`): Azure Monitor sets up its own meter provider (a periodic reader, every 60 s, to
``customMetrics``); the plain SDK gets a ``MeterProvider`` with no reader, so the instruments record nothing that
leaves the process. ``metric_readers`` adds readers to either (an in-memory reader in a test, an OTLP one).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.settings import Settings

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured = False


def configure_telemetry(settings: Settings, role: str, *, metric_readers: Sequence[MetricReader] = ()) -> None:
    """Set up tracing and metrics for this process (``role``: "api", "worker", ...); later calls do nothing."""
    global _configured
    with _lock:
        if _configured:
            return
        resource = Resource.create({"service.namespace": settings.service_name, "service.name": role})
        if settings.applicationinsights_connection_string:
            from azure.monitor.opentelemetry import configure_azure_monitor

            configure_azure_monitor(
                connection_string=settings.applicationinsights_connection_string,
                resource=resource,
                metric_readers=list(metric_readers),
            )
        else:
            provider = TracerProvider(resource=resource)
            if settings.otel_traces_exporter == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            trace.set_tracer_provider(provider)
            metrics.set_meter_provider(MeterProvider(metric_readers=list(metric_readers), resource=resource))
        _configured = True


def trace_properties() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span; empty when there is no valid span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def context_from_properties(properties: Mapping[Any, Any] | None) -> Context:
    """The trace context carried by a received message's application properties (keys and values may be bytes)."""
    carrier = {_text(k): _text(v) for k, v in (properties or {}).items()}
    return _propagator.extract(carrier)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
