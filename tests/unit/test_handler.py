"""One claimed attempt through the job handler, on the in-memory job store and blob store, with real GeoTIFFs."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest
import torch

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer
from gpu_worker.attempt import AttemptGuard
from gpu_worker.handler import UPLOADS, JobHandler, Outcome, Reporter
from gpu_worker.handler import Checkpoint as HandlerCheckpoint
from gpu_worker.progress import STAGES, Progress
from gpu_worker.settlement import AttemptLost, Cancelled, Interrupted, TimedOut
from shared.errors import CropAIError, InputMissing, InvalidImage, StorageUnavailable
from shared.jobs import Job, JobStatus
from tests.fakes import InMemoryJobStore, RecordingOutbox
from tests.jobs import GONE, LEASE, PARAMS, claimed, new_job

WAIT = 10.0  # seconds: a bound on a hang, never a speed claim
DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_rgbn_fields_128.tif"


class MemoryStore:
    """The handler's side of :class:`shared.storage.BlobStore`: inputs by blob name, results by attempt."""

    def __init__(self) -> None:
        self.inputs: dict[str, bytes] = {}
        self.results: dict[str, tuple[bytes, str]] = {}
        self.put_calls: list[tuple[UUID, int, str]] = []
        self.deleted: list[tuple[UUID, int]] = []
        self.failure: CropAIError | None = None
        self.after_put: Callable[[int], object] | None = None  # called with the put's number (1, 2, ...)
        self._lock = threading.Lock()

    def download_input(self, blob_name: str, path: Path) -> None:
        if self.failure is not None:
            raise self.failure
        if blob_name not in self.inputs:
            raise InputMissing(f"images/{blob_name} does not exist")
        path.write_bytes(self.inputs[blob_name])

    def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
        with self._lock:  # the handler uploads several at once
            self.put_calls.append((job_id, attempt, name))
            n = len(self.put_calls)
        url = f"memory://account/results/{job_id}/{attempt}/{name}"
        self.results[url] = (path.read_bytes(), content_type)
        if self.after_put is not None:
            self.after_put(n)
        return url

    def delete_results(self, job_id: UUID, attempt: int) -> int:
        self.deleted.append((job_id, attempt))
        prefix = f"memory://account/results/{job_id}/{attempt}/"
        gone = [url for url in self.results if url.startswith(prefix)]
        for url in gone:
            del self.results[url]
        return len(gone)


class StandInAnalyzer:
    """Same interface as :class:`gpu_worker.analysis.Analyzer`; writes ``files`` output files (one by default),
    counts its calls, and runs ``at_end`` (if any) as its last step, after its last progress report."""

    def __init__(self, files: int = 1) -> None:
        self.calls = 0
        self.files = files
        self.at_end: Callable[[], object] | None = None

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        self.calls += 1
        request.progress("decode", 0.0)
        quicklook = workdir / "quicklook.png"
        quicklook.write_bytes(b"\x89PNG stand-in")
        files = {"quicklook_png": (quicklook, "image/png")}
        for i in range(1, self.files):
            extra = workdir / f"extra{i}.tif"
            extra.write_bytes(b"II*\x00 stand-in")
            files[f"extra{i}"] = (extra, "image/tiff")
        if self.at_end is not None:
            self.at_end()
        return AnalysisOutput(result={"analysis": request.analysis, "bytes": image_path.stat().st_size}, files=files)


class Checkpoint:
    """Counts the handler's checks (each report to :class:`Stages` is one too); raises :class:`AttemptLost` at the
    ``lose_at``-th."""

    def __init__(self, lose_at: int | None = None) -> None:
        self.checks = 0
        self.lose_at = lose_at

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.lose_at:
            raise AttemptLost("taken over")


class Stages:
    """A reporter that records each report (and checks like the real one)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.reports: list[tuple[str, float]] = []

    def report(self, stage: str, fraction: float = 0.0) -> None:
        self.reports.append((stage, fraction))
        self.checkpoint.check()

    def first_seen(self) -> list[str]:
        return list(dict.fromkeys(stage for stage, _ in self.reports))


def run_stages(handler: JobHandler, job: Job, checkpoint: HandlerCheckpoint, progress: Reporter) -> Outcome:
    """The handler's three stages in a row, as the pipeline runs them (each in its own thread there); the work
    directory is removed at the end, as the consumer removes it after the settlement."""
    prepared = handler.prepare(job, checkpoint, progress)
    try:
        return handler.finish(job, handler.analyse(job, prepared, progress), checkpoint, progress)
    finally:
        prepared.close()


def run_attempt(handler: JobHandler, job: Job, checkpoint: Checkpoint | None = None) -> Outcome:
    """:func:`run_stages` with ``checkpoint`` (a fresh one by default) and a :class:`Stages` reporter checking it."""
    checkpoint = checkpoint or Checkpoint()
    return run_stages(handler, job, checkpoint, Stages(checkpoint))


def running_job(jobs: InMemoryJobStore, store: MemoryStore, data: bytes, *, bands: list[str] | None = None) -> Job:
    """A job whose image is stored, claimed (attempt 1)."""
    job = new_job(jobs, data, params={**PARAMS, "bands": bands or PARAMS["bands"]})
    store.inputs[job.input_blob] = data
    return claimed(jobs, job)


@pytest.fixture
def jobs() -> InMemoryJobStore:
    return InMemoryJobStore()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_real_analysis_of_a_real_geotiff_is_stored(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    handler = JobHandler(jobs, store, Analyzer(torch.device("cpu")))
    assert run_attempt(handler, job) is Outcome.SUCCEEDED
    done = jobs.get(job.job_id)
    assert done is not None
    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1)
    assert done.result is not None
    assert done.result["analysis"] == "crop-health"
    assert done.result["attempt"] == 1
    assert 0.0 < done.result["valid_fraction"] <= 1.0
    assert -1.0 <= done.result["indices"]["ndvi"]["mean"] <= 1.0
    assert done.result["outputs"]
    assert all(f"/results/{job.job_id}/1/" in url for url in done.result["outputs"].values())


def test_outputs_are_uploaded_under_the_attempt_and_the_result_names_it(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    first = running_job(jobs, store, FIELDS.read_bytes())
    released = jobs.release(first.job_id, first.attempts)  # a transient error: the next attempt is number 2
    assert released is not None
    job = claimed(jobs, released)
    assert job.attempts == 2
    checkpoint = Checkpoint()
    assert run_attempt(JobHandler(jobs, store, StandInAnalyzer()), job, checkpoint) is Outcome.SUCCEEDED
    assert store.put_calls == [(job.job_id, 2, "quicklook.png")]
    url = f"memory://account/results/{job.job_id}/2/quicklook.png"
    assert store.results == {url: (b"\x89PNG stand-in", "image/png")}
    done = jobs.get(job.job_id)
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == {
        "analysis": "crop-health",
        "bytes": FIELDS.stat().st_size,
        "attempt": 2,
        "outputs": {"quicklook_png": url},
    }
    assert checkpoint.checks == 5  # the download, before the analysis, its decode, the upload, before the upload


@pytest.mark.parametrize(
    ("lose_at", "analysed"),
    [(1, 0), (2, 0), (4, 1)],
    ids=["before-the-download", "before-the-analysis", "before-the-upload"],
)
def test_a_lost_attempt_stops_before_uploading_anything(
    jobs: InMemoryJobStore, store: MemoryStore, lose_at: int, analysed: int
) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    analyzer = StandInAnalyzer()
    with pytest.raises(AttemptLost):
        run_attempt(JobHandler(jobs, store, analyzer), job, Checkpoint(lose_at=lose_at))
    assert analyzer.calls == analysed
    assert store.put_calls == []
    assert jobs.get(job.job_id) == job  # untouched: settling is the consumer's


def test_a_succeed_refused_after_a_take_over_is_attempt_lost_and_the_winner_stands(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    data = FIELDS.read_bytes()
    job = new_job(jobs, data)
    store.inputs[job.input_blob] = data
    loser = claimed(jobs, job, lease=GONE)  # this worker stalled past its lease...
    winner = claimed(jobs, loser, worker="w2")  # ...and another delivery took the job over
    assert (loser.attempts, winner.attempts) == (1, 2)
    handler = JobHandler(jobs, store, StandInAnalyzer())
    assert run_attempt(handler, winner) is Outcome.SUCCEEDED
    won = jobs.get(job.job_id)
    assert won is not None
    with pytest.raises(AttemptLost, match="attempt 1"):
        run_attempt(handler, loser)
    assert jobs.get(job.job_id) == won
    assert won.result is not None
    assert won.result["attempt"] == 2
    assert won.result["outputs"] == {"quicklook_png": f"memory://account/results/{job.job_id}/2/quicklook.png"}
    # The loser's files went under its own attempt: the winner's were never overwritten.
    assert [(a, n) for _, a, n in store.put_calls] == [(2, "quicklook.png"), (1, "quicklook.png")]


def test_a_succeed_refused_while_the_winner_runs_leaves_it_running(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    data = FIELDS.read_bytes()
    job = new_job(jobs, data)
    store.inputs[job.input_blob] = data
    loser = claimed(jobs, job, lease=GONE)
    winner = claimed(jobs, loser, worker="w2")
    with pytest.raises(AttemptLost):
        run_attempt(JobHandler(jobs, store, StandInAnalyzer()), loser)
    assert jobs.get(job.job_id) == winner


def _truncated() -> bytes:
    return FIELDS.read_bytes()[:2000]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("missing blob", InputMissing),
        ("storage down", StorageUnavailable),
        ("sha256 mismatch", InvalidImage),
        ("truncated GeoTIFF", InvalidImage),
        ("text body", InvalidImage),
        ("bands that do not resolve", InvalidImage),
    ],
)
def test_failures_raise_the_typed_error_and_leave_the_job_to_the_consumer(
    jobs: InMemoryJobStore, store: MemoryStore, case: str, error: type[CropAIError]
) -> None:
    data = {"truncated GeoTIFF": _truncated(), "text body": b"hello, not a tiff"}.get(case, FIELDS.read_bytes())
    bands = ["X1", "X2", "X3", "X4"] if case == "bands that do not resolve" else None
    job = running_job(jobs, store, data, bands=bands)
    if case == "missing blob":
        del store.inputs[job.input_blob]
    elif case == "storage down":
        store.failure = StorageUnavailable("throttled")
    elif case == "sha256 mismatch":
        store.inputs[job.input_blob] = data[:-1] + bytes([data[-1] ^ 0xFF])
    with pytest.raises(error):
        run_attempt(JobHandler(jobs, store, Analyzer(torch.device("cpu"))), job)
    assert jobs.get(job.job_id) == job
    assert store.put_calls == []


def test_a_sha256_mismatch_names_both_digests(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    store.inputs[job.input_blob] = b"tampered"
    analyzer = StandInAnalyzer()
    with pytest.raises(InvalidImage, match=hashlib.sha256(b"tampered").hexdigest()) as info:
        run_attempt(JobHandler(jobs, store, analyzer), job)
    assert job.input_sha256 in info.value.message
    assert analyzer.calls == 0


def test_the_work_directory_is_removed_after_success_and_failure(
    jobs: InMemoryJobStore, store: MemoryStore, tmp_path: Path
) -> None:
    handler = JobHandler(jobs, store, StandInAnalyzer(), tmp_dir=tmp_path)
    assert run_attempt(handler, running_job(jobs, store, FIELDS.read_bytes())) is Outcome.SUCCEEDED
    broken = running_job(jobs, store, FIELDS.read_bytes())
    store.inputs[broken.input_blob] = b"tampered"
    with pytest.raises(InvalidImage, match="sha256"):
        run_attempt(handler, broken)
    with pytest.raises(AttemptLost):
        run_attempt(handler, running_job(jobs, store, FIELDS.read_bytes()), Checkpoint(lose_at=2))
    assert list(tmp_path.iterdir()) == []


def test_a_real_analysis_reports_every_stage_in_order_and_fractions_within(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    """The 13-band Sentinel-2 crop needs every stage: its cloud mask (s2cloudless) and fractional cover (SWIR)."""
    data = (DATA / "s2_l1c_fields_256.tif").read_bytes()
    job = new_job(jobs, data, params={**PARAMS, "bands": []})
    store.inputs[job.input_blob] = data
    job = claimed(jobs, job)
    reporter = Stages(Checkpoint())
    analyzer = Analyzer(torch.device("cpu"))
    analyzer._crop_health.window = 128  # four windows: fractions within the windowed stages
    assert run_stages(JobHandler(jobs, store, analyzer), job, Checkpoint(), reporter) is Outcome.SUCCEEDED
    assert reporter.first_seen() == list(STAGES)
    assert ("indices", 0.75) in reporter.reports
    assert ("cover", 0.75) in reporter.reports
    assert all(0.0 <= fraction < 1.0 for _, fraction in reporter.reports)
    assert len(reporter.reports) < 40  # per window and per file, not per pixel


def attempt(jobs: InMemoryJobStore, job: Job, *, interval: float = 1.0) -> tuple[AttemptGuard, Progress]:
    """The consumer's pair for a claimed ``job``: its guard (not started: no lease thread) and its reporter."""
    guard = AttemptGuard(
        jobs, job, lease=LEASE, timeout=timedelta(minutes=5), interrupt=lambda e: None, hard_exit_after=1
    )
    return guard, Progress(jobs, guard, RecordingOutbox(), interval=interval)


def test_a_cancel_requested_before_the_upload_publishes_nothing(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    """The cancel lands after the analysis' last checkpoint: the upload stage's first report is written at once and
    sees it, so not a file is uploaded."""
    job = running_job(jobs, store, FIELDS.read_bytes())
    analyzer = StandInAnalyzer(files=3)
    analyzer.at_end = lambda: jobs.request_cancel(job.job_id)
    guard, progress = attempt(jobs, job)
    with pytest.raises(Cancelled):
        run_stages(JobHandler(jobs, store, analyzer), job, guard, progress)
    assert (store.put_calls, store.deleted) == ([], [])
    now = jobs.get(job.job_id)
    assert now is not None
    assert (now.status, now.result, now.progress and now.progress["stage"]) == (JobStatus.RUNNING, None, "upload")


class OpensOnStop:
    """A reporter that sets ``gate`` when its report stops the attempt (and passes the stop on)."""

    def __init__(self, progress: Progress, gate: threading.Event) -> None:
        self.progress = progress
        self.gate = gate
        self.threads: set[int] = set()

    def report(self, stage: str, fraction: float = 0.0) -> None:
        self.threads.add(threading.get_ident())
        try:
            self.progress.report(stage, fraction)
        except BaseException:
            self.gate.set()
            raise


def test_a_cancel_seen_as_an_upload_completes_drops_the_rest_waits_for_those_under_way_and_deletes_them(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    """Eight files, four uploads at a time: the first completes (the cancel is requested meanwhile), the others under
    way are held until the stop (and a moment after, while the handler drops what has not started). The completion's
    report sees the cancel."""
    job = running_job(jobs, store, FIELDS.read_bytes())
    gate = threading.Event()

    def put(n: int) -> None:
        if n == 1:
            assert jobs.request_cancel(job.job_id) is not None
        else:
            assert gate.wait(WAIT), "the stop never came"
            time.sleep(0.2)  # still under way while the handler drops the rest: it must wait for this one

    store.after_put = put
    guard, progress = attempt(jobs, job, interval=0.0)  # every report is written: the next one sees the cancel
    reporter = OpensOnStop(progress, gate)
    with pytest.raises(Cancelled):
        run_stages(JobHandler(jobs, store, StandInAnalyzer(files=8)), job, guard, reporter)
    # Four started at once, maybe a fifth on the thread the first one freed before the stop; the rest never did.
    assert UPLOADS <= len(store.put_calls) <= UPLOADS + 1
    assert store.deleted == [(job.job_id, 1)]
    assert store.results == {}  # deleted after the three under way had landed
    assert reporter.threads == {threading.get_ident()}  # reports from one thread only
    now = jobs.get(job.job_id)
    assert now is not None
    assert (now.status, now.result) == (JobStatus.RUNNING, None)  # stopping it is the consumer's


def test_a_cancel_after_the_last_checkpoint_has_succeed_refused_and_deletes_every_upload(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    """Throttled reports write nothing during the upload, so none sees the cancel: it races the success, ``succeed``
    is refused, the job re-read says cancelled, so the run is Cancelled and its files deleted."""
    job = running_job(jobs, store, FIELDS.read_bytes())
    store.after_put = lambda n: n == 1 and jobs.request_cancel(job.job_id)
    guard, progress = attempt(jobs, job, interval=1.0)
    with pytest.raises(Cancelled):
        run_stages(JobHandler(jobs, store, StandInAnalyzer(files=3)), job, guard, progress)
    assert len(store.put_calls) == 3
    assert store.deleted == [(job.job_id, 1)]
    assert store.results == {}
    now = jobs.get(job.job_id)
    assert now is not None
    assert (now.status, now.result) == (JobStatus.RUNNING, None)


def test_output_files_are_uploaded_at_the_same_time(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    """Each upload waits until all three have started: one after the other, the first would wait alone."""
    job = running_job(jobs, store, FIELDS.read_bytes())
    together = threading.Barrier(3, timeout=WAIT)
    store.after_put = lambda n: together.wait()
    checkpoint = Checkpoint()
    reporter = Stages(checkpoint)
    assert run_stages(JobHandler(jobs, store, StandInAnalyzer(files=3)), job, checkpoint, reporter) is Outcome.SUCCEEDED
    done = jobs.get(job.job_id)
    assert done is not None
    assert done.result is not None
    assert set(done.result["outputs"]) == {"quicklook_png", "extra1", "extra2"}
    assert all(fraction < 1 for _, fraction in reporter.reports)


def test_an_upload_failure_waits_for_the_others_and_fails_the_attempt(
    jobs: InMemoryJobStore, store: MemoryStore
) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    landed: list[int] = []

    def put(n: int) -> None:
        if n == 1:
            raise StorageUnavailable("throttled")
        time.sleep(0.05)  # still under way when the failure is seen
        landed.append(n)

    store.after_put = put
    with pytest.raises(StorageUnavailable):
        run_attempt(JobHandler(jobs, store, StandInAnalyzer(files=3)), job)
    assert len(landed) == len(store.put_calls) - 1  # every upload started had ended when the error came out
    assert jobs.get(job.job_id) == job  # no result: settling is the consumer's


def test_a_refused_succeed_of_a_taken_over_attempt_is_not_a_cancel(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    data = FIELDS.read_bytes()
    job = new_job(jobs, data)
    store.inputs[job.input_blob] = data
    loser = claimed(jobs, job, lease=GONE)
    winner = claimed(jobs, loser, worker="w2")
    assert jobs.request_cancel(winner.job_id) is not None  # the winner's to stop, not the loser's
    with pytest.raises(AttemptLost):
        run_attempt(JobHandler(jobs, store, StandInAnalyzer()), loser)
    assert store.deleted == []  # a loser's files stay under its own prefix, as ever


class StuckStore(MemoryStore):
    """A download or an upload that does not end until ``gate`` is set (a hung transfer); ``started`` once one
    began, ``ended`` once one returned."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ended = threading.Event()

    def _stuck(self) -> None:
        self.started.set()
        self.gate.wait(WAIT)
        self.ended.set()

    def download_input(self, blob_name: str, path: Path) -> None:
        self._stuck()
        super().download_input(blob_name, path)

    def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
        self._stuck()
        return super().put_result(job_id, attempt, name, path, content_type)


class Forced:
    """A checkpoint that raises :class:`Interrupted` once ``forced`` is set (a forced shutdown)."""

    def __init__(self) -> None:
        self.forced = threading.Event()

    def check(self) -> None:
        if self.forced.is_set():
            raise Interrupted("shutdown forced")


def force_once_started(store: StuckStore, checkpoint: Forced) -> None:
    """In a thread: force the shutdown once the transfer started."""

    def force() -> None:
        if store.started.wait(WAIT):
            checkpoint.forced.set()

    threading.Thread(target=force, daemon=True).start()


def stuck_stage(handler: JobHandler, job: Job, store: StuckStore, stage: str) -> None:
    """Run ``stage`` with a checkpoint that a forced shutdown makes raise, forced once the transfer started."""
    checkpoint = Forced()
    if stage == "download":
        force_once_started(store, checkpoint)
        handler.prepare(job, checkpoint, Stages(Checkpoint()))
        return
    store.gate.set()  # the download goes through
    prepared = handler.prepare(job, checkpoint, Stages(Checkpoint()))
    output = handler.analyse(job, prepared, Stages(Checkpoint()))
    store.gate.clear()
    store.started.clear()
    store.ended.clear()
    force_once_started(store, checkpoint)
    try:
        handler.finish(job, output, checkpoint, Stages(Checkpoint()))
    finally:
        prepared.close()


@pytest.mark.parametrize("stage", ["download", "upload"])
def test_a_forced_shutdown_stops_a_download_or_an_upload_under_way_without_waiting_for_it(
    jobs: InMemoryJobStore, stage: str
) -> None:
    """The pipeline's I/O threads are not interrupted by signals: the stage polls its checkpoint while the transfer
    runs, and stops there; the transfer is left to end on its own."""
    store = StuckStore()
    job = running_job(jobs, store, FIELDS.read_bytes())
    handler = JobHandler(jobs, store, StandInAnalyzer())
    try:
        with pytest.raises(Interrupted):
            stuck_stage(handler, job, store, stage)
        assert not store.ended.is_set()  # stopped while the transfer was still under way
    finally:
        store.gate.set()


def test_a_time_limit_reached_during_a_download_fails_the_attempt_without_exiting_the_process(
    jobs: InMemoryJobStore,
) -> None:
    """The download hangs past the attempt's time limit: the attempt stops at its next poll with ``TimedOut`` and is
    failed ``timed_out``; the process does not exit (which would kill the job being analysed meanwhile)."""
    store = StuckStore()
    job = running_job(jobs, store, FIELDS.read_bytes())
    handler = JobHandler(jobs, store, StandInAnalyzer())
    exits: list[int] = []
    guard = AttemptGuard(jobs, job, lease=LEASE, timeout=timedelta(milliseconds=200), interrupt=lambda e: None,
                         hard_exit_after=0.5, exit_process=exits.append)  # fmt: skip
    try:
        with guard:
            with pytest.raises(TimedOut):
                handler.prepare(job, guard, Stages(Checkpoint()))
            guard.pause()  # as the consumer does once prepare ends
        assert not store.ended.is_set()
        time.sleep(0.6)  # past hard_exit_after
        assert exits == []
        assert (jobs.get(job.job_id) or job).error_code == "timed_out"
    finally:
        store.gate.set()
