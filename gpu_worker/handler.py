"""Run one claimed attempt: download the input, analyse, upload the outputs, store the result.

The consumer claims the job (:meth:`shared.jobs.JobStore.claim`) and hands the claimed :class:`~shared.jobs.Job`
here; the handler returns an :class:`Outcome` or raises (a :mod:`shared.errors` error, :class:`AttemptLost`, or
anything else for a bug), and never settles the message: :mod:`gpu_worker.settlement` decides that.

Fencing: outputs go under ``results/{job_id}/{attempt}/``, and the result is stored by ``succeed`` for this attempt
only. Between stages the handler checks that the attempt still holds the job (:meth:`AttemptGuard.check`), so a run
that was taken over stops early; if it gets as far as ``succeed`` anyway, the write is refused and its files, under
its own attempt's prefix, never overwrite the winner's.

The analysis (torch, rasterio) releases the GIL in its heavy parts, so the lease thread and the SDK's lock renewer
keep running while a long job runs in this thread.
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
from gpu_worker.settlement import AttemptLost
from shared.errors import InvalidImage
from shared.jobs import Job, JobStore

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    NOT_CLAIMED = "not_claimed"  # running elsewhere under a live lease, or finished: this delivery has nothing to do


class Analyzer(Protocol):
    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput: ...


class BlobStore(Protocol):
    """What the handler needs of :class:`shared.storage.BlobStore`."""

    def download_input(self, blob_name: str, path: Path) -> None: ...

    def put_result(self, job_id: UUID, attempt: int, name: str, path: Path, content_type: str) -> str: ...


class Checkpoint(Protocol):
    def check(self) -> None:
        """Raise :class:`AttemptLost` when the attempt no longer holds the job."""
        ...


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class JobHandler:
    def __init__(self, jobs: JobStore, store: BlobStore, analyzer: Analyzer, *, tmp_dir: Path | None = None):
        self._jobs = jobs
        self._store = store
        self._analyzer = analyzer
        self._tmp_dir = tmp_dir

    def run(self, job: Job, checkpoint: Checkpoint) -> Outcome:
        job_id, attempt = job.job_id, job.attempts
        with tempfile.TemporaryDirectory(prefix=f"crop-ai-{job_id}-{attempt}-", dir=self._tmp_dir) as tmp:
            workdir = Path(tmp)
            image = workdir / "input.tif"
            self._store.download_input(job.input_blob, image)
            actual = sha256_of(image)
            if actual != job.input_sha256:
                raise InvalidImage(
                    f"input blob {job.input_blob} has sha256 {actual}, the job expects {job.input_sha256}"
                )
            checkpoint.check()
            params = job.params
            request = AnalysisRequest(analysis=params["analysis"], bands=list(params["bands"]), scale=params["scale"])
            outdir = workdir / "out"
            outdir.mkdir()
            output = self._analyzer.analyse(image, request, outdir)
            checkpoint.check()
            outputs = {
                key: self._store.put_result(job_id, attempt, path.name, path, content_type)
                for key, (path, content_type) in output.files.items()
            }
            result = {**output.result, "attempt": attempt, "outputs": outputs}
        if self._jobs.succeed(job_id, attempt, result) is None:
            raise AttemptLost(f"attempt {attempt} of job {job_id} was superseded before its result was stored")
        return Outcome.SUCCEEDED
