"""The metrics and spans the workbook and the alerts query are the ones the code emits (they cannot drift apart).

One run of the app on the unit fakes, recorded by an in-memory metric reader and span exporter: a job submitted over
HTTP (``POST /api/jobs``), then consumed by a worker that succeeds and, for a second job, by one that fails it; the
worker's gauges with a stand-in GPU. Every KQL query of ``infra/bicep/modules/workbook.json`` and
``infra/bicep/modules/alerts.bicep`` (their ``'''`` strings) is parsed: each metric name (a ``"crop_ai..."`` literal),
each dimension (``customDimensions["..."]``) and each span name (``name == "..."`` in a ``requests`` query) must have
been emitted, the dimension by a metric or span that the same query names. ``test_the_check_catches_*`` shows that a
misspelt name fails it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from functions import deps
from gpu_worker.gauges import watch_worker
from gpu_worker.heartbeat import Heartbeat
from gpu_worker.settlement import Action, AttemptLost, Cancelled, Decision, Interrupted, outcome
from shared import metrics
from shared.errors import DatabaseUnavailable, InvalidImage
from shared.jobs import JobStatus
from shared.settings import Settings
from shared.telemetry import configure_telemetry
from tests import geotiffs
from tests.functions_client import body, post_job
from tests.job_api_client import post_batch
from tests.jobs import new_job
from tests.unit.test_consumer_settle import World
from tests.unit.test_consumer_settle import make_world as make_world
from tests.unit.test_functions import World as ApiWorld
from tests.unit.test_reconciler import World as ReconcilerWorld

REPO = Path(__file__).resolve().parents[2]
WORKBOOK = REPO / "infra" / "bicep" / "modules" / "workbook.json"
ALERTS = REPO / "infra" / "bicep" / "modules" / "alerts.bicep"
SETTINGS = Settings.from_env({"ServiceBusConnection": "x", "AzureWebJobsStorage": "x", "DATABASE_URL": "x"})

METRIC = re.compile(r'"(crop_ai\.[A-Za-z0-9_.]+)"')
DIMENSION = re.compile(r'customDimensions(?:\["([^"]+)"\]|\.([A-Za-z_][A-Za-z0-9_]*))')
SPAN_NAME = re.compile(r'\bname\s*==\s*"([^"]+)"')


class Recording(SpanProcessor):
    """The ended spans, while recording (the global tracer provider keeps its processors for the whole session)."""

    def __init__(self) -> None:
        self.on = False
        self.spans: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            with self._lock:
                self.spans.append(span)


_recording = Recording()
_recorded: set[int] = set()  # the tracer providers it was added to


@dataclass
class Emitted:
    """What a run emitted: metric name -> dimension names; span name -> attribute names."""

    metrics: dict[str, set[str]] = field(default_factory=dict)
    spans: dict[str, set[str]] = field(default_factory=dict)


def queries() -> dict[str, str]:
    """Every KQL query of the workbook (by item name) and of the alerts (by position), as the files hold them."""
    workbook = json.loads(WORKBOOK.read_text())
    found = {f"workbook:{item['name']}": item["content"]["query"] for item in workbook["items"] if item["type"] == 3}
    for n, query in enumerate(re.findall(r"'''(.*?)'''", ALERTS.read_text(), re.DOTALL)):
        found[f"alerts:{n}"] = query
    return found


def unknown(query: str, emitted: Emitted) -> list[str]:
    """What ``query`` names that ``emitted`` lacks (empty: every name is emitted)."""
    dimensions = {a or b for a, b in DIMENSION.findall(query)}
    names = set(METRIC.findall(query)) - dimensions
    spans = set(SPAN_NAME.findall(query)) - names if re.search(r"\brequests\b", query) else set()
    problems = [f"metric {n}" for n in sorted(names - emitted.metrics.keys())]
    problems += [f"span {s}" for s in sorted(spans - emitted.spans.keys())]
    if not names and not spans:
        problems.append("names no metric and no span")
    known: set[str] = set()
    for n in names & emitted.metrics.keys():
        known |= emitted.metrics[n]
    for s in spans & emitted.spans.keys():
        known |= emitted.spans[s]
    problems += [f"dimension {d}" for d in sorted(dimensions - known)]
    return problems


class StandInGpu:
    def utilization(self) -> float | None:
        return 42.0

    def memory_allocated(self) -> float | None:
        return 1.0e9

    def memory_reserved(self) -> float | None:
        return 2.0e9


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> Emitted:
    """Run the app once (API submit, a worker succeeding, one failing, the worker's gauges) and record it."""
    configure_telemetry(SETTINGS, role="test")  # the process's providers (idempotent); the spans are the SDK's
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    if id(provider) not in _recorded:
        provider.add_span_processor(_recording)
        _recorded.add(id(provider))
    tmp_path = tmp_path_factory.mktemp("metrics")
    reader = InMemoryMetricReader()
    metrics.bind(MeterProvider(metric_readers=[reader]))
    _recording.spans.clear()
    _recording.on = True
    api = ApiWorld(MAX_BACKLOG="100")
    deps.use(api.deps())
    heartbeat = Heartbeat(tmp_path / "gauges.hb")
    heartbeat.beat()
    unwatch = watch_worker(heartbeat, worker="w1", device="cuda:0", max_age=60, busy_limit=3600, gpu=StandInGpu())
    worlds: list[World] = []
    try:
        good, bad = (api.job(body(post_job(geotiffs.crafted(width=w)))["job_id"]) for w in (32, 40))
        worker = World(tmp_path, api.jobs)
        worlds.append(worker)
        worker.queue(good)
        assert worker.consumer.run(max_jobs=1) == 1
        failing = World(tmp_path, api.jobs)
        worlds.append(failing)
        failing.handler.error = InvalidImage("not a GeoTIFF after all")
        failing.queue(bad)
        assert failing.consumer.run(max_jobs=1) == 1
        assert (api.job(good.job_id).status, api.job(bad.job_id).status) == (JobStatus.SUCCEEDED, JobStatus.FAILED)
        recorded = record(reader, _recording.spans)
    finally:  # before the tests: no other test sees the stand-in GPU, the API's deps or this reader
        for world in worlds:
            world.presence.close()
        unwatch()
        _recording.on = False
        deps.use(None)
        metrics.bind(None)
    return recorded


def record(reader: InMemoryMetricReader, spans: list[ReadableSpan]) -> Emitted:
    found = Emitted()
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                keys = found.metrics.setdefault(metric.name, set())
                for point in metric.data.data_points:
                    keys |= set((point.attributes or {}).keys())
    for span in spans:
        found.spans.setdefault(span.name, set()).update((span.attributes or {}).keys())
    return found


def test_every_metric_is_emitted_with_its_dimensions(emitted: Emitted) -> None:
    job = {"analysis", "priority", "worker", "device"}
    gauge = {"worker", "device"}
    assert emitted.metrics == {
        metrics.JOBS_SUBMITTED: {"analysis", "priority"},
        metrics.JOBS_QUEUED: set(),
        metrics.JOBS_COMPLETED: job | {"outcome", "code"},
        metrics.JOBS_IN_FLIGHT: job,
        metrics.RUN_DURATION: job | {"outcome"},
        metrics.QUEUE_WAIT: job,
        metrics.STAGE_DURATION: job | {"stage"},
        metrics.WORKER_HEARTBEAT: gauge,
        metrics.GPU_UTILIZATION: gauge,
        metrics.GPU_MEMORY_ALLOCATED: gauge,
        metrics.GPU_MEMORY_RESERVED: gauge,
    }
    assert emitted.spans[metrics.JOB_SPAN] >= {
        metrics.SPAN_JOB_ID, metrics.SPAN_ANALYSIS, metrics.SPAN_PRIORITY, metrics.SPAN_WORKER, metrics.SPAN_DEVICE,
        metrics.SPAN_OUTCOME, metrics.SPAN_CODE, metrics.SPAN_RUN, metrics.SPAN_QUEUE_WAIT,
    }  # fmt: skip


def test_the_values_say_what_happened(make_world: Callable[..., World], tmp_path: Path) -> None:
    """Outcomes and codes as the settlement decided, every stage timed, nothing left in flight."""
    reader = InMemoryMetricReader()
    metrics.bind(MeterProvider(metric_readers=[reader]))
    try:
        api = ApiWorld()
        deps.use(api.deps())
        job = api.job(body(post_job(geotiffs.crafted()))["job_id"])
        world = make_world(api.jobs)
        world.handler.error = InvalidImage("bad pixels")
        world.queue(job)
        assert world.consumer.run(max_jobs=1) == 1
        points = _points(reader)
    finally:
        deps.use(None)
        metrics.bind(None)
    labels = {"analysis": "crop-health", "priority": "normal", "worker": "w1", "device": "cpu"}
    assert points[metrics.JOBS_SUBMITTED] == [({"analysis": "crop-health", "priority": "normal"}, 1)]
    assert points[metrics.JOBS_COMPLETED] == [({**labels, "outcome": "failed", "code": "invalid_image"}, 1)]
    assert points[metrics.JOBS_IN_FLIGHT] == [(labels, 0)]
    assert sorted(a["stage"] for a, _ in points[metrics.STAGE_DURATION]) == ["analysis", "download", "settle"]
    assert [a for a, _ in points[metrics.QUEUE_WAIT]] == [labels]


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float | None]]]:
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", getattr(point, "count", None))
                    found.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return found


def test_there_are_queries_to_check() -> None:
    found = queries()
    assert sum(k.startswith("workbook:") for k in found) >= 10
    assert sum(k.startswith("alerts:") for k in found) == 3


@pytest.mark.parametrize("where", sorted(queries()))
def test_every_name_a_query_uses_is_emitted(emitted: Emitted, where: str) -> None:
    assert unknown(queries()[where], emitted) == []


@pytest.mark.parametrize(
    ("where", "wrong", "right", "problem"),
    [
        ("workbook:failures", '"crop_ai.jobs.completed"', '"crop_ai.jobs.complete"', "metric crop_ai.jobs.complete"),
        ("workbook:failures", '["code"]', '["error_code"]', "dimension error_code"),
        ("workbook:slowest", '"crop_ai.run_s"', '"crop_ai.run_ms"', "dimension crop_ai.run_ms"),
        ("workbook:slowest", '"process job"', '"process-job"', "span process-job"),
        ("alerts:1", '"crop_ai.worker.heartbeat"', '"crop_ai.worker.heartbeats"', "metric crop_ai.worker.heartbeats"),
        ("workbook:stages", '["stage"]', '["analysis"]', None),  # a dimension the metric has: still fine
    ],
)
def test_the_check_catches_a_name_no_code_emits(
    emitted: Emitted, where: str, wrong: str, right: str, problem: str | None
) -> None:
    query = queries()[where]
    assert wrong in query
    found = unknown(query.replace(wrong, right), emitted)
    assert (problem in found) if problem else (found == [])


@pytest.mark.parametrize(
    ("error", "decision", "expected"),
    [
        (None, Decision(Action.COMPLETE), ("succeeded", "")),
        (AttemptLost("taken over"), Decision(Action.COMPLETE, "AttemptLost"), ("lost", "")),
        (Cancelled("asked"), Decision(Action.COMPLETE, "Cancelled", stop=True), ("cancelled", "")),
        (InvalidImage("x"), Decision(Action.DEAD_LETTER, "InvalidImage", fail_code="invalid_image"),
         ("failed", "invalid_image")),
        (DatabaseUnavailable("down"), Decision(Action.RETRY, "DatabaseUnavailable"),
         ("retried", "database_unavailable")),
        (Interrupted("drain"), Decision(Action.RETRY, "Shutdown", drain=True), ("released", "Interrupted")),
        (RuntimeError("bug"), Decision(Action.ABANDON, "RuntimeError"), ("abandoned", "RuntimeError")),
    ],
)  # fmt: skip
def test_the_outcome_of_a_settlement(
    error: BaseException | None, decision: Decision, expected: tuple[str, str]
) -> None:
    assert outcome(decision, error) == expected
    assert expected[0] in metrics.OUTCOMES


def test_without_a_gpu_the_gpu_gauges_report_nothing_and_a_silent_worker_reports_0(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    metrics.bind(MeterProvider(metric_readers=[reader]))
    unwatch = watch_worker(Heartbeat(tmp_path / "hb"), worker="w9", device="cpu", max_age=60, busy_limit=60)
    try:
        points = _points(reader)
    finally:
        unwatch()
        metrics.bind(None)
    assert not [name for name in points if name.startswith("crop_ai.gpu.")]
    assert points[metrics.WORKER_HEARTBEAT] == [({"worker": "w9", "device": "cpu"}, 0)]  # never beat: not healthy


def test_a_batch_counts_each_job_submitted_once(tmp_path: Path) -> None:
    """``POST /api/batches`` counts its jobs as ``POST /api/jobs`` does; its Idempotency-Key replay counts nothing."""
    reader = InMemoryMetricReader()
    metrics.bind(MeterProvider(metric_readers=[reader]))
    try:
        api = ApiWorld()
        deps.use(api.deps())
        key = {"Idempotency-Key": "batch-metrics"}
        images = [geotiffs.crafted(width=w) for w in (32, 40, 48)]
        assert post_batch(images, headers=key).status_code == 202
        assert post_batch(images, headers=key).status_code == 200  # the replay
        points = _points(reader)
    finally:
        deps.use(None)
        metrics.bind(None)
    assert points[metrics.JOBS_SUBMITTED] == [({"analysis": "crop-health", "priority": "normal"}, 3)]


def test_the_reconciler_reports_the_backlog_on_every_run() -> None:
    """The workers-silent alert reads ``crop_ai.jobs.queued``: the reconciler's timer keeps it current without
    submits (admission control reads it only on a submit)."""
    reader = InMemoryMetricReader()
    metrics.bind(MeterProvider(metric_readers=[reader]))
    try:
        world = ReconcilerWorld()
        for _ in range(3):
            new_job(world.jobs, store=world.store)
        world.run()
        points = _points(reader)
    finally:
        metrics.queued_seen(0)
        metrics.bind(None)
    assert points[metrics.JOBS_QUEUED] == [({}, 3)]
