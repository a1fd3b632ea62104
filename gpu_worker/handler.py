"""Run one claimed attempt: download the input, analyse, upload the outputs, store the result.

The consumer claims the job (:meth:`shared.jobs.JobStore.claim`) and hands the claimed :class:`~shared.jobs.Job`
here; the handler returns an :class:`Outcome` or raises (a :mod:`shared.errors` error, :class:`AttemptLost`,
:class:`Cancelled`, or anything else for a bug), and never settles the message: :mod:`gpu_worker.settlement` decides
that.

Fencing: outputs go under ``results/{job_id}/{attempt}/``, and the result is stored by ``succeed`` for this attempt
only. At every checkpoint (between stages, and at each progress report: :mod:`gpu_worker.progress`) the attempt
stops if it no longer holds the job (:class:`AttemptLost`) or if its cancellation was requested
(:class:`Cancelled`), so a run that was taken over or cancelled stops early; if it gets as far as ``succeed``
anyway, the write is refused and its files, under its own attempt's prefix, never overwrite the winner's.

Cancellation: the ``upload`` stage's first report is written at once and tells whether a cancellation was requested,
so a cancelled run uploads nothing. A cancellation that arrives during the upload (seen at the next file, or by
``succeed`` being refused for it) stops the run with :class:`Cancelled`, and the files it already uploaded are
deleted (best-effort: a file left behind is under the cancelled attempt's prefix, which no result names).

The analysis (torch, rasterio) releases the GIL in its heavy parts, so the lease thread and the SDK's lock renewer
keep running while a long job runs in this thread.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import NoReturn, Protocol
from uuid import UUID

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest
from gpu_worker.settlement import AttemptLost, Cancelled
from shared.errors import CropAIError, InvalidImage
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

    def delete_results(self, job_id: UUID, attempt: int) -> int: ...


class Checkpoint(Protocol):
    def check(self) -> None:
        """Raise :class:`Cancelled` or :class:`AttemptLost` when the attempt is to stop."""
        ...


class Reporter(Protocol):
    def report(self, stage: str, fraction: float = 0.0) -> None:
        """Record the attempt's progress (:class:`gpu_worker.progress.Progress`); a checkpoint too."""
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

    def run(self, job: Job, checkpoint: Checkpoint, progress: Reporter) -> Outcome:
        """Run the attempt; ``progress`` records its stages (each report is a checkpoint too)."""
        job_id, attempt = job.job_id, job.attempts
        with tempfile.TemporaryDirectory(prefix=f"crop-ai-{job_id}-{attempt}-", dir=self._tmp_dir) as tmp:
            workdir = Path(tmp)
            image = workdir / "input.tif"
            progress.report("download")
            self._store.download_input(job.input_blob, image)
            actual = sha256_of(image)
            if actual != job.input_sha256:
                raise InvalidImage(
                    f"input blob {job.input_blob} has sha256 {actual}, the job expects {job.input_sha256}"
                )
            checkpoint.check()
            params = job.params
            bands, scale = list(params["bands"]), params["scale"]
            request = AnalysisRequest(params["analysis"], bands, scale, progress=progress.report)
            outdir = workdir / "out"
            outdir.mkdir()
            output = self._analyzer.analyse(image, request, outdir)
            progress.report("upload")  # written at once: a cancellation requested by now uploads nothing
            checkpoint.check()
            outputs = self._upload(job, output, progress)
            result = {**output.result, "attempt": attempt, "outputs": outputs}
        if self._jobs.succeed(job_id, attempt, result) is None:
            current = self._jobs.get(job_id)
            if current is not None and current.attempts == attempt and current.cancel_requested_at is not None:
                self._discard(job, f"cancellation requested after attempt {attempt}'s last checkpoint")
            raise AttemptLost(f"attempt {attempt} of job {job_id} was superseded before its result was stored")
        return Outcome.SUCCEEDED

    def _upload(self, job: Job, output: AnalysisOutput, reporter: Reporter) -> dict[str, str]:
        outputs: dict[str, str] = {}
        try:
            for i, (key, (path, content_type)) in enumerate(output.files.items()):
                if i:
                    reporter.report("upload", i / len(output.files))
                outputs[key] = self._store.put_result(job.job_id, job.attempts, path.name, path, content_type)
        except Cancelled as e:
            if outputs:
                self._discard(job, str(e))
            raise
        return outputs

    def _discard(self, job: Job, why: str) -> NoReturn:
        """Delete what the cancelled attempt uploaded (best-effort), then raise :class:`Cancelled`."""
        extra = {"job_id": str(job.job_id), "attempt": job.attempts, "action": "discard_outputs"}
        try:
            deleted = self._store.delete_results(job.job_id, job.attempts)
        except CropAIError as e:  # StorageUnavailable: the files stay under the cancelled attempt's prefix
            logger.warning("job %s: could not delete the cancelled attempt's outputs: %s", job.job_id, e.code,
                           extra=extra)  # fmt: skip
        else:
            logger.info("job %s: deleted %d outputs of cancelled attempt %d", job.job_id, deleted, job.attempts,
                        extra=extra)  # fmt: skip
        raise Cancelled(why)
