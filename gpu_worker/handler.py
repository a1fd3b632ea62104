"""Process one job: start the attempt, download the input, analyse, upload the outputs, store the result.

The handler returns an :class:`Outcome` or raises (a :mod:`shared.errors` error, or anything else for a bug); it
never settles the message: :mod:`gpu_worker.consumer` turns what happened into complete / abandon / dead-letter.

At-least-once delivery: a message can come again after the result was written (crash or lost lock between the
write and the complete). ``start_attempt`` returns the job as it is, and a terminal job is not processed again; the
result is keyed by job id, so even two deliveries racing each other store it once.

The analysis (torch, rasterio) releases the GIL in its heavy parts, so the AutoLockRenewer's threads keep renewing
the message lock while a long job runs in this thread.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Protocol
from uuid import UUID

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from shared.errors import InvalidImage, InvalidMessage
from shared.jobs import JobRepository, JobStatus
from shared.messages import JobMessage

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    ALREADY_SUCCEEDED = "already_succeeded"  # a redelivery after the result was stored
    ALREADY_FAILED = "already_failed"


class Analyzer(Protocol):
    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput: ...


class BlobStore(Protocol):
    """What the handler needs of :class:`shared.storage.BlobStore`."""

    def download_input(self, blob_name: str, path: Path) -> None: ...

    def put_result(self, job_id: UUID, name: str, path: Path, content_type: str) -> str: ...


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class JobHandler:
    def __init__(self, repo: JobRepository, store: BlobStore, analyzer: Analyzer, *, tmp_dir: Path | None = None):
        self._repo = repo
        self._store = store
        self._analyzer = analyzer
        self._tmp_dir = tmp_dir

    def handle(self, message: JobMessage) -> Outcome:
        job_id = message.job_id
        job = self._repo.start_attempt(job_id)
        if job is None:
            raise InvalidMessage(f"job {job_id} does not exist")
        if job.status is JobStatus.SUCCEEDED:
            return Outcome.ALREADY_SUCCEEDED
        if job.status is JobStatus.FAILED:
            return Outcome.ALREADY_FAILED
        with tempfile.TemporaryDirectory(prefix=f"crop-ai-{job_id}-", dir=self._tmp_dir) as tmp:
            workdir = Path(tmp)
            image = workdir / "input.tif"
            self._store.download_input(message.input_blob, image)
            actual = sha256_of(image)
            if actual != message.input_sha256:
                raise InvalidImage(
                    f"input blob {message.input_blob} has sha256 {actual}, the job expects {message.input_sha256}"
                )
            request = AnalysisRequest(analysis=message.analysis, bands=list(message.bands), scale=message.scale)
            outdir = workdir / "out"
            outdir.mkdir()
            output = self._analyzer.analyse(image, request, outdir)
            outputs = {
                key: self._store.put_result(job_id, path.name, path, content_type)
                for key, (path, content_type) in output.files.items()
            }
            result = {**output.result, "outputs": outputs}
        if self._repo.succeed(job_id, result):
            return Outcome.SUCCEEDED
        # Another delivery stored a result first, or the job was failed meanwhile: what is stored stands.
        current = self._repo.get(job_id)
        outcome = (
            Outcome.ALREADY_FAILED if current and current.status is JobStatus.FAILED else Outcome.ALREADY_SUCCEEDED
        )
        logger.info(
            "job %s was already terminal: result not stored",
            job_id,
            extra={"job_id": str(job_id), "action": outcome.value},
        )
        return outcome
