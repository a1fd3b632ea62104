"""The job handler on in-memory implementations of the repository and the blob store, with real GeoTIFFs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import torch

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer
from gpu_worker.handler import JobHandler, Outcome
from shared.errors import CropAIError, InputMissing, InvalidImage, InvalidMessage, StorageUnavailable
from shared.jobs import JobStatus
from shared.memory import InMemoryJobRepository
from shared.messages import JobMessage

DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_rgbn_fields_128.tif"


class MemoryStore:
    """The handler's side of :class:`shared.storage.BlobStore`: inputs by blob name, results by (job, name)."""

    def __init__(self) -> None:
        self.inputs: dict[str, bytes] = {}
        self.results: dict[str, tuple[bytes, str]] = {}
        self.failure: CropAIError | None = None

    def download_input(self, blob_name: str, path: Path) -> None:
        if self.failure is not None:
            raise self.failure
        if blob_name not in self.inputs:
            raise InputMissing(f"images/{blob_name} does not exist")
        path.write_bytes(self.inputs[blob_name])

    def put_result(self, job_id: UUID, name: str, path: Path, content_type: str) -> str:
        url = f"memory://account/results/{job_id}/{name}"
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


def _submit(
    repo: InMemoryJobRepository, store: MemoryStore, data: bytes, *, bands: list[str] | None = None
) -> JobMessage:
    job_id = uuid4()
    sha256 = hashlib.sha256(data).hexdigest()
    blob = f"{job_id}/input.tif"
    store.inputs[blob] = data
    message = JobMessage(
        job_id=job_id,
        input_blob=blob,
        input_sha256=sha256,
        bands=bands or ["B02", "B03", "B04", "B08"],
        scale=10000,
        submitted_at=datetime.now(UTC),
    )
    params: dict[str, Any] = {"bands": message.bands, "scale": message.scale, "analysis": message.analysis}
    repo.create(job_id=job_id, input_blob=blob, input_sha256=sha256, params=params, idempotency_key=None)
    return message


@pytest.fixture
def repo() -> InMemoryJobRepository:
    return InMemoryJobRepository()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_real_analysis_of_a_real_geotiff_is_stored(repo: InMemoryJobRepository, store: MemoryStore) -> None:
    message = _submit(repo, store, FIELDS.read_bytes())
    handler = JobHandler(repo, store, Analyzer(torch.device("cpu")))
    assert handler.handle(message) is Outcome.SUCCEEDED
    job = repo.get(message.job_id)
    assert job is not None
    assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
    assert job.result is not None
    assert job.result["analysis"] == "crop-health"
    assert 0.0 < job.result["valid_fraction"] <= 1.0
    assert -1.0 <= job.result["indices"]["ndvi"]["mean"] <= 1.0
    assert "outputs" in job.result


def test_output_files_are_uploaded_and_their_urls_stored(repo: InMemoryJobRepository, store: MemoryStore) -> None:
    message = _submit(repo, store, FIELDS.read_bytes())
    JobHandler(repo, store, StandInAnalyzer()).handle(message)
    job = repo.get(message.job_id)
    assert job is not None
    assert job.result is not None
    url = job.result["outputs"]["quicklook_png"]
    assert url == f"memory://account/results/{message.job_id}/quicklook.png"
    assert store.results[url] == (b"\x89PNG stand-in", "image/png")


@pytest.mark.parametrize(
    ("terminal", "outcome"), [("succeed", Outcome.ALREADY_SUCCEEDED), ("fail", Outcome.ALREADY_FAILED)]
)
def test_a_redelivered_message_for_a_terminal_job_is_not_processed_again(
    repo: InMemoryJobRepository, store: MemoryStore, terminal: str, outcome: Outcome
) -> None:
    message = _submit(repo, store, FIELDS.read_bytes())
    if terminal == "succeed":
        repo.succeed(message.job_id, {"first": True})
    else:
        repo.fail(message.job_id, "invalid_image", "broken")
    analyzer = StandInAnalyzer()
    assert JobHandler(repo, store, analyzer).handle(message) is outcome
    assert analyzer.calls == 0
    job = repo.get(message.job_id)
    assert job is not None
    assert job.result == ({"first": True} if terminal == "succeed" else None)


def test_a_result_stored_meanwhile_by_another_delivery_stands(repo: InMemoryJobRepository, store: MemoryStore) -> None:
    message = _submit(repo, store, FIELDS.read_bytes())

    class RacingAnalyzer(StandInAnalyzer):
        def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
            repo.succeed(message.job_id, {"winner": "other delivery"})
            return super().analyse(image_path, request, workdir)

    assert JobHandler(repo, store, RacingAnalyzer()).handle(message) is Outcome.ALREADY_SUCCEEDED
    job = repo.get(message.job_id)
    assert job is not None
    assert job.result == {"winner": "other delivery"}


def test_unknown_job_is_an_invalid_message(repo: InMemoryJobRepository, store: MemoryStore) -> None:
    message = _submit(InMemoryJobRepository(), store, FIELDS.read_bytes())  # the job exists elsewhere only
    with pytest.raises(InvalidMessage, match="does not exist"):
        JobHandler(repo, store, StandInAnalyzer()).handle(message)


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
    repo: InMemoryJobRepository, store: MemoryStore, case: str, error: type[CropAIError]
) -> None:
    data = {"truncated GeoTIFF": _truncated(), "text body": b"hello, not a tiff"}.get(case, FIELDS.read_bytes())
    bands = ["X1", "X2", "X3", "X4"] if case == "bands that do not resolve" else None
    message = _submit(repo, store, data, bands=bands)
    if case == "missing blob":
        del store.inputs[message.input_blob]
    elif case == "storage down":
        store.failure = StorageUnavailable("throttled")
    elif case == "sha256 mismatch":
        store.inputs[message.input_blob] = data[:-1] + bytes([data[-1] ^ 0xFF])
    with pytest.raises(error):
        JobHandler(repo, store, Analyzer(torch.device("cpu"))).handle(message)
    job = repo.get(message.job_id)
    assert job is not None
    assert (job.status, job.attempts) == (JobStatus.PROCESSING, 1)


def test_the_work_directory_is_removed_after_success_and_failure(
    repo: InMemoryJobRepository, store: MemoryStore, tmp_path: Path
) -> None:
    handler = JobHandler(repo, store, StandInAnalyzer(), tmp_dir=tmp_path)
    assert handler.handle(_submit(repo, store, FIELDS.read_bytes())) is Outcome.SUCCEEDED
    broken = _submit(repo, store, FIELDS.read_bytes())
    store.inputs[broken.input_blob] = b"tampered"
    with pytest.raises(InvalidImage, match="sha256"):
        handler.handle(broken)
    assert list(tmp_path.iterdir()) == []
