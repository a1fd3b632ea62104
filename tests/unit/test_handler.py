"""One claimed attempt through the job handler, on the in-memory job store and blob store, with real GeoTIFFs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from uuid import UUID

import pytest
import torch

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer
from gpu_worker.handler import JobHandler, Outcome
from gpu_worker.settlement import AttemptLost
from shared.errors import CropAIError, InputMissing, InvalidImage, StorageUnavailable
from shared.jobs import Job, JobStatus
from tests.fakes import InMemoryJobStore
from tests.jobs import GONE, PARAMS, claimed, new_job

DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_rgbn_fields_128.tif"


class MemoryStore:
    """The handler's side of :class:`shared.storage.BlobStore`: inputs by blob name, results by attempt."""

    def __init__(self) -> None:
        self.inputs: dict[str, bytes] = {}
        self.results: dict[str, tuple[bytes, str]] = {}
        self.put_calls: list[tuple[UUID, int, str]] = []
        self.failure: CropAIError | None = None

    def download_input(self, blob_name: str, path: Path) -> None:
        if self.failure is not None:
            raise self.failure
        if blob_name not in self.inputs:
            raise InputMissing(f"images/{blob_name} does not exist")
        path.write_bytes(self.inputs[blob_name])

    def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str:
        self.put_calls.append((job_id, attempt, name))
        url = f"memory://account/results/{job_id}/{attempt}/{name}"
        self.results[url] = (path.read_bytes(), content_type)
        return url


class StandInAnalyzer:
    """Same interface as :class:`gpu_worker.analysis.Analyzer`; writes one output file and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        self.calls += 1
        quicklook = workdir / "quicklook.png"
        quicklook.write_bytes(b"\x89PNG stand-in")
        return AnalysisOutput(
            result={"analysis": request.analysis, "bytes": image_path.stat().st_size},
            files={"quicklook_png": (quicklook, "image/png")},
        )


class Checkpoint:
    """Counts the handler's checks; raises :class:`AttemptLost` at the ``lose_at``-th."""

    def __init__(self, lose_at: int | None = None) -> None:
        self.checks = 0
        self.lose_at = lose_at

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.lose_at:
            raise AttemptLost("taken over")


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
    assert handler.run(job, Checkpoint()) is Outcome.SUCCEEDED
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
    assert JobHandler(jobs, store, StandInAnalyzer()).run(job, checkpoint) is Outcome.SUCCEEDED
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
    assert checkpoint.checks == 2  # before the analysis and before the upload


@pytest.mark.parametrize(("lose_at", "analysed"), [(1, 0), (2, 1)], ids=["before-the-analysis", "before-the-upload"])
def test_a_lost_attempt_stops_before_uploading_anything(
    jobs: InMemoryJobStore, store: MemoryStore, lose_at: int, analysed: int
) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    analyzer = StandInAnalyzer()
    with pytest.raises(AttemptLost):
        JobHandler(jobs, store, analyzer).run(job, Checkpoint(lose_at=lose_at))
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
    assert handler.run(winner, Checkpoint()) is Outcome.SUCCEEDED
    won = jobs.get(job.job_id)
    assert won is not None
    with pytest.raises(AttemptLost, match="attempt 1"):
        handler.run(loser, Checkpoint())
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
        JobHandler(jobs, store, StandInAnalyzer()).run(loser, Checkpoint())
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
        JobHandler(jobs, store, Analyzer(torch.device("cpu"))).run(job, Checkpoint())
    assert jobs.get(job.job_id) == job
    assert store.put_calls == []


def test_a_sha256_mismatch_names_both_digests(jobs: InMemoryJobStore, store: MemoryStore) -> None:
    job = running_job(jobs, store, FIELDS.read_bytes())
    store.inputs[job.input_blob] = b"tampered"
    analyzer = StandInAnalyzer()
    with pytest.raises(InvalidImage, match=hashlib.sha256(b"tampered").hexdigest()) as info:
        JobHandler(jobs, store, analyzer).run(job, Checkpoint())
    assert job.input_sha256 in info.value.message
    assert analyzer.calls == 0


def test_the_work_directory_is_removed_after_success_and_failure(
    jobs: InMemoryJobStore, store: MemoryStore, tmp_path: Path
) -> None:
    handler = JobHandler(jobs, store, StandInAnalyzer(), tmp_dir=tmp_path)
    assert handler.run(running_job(jobs, store, FIELDS.read_bytes()), Checkpoint()) is Outcome.SUCCEEDED
    broken = running_job(jobs, store, FIELDS.read_bytes())
    store.inputs[broken.input_blob] = b"tampered"
    with pytest.raises(InvalidImage, match="sha256"):
        handler.run(broken, Checkpoint())
    with pytest.raises(AttemptLost):
        handler.run(running_job(jobs, store, FIELDS.read_bytes()), Checkpoint(lose_at=2))
    assert list(tmp_path.iterdir()) == []
