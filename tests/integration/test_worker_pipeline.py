"""The pipelined worker on real backends (PostgreSQL, Azurite, the Service Bus emulator through the real SDK): several
jobs in flight, their stages overlapping, and drains and forced shutdowns that settle exactly the jobs in flight.

The worker runs in this (main) thread (``gpu_worker.app.run``, signal handlers installed); its shutdowns are real
signals sent to this process. Overlap is shown by the order of events the stand-in analyzer and the instrumented
blob store record, never by speed: a stage of one job waits (with a bound on a hang) for an event of another's that
only a pipelined worker lets happen meanwhile. (The same, deterministic, on the fakes: tests/unit/
test_worker_pipeline.py.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from gpu_worker import app
from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from gpu_worker.app import run
from shared.db import PostgresJobStore
from shared.jobs import Job, JobStatus
from shared.storage import BlobStore
from tests.integration.worker_helpers import DATA, FIELDS, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT = 30.0  # seconds: a bound on a hang, never a speed claim

Event = tuple[str, UUID]


class Recorder:
    """What happened, in order (from any thread), and hooks run at a stage of a given job."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.hooks: dict[Event, Callable[[], object]] = {}

    def record(self, what: str, job_id: UUID) -> None:
        self.events.append((what, job_id))

    def hook(self, what: str, job_id: UUID) -> None:
        if (hook := self.hooks.get((what, job_id))) is not None:
            hook()

    def until(self, what: str, job_id: UUID) -> None:
        deadline = time.monotonic() + WAIT
        while (what, job_id) not in self.events:
            assert time.monotonic() < deadline, f"{what} {job_id} never happened: {self.events}"
            time.sleep(0.01)

    def before(self, first: Event, then: Event) -> bool:
        return self.events.index(first) < self.events.index(then)


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The worker's blob store, instrumented: downloads and uploads recorded, an upload's hook run before it."""
    recorder = Recorder()

    class Recording(BlobStore):
        def download_input(self, blob_name: str, path: Path) -> None:
            super().download_input(blob_name, path)
            recorder.record("downloaded", UUID(blob_name.split("/")[0]))

        def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
            recorder.hook("upload", job_id)
            url = super().put_result(job_id, attempt, name, path, content_type)
            recorder.record("uploaded", job_id)
            return url

    monkeypatch.setattr(app, "BlobStore", Recording)
    return recorder


class Analyzer:
    """Records each analysis' start and end and runs its hook in between (pure Python: a forced shutdown's signal
    handler interrupts it there); writes one output file."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.calls: list[UUID] = []

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        job_id = UUID(image_path.parent.name.removeprefix("crop-ai-")[:36])  # the work directory names the job
        self.calls.append(job_id)
        request.progress("decode", 0.0)
        self.recorder.record("analyse", job_id)
        self.recorder.hook("analyse", job_id)
        out = workdir / "out.txt"
        out.write_text(f"analysed {job_id}")
        self.recorder.record("analysed", job_id)
        return AnalysisOutput(result={"analysis": request.analysis}, files={"out": (out, "text/plain")})


def _signal_self(times: int) -> None:
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGTERM)


def _drain_requested(caplog: pytest.LogCaptureFixture) -> None:
    deadline = time.monotonic() + WAIT
    while not any(getattr(r, "action", None) == "drain" for r in caplog.records):
        assert time.monotonic() < deadline, "the SIGTERM was not seen"
        time.sleep(0.01)


def _settled(caplog: pytest.LogCaptureFixture) -> list[tuple[str | None, str | None]]:
    """(action, message_id) of each message settled."""
    return [
        (getattr(r, "action", None), getattr(r, "message_id", None))
        for r in caplog.records
        if r.name == "gpu_worker.settle" and hasattr(r, "reason")
    ]


def test_the_next_download_and_the_last_upload_and_succeed_overlap_the_analysis(
    stack: WorkerStack, recorder: Recorder
) -> None:
    """Three in flight: while job 2 is analysed, job 1 is uploaded and its result stored, and job 3 downloaded."""
    j1, j2, j3 = (stack.submit(FIELDS.read_bytes()) for _ in range(3))
    recorder.hooks[("upload", j1)] = lambda: recorder.until("analyse", j2)  # finishing 1 only once 2 is analysed

    def while_two_is_analysed() -> None:
        recorder.until("downloaded", j3)
        deadline = time.monotonic() + WAIT
        while stack.job(j1).status is not JobStatus.SUCCEEDED:
            assert time.monotonic() < deadline, "job 1 was not stored while job 2 was analysed"
            time.sleep(0.01)
        recorder.record("saw succeeded", j1)

    recorder.hooks[("analyse", j2)] = while_two_is_analysed
    analyzer = Analyzer(recorder)
    run(stack.settings(WORKER_JOBS_IN_FLIGHT="3"), analyzer=analyzer, max_jobs=3)

    assert [(stack.job(j).status, stack.job(j).attempts) for j in (j1, j2, j3)] == [(JobStatus.SUCCEEDED, 1)] * 3
    assert analyzer.calls == [j1, j2, j3]
    # Each of these is impossible one message at a time (the next is received once the last is settled):
    assert recorder.before(("analyse", j2), ("uploaded", j1)), recorder.events
    assert recorder.before(("saw succeeded", j1), ("analysed", j2)), recorder.events
    assert recorder.before(("downloaded", j3), ("analysed", j2)), recorder.events
    starts_and_ends = [e for e in recorder.events if e[0] in {"analyse", "analysed"}]
    assert starts_and_ends == [(what, j) for j in (j1, j2, j3) for what in ("analyse", "analysed")]  # one at a time
    assert (stack.queued(), stack.dead_letters()) == ([], [])


def test_a_job_that_fails_in_prepare_is_settled_while_another_is_analysed(
    stack: WorkerStack, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    j1 = stack.submit(FIELDS.read_bytes())
    missing = stack.submit(None)  # its image was never stored: InputMissing at the download

    def until_the_other_is_failed() -> None:
        deadline = time.monotonic() + WAIT
        while stack.job(missing).status is not JobStatus.FAILED:
            assert time.monotonic() < deadline, "the failing job was not settled while job 1 was analysed"
            time.sleep(0.01)

    recorder.hooks[("analyse", j1)] = until_the_other_is_failed
    with caplog.at_level(logging.INFO):
        run(stack.settings(WORKER_JOBS_IN_FLIGHT="2"), analyzer=Analyzer(recorder), max_jobs=2)
    assert (stack.job(j1).status, stack.job(j1).attempts) == (JobStatus.SUCCEEDED, 1)
    failed = stack.job(missing)
    assert (failed.status, failed.error_code, failed.attempts) == (JobStatus.FAILED, "input_missing", 1)
    [dead] = stack.dead_letters()
    assert (dead.message_id, dead.dead_letter_reason, dead.delivery_count) == (f"{missing}:1", "InputMissing", 0)
    assert _settled(caplog) == [("dead_letter", f"{missing}:1"), ("complete", f"{j1}:1")]
    assert stack.queued() == []


def test_a_drain_with_jobs_in_flight_settles_each_of_them_once_and_leaves_the_rest_queued(
    stack: WorkerStack, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while job 1 is analysed and jobs 2 and 3 are prepared: all three are run and settled, once each; job 4
    was never received."""
    j1, j2, j3, j4 = (stack.submit(FIELDS.read_bytes()) for _ in range(4))

    def sigterm_with_three_in_hand() -> None:
        recorder.until("downloaded", j3)
        _signal_self(1)
        _drain_requested(caplog)

    recorder.hooks[("analyse", j1)] = sigterm_with_three_in_hand
    analyzer = Analyzer(recorder)
    with caplog.at_level(logging.INFO):
        assert run(stack.settings(WORKER_JOBS_IN_FLIGHT="3", WORKER_SHUTDOWN_GRACE="60"), analyzer=analyzer) == 0
    assert [(stack.job(j).status, stack.job(j).attempts) for j in (j1, j2, j3)] == [(JobStatus.SUCCEEDED, 1)] * 3
    assert analyzer.calls == [j1, j2, j3]  # none run twice
    assert sorted(_settled(caplog)) == sorted(("complete", f"{j}:1") for j in (j1, j2, j3))  # each settled once
    waiting = stack.job(j4)
    assert (waiting.status, waiting.attempts) == (JobStatus.QUEUED, 0)
    [message] = stack.queued()
    assert (message.message_id, message.delivery_count) == (f"{j4}:1", 0)  # never received: no delivery spent
    assert stack.dead_letters() == []


def test_a_forced_shutdown_releases_the_analysed_and_prepared_jobs_uncharged_and_the_next_worker_runs_them(
    stack: WorkerStack, recorder: Recorder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1 is storing its result (uploaded, past its last checkpoint), job 2 analysed, job 3 prepared, when a
    second SIGTERM forces the shutdown: job 1's result and settlement complete; jobs 2 and 3 are released uncharged,
    their next generation sent at once; job 4 was never received. The next worker runs 2, 3 and 4. (An upload still
    under way would stop at its next check, within ``POLL``, and be released too.)"""
    j1, j2, j3, j4 = (stack.submit(FIELDS.read_bytes()) for _ in range(4))
    forced = threading.Event()

    class Holding(PostgresJobStore):
        def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> Job | None:
            if job_id == j1:
                recorder.record("storing", j1)
                forced.wait(WAIT)
            return super().succeed(job_id, attempt, result)

    monkeypatch.setattr(app, "PostgresJobStore", Holding)

    def force_while_analysing() -> None:
        recorder.until("downloaded", j3)
        recorder.until("storing", j1)
        _signal_self(2)
        forced.set()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # the analysis: interrupted in here
            time.sleep(0.01)
        pytest.fail("the analysis was not interrupted")

    recorder.hooks[("analyse", j2)] = force_while_analysing
    with caplog.at_level(logging.INFO):
        run(stack.settings(WORKER_JOBS_IN_FLIGHT="3", WORKER_SHUTDOWN_GRACE="60"), analyzer=Analyzer(recorder))
    assert "shutdown forced" in caplog.text
    assert (stack.job(j1).status, stack.job(j1).attempts) == (JobStatus.SUCCEEDED, 1)
    for j in (j2, j3):
        job = stack.job(j)
        assert (job.status, job.generation, job.attempts, job.drains, job.charged) == (JobStatus.QUEUED, 2, 1, 1, 0)
    assert (stack.job(j4).status, stack.job(j4).attempts) == (JobStatus.QUEUED, 0)
    assert sorted((m.message_id, m.delivery_count) for m in stack.queued()) == sorted(
        [(f"{j2}:2", 0), (f"{j3}:2", 0), (f"{j4}:1", 0)]
    )
    assert sorted(_settled(caplog)) == sorted(("complete", f"{j}:1") for j in (j1, j2, j3))

    recorder.hooks.clear()
    run(stack.settings(), analyzer=Analyzer(recorder), max_jobs=3)  # the next worker
    assert [(stack.job(j).status, stack.job(j).attempts) for j in (j2, j3, j4)] == [
        (JobStatus.SUCCEEDED, 2), (JobStatus.SUCCEEDED, 2), (JobStatus.SUCCEEDED, 1),
    ]  # fmt: skip
    assert (stack.queued(), stack.dead_letters()) == ([], [])


L1C = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def test_two_analyses_at_once_share_the_cover_batches_and_give_the_results_of_one_at_a_time(
    stack: WorkerStack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real analysis (torch, on the CPU) with WORKER_ANALYSES 2 and ANALYSIS_BATCHING (the CUDA path): the two
    scenes' cover MLP rows travel in shared batches, and each job's result is the one a worker analysing one job at
    a time, unbatched, stores. A cover batch waits up to 3 s for rows (instead of 5 ms), so that sharing does not
    depend on timing (the second scene's rows come a fraction of a second after the first's): the two scenes are one
    window each, and a batch with rows of two requests holds both."""
    monkeypatch.setattr("gpu_worker.analysis.crop_health.COVER_MAX_WAIT", 3.0)
    scenes = [DATA / "s2_l1c_fields_256.tif", DATA / "s2_l1c_coast_256.tif"]
    batched = [stack.submit(scene.read_bytes(), bands=L1C) for scene in scenes]
    with caplog.at_level(logging.DEBUG, logger="gpu_worker.analysis.batcher"):
        run(stack.settings(WORKER_DEVICE="cpu", WORKER_JOBS_IN_FLIGHT="2", WORKER_ANALYSES="2",
                           ANALYSIS_BATCHING="true"), max_jobs=2)  # fmt: skip
    shared = [r for r in caplog.records if getattr(r, "requests", 0) >= 2]
    assert shared, [getattr(r, "requests", None) for r in caplog.records if r.name == "gpu_worker.analysis.batcher"]

    one_at_a_time = [stack.submit(scene.read_bytes(), bands=L1C) for scene in scenes]
    run(stack.settings(WORKER_DEVICE="cpu", WORKER_JOBS_IN_FLIGHT="1", ANALYSIS_BATCHING="false"), max_jobs=2)
    for got, expected in zip(batched, one_at_a_time, strict=True):
        result, reference = stack.job(got).result, stack.job(expected).result
        assert stack.job(got).status is stack.job(expected).status is JobStatus.SUCCEEDED
        assert result is not None
        assert reference is not None
        assert reference["cover"] is not None
        # Rows in a GEMM of fewer than 12 round differently by up to one float32 ulp (gpu_worker/analysis/batcher.py).
        assert result["cover"] == pytest.approx(reference["cover"], rel=1e-9)
        assert {k: v for k, v in result.items() if k not in {"cover", "outputs"}} == {
            k: v for k, v in reference.items() if k not in {"cover", "outputs"}
        }
    assert (stack.queued(), stack.dead_letters()) == ([], [])


class Stubborn:
    """Both analyses start, then the first one's forces the shutdown; each then reports progress until it is stopped:
    by the signal in the main thread, at its next report (its checkpoint) in the other computing thread."""

    def __init__(self, recorder: Recorder, drain_seen: Callable[[], None]) -> None:
        self.recorder = recorder
        self.drain_seen = drain_seen
        self.both = threading.Barrier(2, timeout=WAIT)
        self.threads: dict[UUID, bool] = {}

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        job_id = UUID(image_path.parent.name.removeprefix("crop-ai-")[:36])
        self.threads[job_id] = threading.current_thread() is threading.main_thread()
        self.recorder.record("analyse", job_id)
        if self.both.wait() == 0:  # two signals, one after the other: sent at once they may arrive as one
            _signal_self(1)
            self.drain_seen()
            _signal_self(1)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            request.progress("indices", 0.5)
            time.sleep(0.01)
        pytest.fail("the analysis was not interrupted")


def test_a_forced_shutdown_with_two_analyses_at_once_releases_both_uncharged_and_the_next_worker_runs_them(
    stack: WorkerStack, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """WORKER_ANALYSES=2: two jobs analysed at once when a second SIGTERM forces the shutdown. The one in the main
    thread is interrupted by the signal, the other at its next progress report; both are released uncharged, their
    next generation sent at once, and the next worker runs them."""
    j1, j2 = (stack.submit(FIELDS.read_bytes()) for _ in range(2))
    analyzer = Stubborn(recorder, lambda: _drain_requested(caplog))
    with caplog.at_level(logging.INFO):
        run(stack.settings(WORKER_JOBS_IN_FLIGHT="2", WORKER_ANALYSES="2", WORKER_SHUTDOWN_GRACE="60"),
            analyzer=analyzer)  # fmt: skip
    assert "shutdown forced" in caplog.text
    assert sorted(analyzer.threads.values()) == [False, True]  # one in the main thread, one in another
    for j in (j1, j2):
        job = stack.job(j)
        assert (job.status, job.generation, job.attempts, job.drains, job.charged) == (JobStatus.QUEUED, 2, 1, 1, 0)
    assert sorted((m.message_id, m.delivery_count) for m in stack.queued()) == sorted([(f"{j1}:2", 0), (f"{j2}:2", 0)])
    assert sorted(_settled(caplog)) == sorted(("complete", f"{j}:1") for j in (j1, j2))

    run(stack.settings(), analyzer=Analyzer(recorder), max_jobs=2)  # the next worker
    assert [(stack.job(j).status, stack.job(j).attempts) for j in (j1, j2)] == [(JobStatus.SUCCEEDED, 2)] * 2
    assert (stack.queued(), stack.dead_letters()) == ([], [])
