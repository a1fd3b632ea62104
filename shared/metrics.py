"""Every OpenTelemetry metric of the API and the worker: its name, unit, dimensions, and a typed function to record it.

The names here are what the workbook (``infra/bicep/modules/workbook.json``) and the log alerts
(``infra/bicep/modules/alerts.bicep``) query in Application Insights (``customMetrics``: ``name``, ``value``,
``valueSum``, ``valueCount``, ``valueMin``, ``valueMax``, ``customDimensions``); ``tests/unit/test_metrics.py``
fails when a query names a metric, a dimension or a span attribute that no code emits. docs/monitoring.md has the
table.

The Azure Monitor exporter sends a histogram as one row per interval (sum, count, min, max: no buckets), so a p95
cannot come from ``customMetrics``. Percentiles come from the per-job span instead (``process job``, a consumer span,
which Application Insights stores in ``requests``, one row per job, with the :data:`SPAN_ATTRIBUTES` as
``customDimensions``).

The meter provider is the process's (:func:`shared.telemetry.configure_telemetry`); until it is set the instruments
are the API's proxies, which record nothing. :func:`bind` puts them on another provider (a test's in-memory reader).
Observable gauges report what the sources registered with :func:`watch` return at each collection; a source that
returns ``None`` (or none registered: a worker without CUDA has no GPU source) reports nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from opentelemetry import metrics as otel
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

METER = "crop_ai"

# name                                          instrument        unit   dimensions
JOBS_SUBMITTED = "crop_ai.jobs.submitted"  # Counter          {job}  analysis, priority (API)
JOBS_QUEUED = "crop_ai.jobs.queued"  # ObservableGauge  {job}  - (API: the backlog admission control last read)
JOBS_COMPLETED = "crop_ai.jobs.completed"  # Counter     {job}  analysis, priority, worker, device, outcome, code
JOBS_IN_FLIGHT = "crop_ai.jobs.in_flight"  # UpDownCounter  {job}  analysis, priority, worker, device
RUN_DURATION = "crop_ai.job.run_duration"  # Histogram    s      analysis, priority, worker, device, outcome
QUEUE_WAIT = "crop_ai.job.queue_wait"  # Histogram        s      analysis, priority, worker, device
STAGE_DURATION = "crop_ai.job.stage_duration"  # Histogram  s    analysis, priority, worker, device, stage
WORKER_HEARTBEAT = "crop_ai.worker.heartbeat"  # ObservableGauge  1  worker, device (1 healthy, 0 not)
GPU_UTILIZATION = "crop_ai.gpu.utilization"  # ObservableGauge  %  worker, device (NVML)
GPU_MEMORY_ALLOCATED = "crop_ai.gpu.memory.allocated"  # ObservableGauge  By  worker, device (torch)
GPU_MEMORY_RESERVED = "crop_ai.gpu.memory.reserved"  # ObservableGauge  By  worker, device (torch)

STAGES = ("download", "analysis", "upload", "settle")
OUTCOMES = ("succeeded", "failed", "cancelled", "retried", "released", "lost", "abandoned")

# The per-job span's attributes (``requests.customDimensions`` in Application Insights): the p50/p95 source.
JOB_SPAN = "process job"
SPAN_ANALYSIS = "crop_ai.analysis"
SPAN_PRIORITY = "crop_ai.priority"
SPAN_WORKER = "crop_ai.worker"
SPAN_DEVICE = "crop_ai.device"
SPAN_OUTCOME = "crop_ai.outcome"
SPAN_CODE = "crop_ai.code"
SPAN_RUN = "crop_ai.run_s"  # seconds from the claim to the settlement (as RUN_DURATION)
SPAN_QUEUE_WAIT = "crop_ai.queue_wait_s"  # seconds from the submit to the first claim (as QUEUE_WAIT)
SPAN_JOB_ID = "crop_ai.job_id"

_SECONDS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]  # bucket bounds (a plain SDK)
QUEUED_STALE_AFTER = 300.0  # seconds: a backlog read longer ago than this is no longer reported


@dataclass(frozen=True)
class JobLabels:
    """The dimensions every job metric of the worker carries."""

    analysis: str
    priority: str
    worker: str
    device: str

    def attributes(self, **more: str) -> dict[str, str]:
        return {**asdict(self), **more}

    def span_attributes(self) -> dict[str, str]:
        return {SPAN_ANALYSIS: self.analysis, SPAN_PRIORITY: self.priority, SPAN_WORKER: self.worker,
                SPAN_DEVICE: self.device}  # fmt: skip


Source = Callable[[], float | None]


class _Instruments:
    def __init__(self, meter: Meter) -> None:
        self.submitted = meter.create_counter(JOBS_SUBMITTED, "{job}", "jobs created by a submit")
        self.completed = meter.create_counter(JOBS_COMPLETED, "{job}", "claimed attempts settled, by outcome")
        self.in_flight = meter.create_up_down_counter(JOBS_IN_FLIGHT, "{job}", "claimed attempts not yet settled")
        self.run = meter.create_histogram(RUN_DURATION, "s", "claim to settlement",
                                          explicit_bucket_boundaries_advisory=_SECONDS)  # fmt: skip
        self.wait = meter.create_histogram(QUEUE_WAIT, "s", "submit to first claim",
                                           explicit_bucket_boundaries_advisory=_SECONDS)  # fmt: skip
        self.stage = meter.create_histogram(STAGE_DURATION, "s", "one stage of an attempt",
                                            explicit_bucket_boundaries_advisory=_SECONDS)  # fmt: skip
        for name, unit, description in (
            (JOBS_QUEUED, "{job}", "queued jobs, as admission control last read them"),
            (WORKER_HEARTBEAT, "1", "1 while the worker's heartbeat is healthy, else 0"),
            (GPU_UTILIZATION, "%", "GPU utilisation (NVML)"),
            (GPU_MEMORY_ALLOCATED, "By", "GPU memory held by tensors"),
            (GPU_MEMORY_RESERVED, "By", "GPU memory reserved by torch's caching allocator"),
        ):
            meter.create_observable_gauge(name, [_observer(name)], unit, description)


_lock = threading.Lock()
_instruments: _Instruments | None = None
_sources: dict[str, dict[int, tuple[Source, Mapping[str, str]]]] = {}
_next_id = 0


def _observer(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        with _lock:
            sources = list(_sources.get(name, {}).values())
        for source, attributes in sources:
            value = source()
            if value is not None:
                yield Observation(value, dict(attributes))

    return observe


def bind(provider: MeterProvider | None) -> None:
    """Record on ``provider`` from now on (``None``: the global one, as set by ``configure_telemetry``)."""
    global _instruments
    with _lock:
        _instruments = None if provider is None else _Instruments(provider.get_meter(METER))


def _get() -> _Instruments:
    global _instruments
    with _lock:
        if _instruments is None:
            _instruments = _Instruments(otel.get_meter(METER))
        return _instruments


def watch(name: str, source: Source, attributes: Mapping[str, str]) -> Callable[[], None]:
    """Report ``source()`` as the observable gauge ``name`` at each collection; returns the function that stops it."""
    global _next_id
    with _lock:
        _next_id += 1
        key = _next_id
        _sources.setdefault(name, {})[key] = (source, dict(attributes))

    def unwatch() -> None:
        with _lock:
            _sources.get(name, {}).pop(key, None)

    return unwatch


# API


def job_submitted(analysis: str, priority: str) -> None:
    _get().submitted.add(1, {"analysis": analysis, "priority": priority})


class _Queued:
    """The backlog the process last read, reported for :data:`QUEUED_STALE_AFTER` seconds (one per process)."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.at = 0.0

    def read(self) -> float | None:
        value = self.value
        return None if value is None or time.monotonic() - self.at > QUEUED_STALE_AFTER else float(value)


_queued = _Queued()
watch(JOBS_QUEUED, _queued.read, {})


def queued_seen(count: int) -> None:
    """The number of queued jobs, just read (admission control, :class:`shared.submission.BacklogGauge`)."""
    _queued.value, _queued.at = count, time.monotonic()


# Worker


def job_claimed(labels: JobLabels, queue_wait: float | None) -> None:
    """An attempt was claimed; ``queue_wait``: seconds since the submit, for a job's first attempt only."""
    instruments = _get()
    instruments.in_flight.add(1, labels.attributes())
    if queue_wait is not None:
        instruments.wait.record(max(queue_wait, 0.0), labels.attributes())


def stage_finished(labels: JobLabels, stage: str, seconds: float) -> None:
    _get().stage.record(seconds, labels.attributes(stage=stage))


def job_settled(labels: JobLabels, outcome: str, code: str, run: float) -> None:
    """A claimed attempt was settled (``outcome``: one of :data:`OUTCOMES`), ``run`` seconds after its claim."""
    instruments = _get()
    instruments.in_flight.add(-1, labels.attributes())
    instruments.completed.add(1, labels.attributes(outcome=outcome, code=code))
    instruments.run.record(run, labels.attributes(outcome=outcome))
