"""The worker's side of the job API on real backends (PostgreSQL, Azurite, the Service Bus emulator through the real
SDK): progress, cancellation of a running job, priorities, and the worker's row in ``workers``.

The worker runs in this (main) thread (``gpu_worker.app.run``, the wiring of ``python -m gpu_worker``: its signal
handlers need the main thread); what a client does meanwhile (poll the job, cancel it, submit more) runs in a
background thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from gpu_worker import app
from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from gpu_worker.app import run
from gpu_worker.inbox import PriorityInbox, link_of
from gpu_worker.locks import LostLocks
from shared.bus import JobPublisher
from shared.jobs import Callback, Job, JobStatus, Priority
from shared.storage import BlobStore
from tests.integration.worker_helpers import FIELDS, SlowAnalyzer, StackFactory, WorkerStack
from tests.integration.worker_helpers import stack_factory as stack_factory

pytestmark = pytest.mark.integration

WAIT = 30.0  # seconds: a bound on a hang, never a speed claim


@pytest.fixture
def stack(stack_factory: StackFactory) -> WorkerStack:
    return stack_factory()


@contextmanager
def meanwhile(client: Callable[[], object]) -> Iterator[None]:
    """Run ``client`` in a thread while the block runs; re-raise what it raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            client()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name="client", daemon=True)
    thread.start()
    yield
    thread.join(WAIT)
    assert not thread.is_alive(), "the client thread hung"
    if errors:
        raise errors[0]


def until(stack: WorkerStack, job_id: UUID, ready: Callable[[Job], bool]) -> Job:
    deadline = time.monotonic() + WAIT
    while not ready(job := stack.job(job_id)):
        assert time.monotonic() < deadline, f"job {job_id} never got there: {job}"
        time.sleep(0.02)
    return job


class Client:
    """Submits jobs as the API does (the row, the send, its confirmation) on long-lived senders (opening a sender
    costs the emulator about a second). While a worker runs, it may claim a job before its send is confirmed: the
    claim marks it sent, and the confirmation then moves nothing, which is fine."""

    def __init__(self, stack: WorkerStack) -> None:
        self.stack = stack
        self.publisher = JobPublisher(stack.client, stack.queues)  # its senders close with the stack's client

    def submit(self, priority: Priority = "normal", callback: Callback | None = None) -> UUID:
        message = self.stack.create_job(FIELDS.read_bytes(), priority=priority, callback=callback)
        self.publisher.send(message)
        self.stack.jobs.confirm_sent(message.job_id, message.generation)
        return message.job_id


def _actions(caplog: pytest.LogCaptureFixture) -> list[tuple[str | None, str | None]]:
    return [
        (getattr(r, "action", None), getattr(r, "reason", None))
        for r in caplog.records
        if r.name == "gpu_worker.settle" and hasattr(r, "reason")
    ]


def _events(stack: WorkerStack, job_id: UUID) -> list[tuple[str, str | None]]:
    """The job's webhook outbox rows: (type, progress stage)."""
    with stack.pool.connection() as conn:
        rows = conn.execute(
            "SELECT type, payload->'progress'->>'stage' FROM job_events WHERE job_id = %s ORDER BY created_at",
            (job_id,),
        ).fetchall()
    return [(kind, stage) for kind, stage in rows]


def test_progress_is_visible_while_a_slow_job_runs_and_its_writes_are_throttled(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    callback = Callback(url="https://example.com/hook", events=["progress", "completed"], secret="s" * 32)
    message = stack.create_job(FIELDS.read_bytes(), callback=callback)
    stack.send(message)
    seen: list[dict[str, Any]] = []

    def poll() -> None:  # a client polling GET /api/jobs/{id}
        job = until(stack, message.job_id, lambda j: j.status is not JobStatus.QUEUED)
        while not job.status.terminal:
            if job.progress is not None and job.progress not in seen:
                seen.append(job.progress)
            time.sleep(0.05)
            job = stack.job(message.job_id)

    with meanwhile(poll), caplog.at_level(logging.DEBUG, logger="gpu_worker.progress"):
        run(stack.settings(), analyzer=SlowAnalyzer(3.0), max_jobs=1)

    assert stack.job(message.job_id).status is JobStatus.SUCCEEDED
    writes = [r for r in caplog.records if getattr(r, "action", None) == "progress"]
    new_stages = [getattr(r, "stage", None) for r in writes if getattr(r, "notify", False)]
    # Nothing in the first second after the claim (gpu_worker.progress): download and decode are over by then on a
    # machine that is not too busy; the 3 s of indices and the upload are always written.
    assert new_stages[-2:] == ["indices", "upload"]
    assert set(new_stages) <= {"download", "decode", "indices", "upload"}
    indices = [p for p in seen if p["stage"] == "indices"]
    assert len(indices) >= 2  # the client saw it move
    # Reported every 50 ms, written at most once a second: the rows the client read are an interval apart (a slower
    # machine only widens the gaps; the margin covers the throttle's clock read to the row's updated_at).
    written = [datetime.fromisoformat(p["updated_at"]) for p in indices]
    assert all((later - earlier).total_seconds() >= 0.9 for earlier, later in itertools.pairwise(written))
    assert [p["fraction"] for p in indices] == sorted(p["fraction"] for p in indices)
    assert all(datetime.fromisoformat(p["updated_at"]).utcoffset() is not None for p in seen)
    # Only a stage's first write notifies: one job.progress event per stage written, in the outbox with the
    # transitions.
    assert _events(stack, message.job_id) == [("job.progress", stage) for stage in new_stages] + [
        ("job.succeeded", "upload")
    ]


def test_a_long_step_without_reports_shows_its_stage_after_a_second(stack: WorkerStack) -> None:
    """The analysis reports decode once, then runs 3 s without a report (a model's COG build, say): the report, kept
    because it was not due, is written by the attempt guard's thread once it is (gpu_worker.progress), while the
    step still runs."""
    message = stack.create_job(FIELDS.read_bytes())
    stack.send(message)
    seen: list[tuple[JobStatus, str | None]] = []

    def poll() -> None:
        job = until(stack, message.job_id, lambda j: j.status is not JobStatus.QUEUED)
        while not job.status.terminal:
            seen.append((job.status, job.progress["stage"] if job.progress is not None else None))
            time.sleep(0.05)
            job = stack.job(message.job_id)

    with meanwhile(poll):
        run(stack.settings(), analyzer=SlowAnalyzer(3.0, stubborn=True), max_jobs=1)
    assert stack.job(message.job_id).status is JobStatus.SUCCEEDED
    assert (JobStatus.RUNNING, "decode") in seen  # written while nothing reported
    assert seen.index((JobStatus.RUNNING, "decode")) < len(seen) - 5  # well before the end (polled every 50 ms)


def test_cancel_of_a_running_job_on_a_slow_analysis_stops_at_its_next_checkpoint(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture
) -> None:
    """(The cancel-to-stop latency is bench/worker_latency.py's.)"""
    job_id = stack.submit(FIELDS.read_bytes())
    analyzer = SlowAnalyzer(60)
    requested: list[float] = []  # time.time(), the clock of the log records

    def cancel() -> None:  # DELETE /api/jobs/{id} while the analysis runs
        until(stack, job_id, lambda j: j.progress is not None and j.progress["stage"] == "indices")
        assert stack.jobs.request_cancel(job_id) is not None
        requested.append(time.time())

    with (
        meanwhile(cancel),
        caplog.at_level(logging.INFO),
        caplog.at_level(logging.DEBUG, logger="gpu_worker.progress"),
    ):
        run(stack.settings(), analyzer=analyzer, max_jobs=1)

    job = stack.job(job_id)
    assert (job.status, job.result, job.error_code, analyzer.finished) == (JobStatus.CANCELLED, None, None, 0)
    assert job.finished_at is not None
    assert job.cancel_requested_at is not None
    # Stopped at a checkpoint: of the progress writes (one a second) after the request, at most the one in flight as
    # it came and the next, which saw it (unless a lease renewal saw it first).
    actions = [(getattr(r, "action", None), r.created) for r in caplog.records]
    assert len([at for action, at in actions if action == "progress" and at >= requested[0]]) <= 2
    assert [action for action, _ in actions].count("cancel_seen") == 1
    assert stack.results(job_id) == set()  # nothing published
    assert (stack.queued(), stack.dead_letters()) == ([], [])  # the message was completed: the worker moved on
    assert ("complete", "Cancelled") in _actions(caplog)


class Files:
    """Two small output files, like a real analysis' COG and quicklook."""

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        request.progress("decode", 0.0)
        files = {}
        for name in ("ndvi.tif", "quicklook.png"):
            (workdir / name).write_bytes(b"output " + name.encode())
            files[name.split(".")[0]] = (workdir / name, "application/octet-stream")
        return AnalysisOutput(result={"analysis": request.analysis}, files=files)


def test_a_cancel_racing_the_success_stores_no_result_and_deletes_the_uploaded_outputs(
    stack: WorkerStack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands while the last file uploads, after the last checkpoint: ``succeed`` is refused, the worker
    re-reads the job, sees the cancellation, deletes the attempt's files and stops it."""
    job_id = stack.submit(FIELDS.read_bytes())

    class CancelDuringTheLastUpload(BlobStore):
        def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
            url = super().put_result(job_id, attempt, name, path, content_type)
            if name == "quicklook.png":
                assert stack.jobs.request_cancel(job_id) is not None
            return url

    monkeypatch.setattr(app, "BlobStore", CancelDuringTheLastUpload)  # the real store, instrumented
    with caplog.at_level(logging.INFO):
        run(stack.settings(), analyzer=Files(), max_jobs=1)
    job = stack.job(job_id)
    assert (job.status, job.result) == (JobStatus.CANCELLED, None)
    assert stack.results(job_id) == set()  # uploaded, then deleted
    assert any(getattr(r, "action", None) == "discard_outputs" for r in caplog.records)
    assert (stack.queued(), stack.dead_letters()) == ([], [])
    assert ("complete", "Cancelled") in _actions(caplog)


def _started_order(stack: WorkerStack, ids: list[UUID]) -> list[UUID]:
    jobs = [stack.job(i) for i in ids]
    assert all(j.status is JobStatus.SUCCEEDED and j.started_at is not None for j in jobs)
    return [j.job_id for j in sorted(jobs, key=lambda j: j.started_at or datetime.min.replace(tzinfo=UTC))]


class FirstSlow(SlowAnalyzer):
    """The first job takes ``first`` seconds (time for the client to submit more meanwhile), the others ``seconds``."""

    def __init__(self, first: float, seconds: float) -> None:
        super().__init__(seconds)
        self.first = first

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        self.seconds, before = (self.first if self.calls == 0 else self.seconds), self.seconds
        try:
            return super().analyse(image_path, request, workdir)
        finally:
            self.seconds = before


def test_high_priority_overtakes_a_normal_backlog(stack: WorkerStack) -> None:
    client = Client(stack)
    normal = [client.submit() for _ in range(6)]
    high: list[UUID] = []

    def submit_high() -> None:  # while the first normal job runs
        until(stack, normal[0], lambda j: j.status is JobStatus.RUNNING)
        high.extend(client.submit("high") for _ in range(2))

    # One job in flight: a worker holding more would have received the next normal job while the first ran, before
    # the high-priority ones came (the pipeline's trade-off, gpu_worker/pipeline.py).
    with meanwhile(submit_high):
        run(stack.settings(WORKER_JOBS_IN_FLIGHT="1"), analyzer=FirstSlow(1.5, 0.1), max_jobs=8)
    order = _started_order(stack, normal + high)
    assert order[0] == normal[0]
    assert set(order[1:3]) == set(high)  # before the 5 normal jobs that were waiting longer
    assert order[3:] == normal[1:]  # and those in their order


def test_a_steady_high_priority_stream_does_not_starve_normal_jobs(stack: WorkerStack) -> None:
    client = Client(stack)
    normal = [client.submit() for _ in range(2)]
    high = [client.submit("high") for _ in range(6)]
    run(stack.settings(WORKER_HIGH_PRIORITY_BURST="2"), analyzer=SlowAnalyzer(0), max_jobs=8)
    order = _started_order(stack, normal + high)
    kinds = ["high" if i in high else "normal" for i in order]
    assert kinds == ["high", "high", "normal"] * 2 + ["high", "high"]  # a normal job every burst + 1 jobs


class UntilReleased:
    """Runs until ``release`` is set (at most ``WAIT``), reporting progress meanwhile (each report a checkpoint);
    ``released``: whether the release, not the limit, ended it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.released = False

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        request.progress("decode", 0.0)
        deadline = time.monotonic() + WAIT
        while not (released := self.release.wait(0.05)) and time.monotonic() < deadline:
            request.progress("indices", 0.5)
        self.released = released
        return AnalysisOutput(result={"analysis": request.analysis})


def _rows(stack: WorkerStack) -> list[dict[str, Any]]:
    with stack.pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT worker_id, host, device, current_job, started_at, last_beat FROM workers")
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _row_where(stack: WorkerStack, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while not (rows := [r for r in _rows(stack) if match(r)]):
        assert time.monotonic() < deadline, f"no such row in workers: {_rows(stack)}"
        time.sleep(0.02)
    [row] = rows
    return row


def test_the_worker_row_names_the_job_in_hand_and_goes_on_exit_and_an_idle_worker_takes_high_priority(
    stack: WorkerStack,
) -> None:
    """(How soon an idle worker picks a job up: bench/worker_latency.py; the idle waits it is bounded by:
    tests/unit/test_worker_inbox.py.)"""
    seen: dict[str, Any] = {}
    client = Client(stack)
    first = client.submit("high")  # a first job, which also opens the client's sender to jobs-high

    def watch() -> None:
        busy_first = _row_where(stack, lambda r: r["current_job"] == first)
        until(stack, first, lambda j: j.status.terminal)
        seen["idle"] = _row_where(stack, lambda r: r["current_job"] is None)
        time.sleep(1.0)  # the worker idles, polling both queues
        job_id = client.submit("high")
        until(stack, job_id, lambda j: j.started_at is not None)
        seen["busy"] = _row_where(stack, lambda r: r["current_job"] == job_id)
        seen["ids"] = (busy_first["worker_id"], job_id)

    with meanwhile(watch):
        run(stack.settings(WORKER_REGISTRY_INTERVAL="0.5"), analyzer=SlowAnalyzer(0.5), max_jobs=2)
    idle, busy, (worker_id, job_id) = seen["idle"], seen["busy"], seen["ids"]
    assert (idle["worker_id"], idle["device"], busy["worker_id"], busy["current_job"]) == (
        worker_id, "cpu", worker_id, job_id,
    )  # fmt: skip
    assert worker_id.startswith(idle["host"] + ":")
    assert busy["last_beat"] > idle["last_beat"]
    assert _rows(stack) == []  # a clean exit deletes the row


def test_a_busy_worker_holds_no_message_of_the_other_queue(stack: WorkerStack) -> None:
    """While the worker runs a normal job, a high-priority message that arrives stays available to other workers:
    the credit the worker's empty receive on jobs-high left with the broker was taken back, so the broker does not
    lock the message into this worker's buffer (where nobody could take it until its lock ran out)."""
    client = Client(stack)
    normal = client.submit()
    analyzer = UntilReleased()

    def another_worker() -> None:
        try:
            until(stack, normal, lambda j: j.status is JobStatus.RUNNING)
            client.submit("high")
            with stack.client.get_queue_receiver(stack.queues["high"]) as receiver:
                messages = receiver.receive_messages(max_message_count=1, max_wait_time=5)
                for message in messages:
                    receiver.abandon_message(message)  # left for the queue; this test's worker has exited by then
            assert messages, "the high-priority message was locked away in the busy worker's buffer"
        finally:
            analyzer.release.set()  # only now may the busy worker's job end (and its links close)

    with meanwhile(another_worker):
        run(stack.settings(), analyzer=analyzer, max_jobs=1)
    assert (stack.job(normal).status, analyzer.released) == (JobStatus.SUCCEEDED, True)


def test_the_installed_sdk_has_the_link_whose_credit_the_inbox_takes_back(stack: WorkerStack) -> None:
    """The SDK has no public call to take back link credit: the inbox reaches ``receiver._handler._link``. On the
    installed azure-servicebus an open receiver has that link, an empty receive leaves credit on it, and the inbox
    takes the credit back. A new SDK version that moves these internals fails here."""
    with stack.client.get_queue_receiver(stack.queues["high"]) as receiver:
        inbox = PriorityInbox(receiver, receiver, burst=1, wait=0.1, locks=LostLocks())
        assert receiver.receive_messages(max_message_count=1, max_wait_time=0.1) == []
        link = link_of(receiver)
        assert link is not None, f"azure-servicebus {version('azure-servicebus')} has no receiver._handler._link"
        assert link.current_link_credit > 0  # what the empty receive left with the broker
        assert inbox.receive() is None
        assert link_of(receiver) is link
        assert link.current_link_credit == 0  # type: ignore[union-attr]
