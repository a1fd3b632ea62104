"""One claimed attempt in three stages: prepare (download the input), analyse, finish (upload, store the result).

The consumer claims the job (:meth:`shared.jobs.JobStore.claim`) and runs the stages of the claimed
:class:`~shared.jobs.Job`, each in the thread the pipeline gives it (:mod:`gpu_worker.pipeline`): :meth:`JobHandler.
prepare` and :meth:`JobHandler.finish` do I/O in background threads, :meth:`JobHandler.analyse` the compute in a
computing thread (the main thread, and with ``WORKER_ANALYSES`` above 1 others). A stage returns or raises (a
:mod:`shared.errors` error, :class:`AttemptLost`, :class:`Cancelled`, or anything else for a bug); the handler never
settles the message: :mod:`gpu_worker.settlement` decides that. The :class:`Prepared` work directory lives until the
consumer closes it, after the settlement.

Fencing: outputs go under ``results/{job_id}/{attempt}/``, and the result is stored by ``succeed`` for this attempt
only. At every checkpoint (between stages, and at each progress report: :mod:`gpu_worker.progress`) the attempt
stops if it no longer holds the job (:class:`AttemptLost`) or if its cancellation was requested
(:class:`Cancelled`), so a run that was taken over or cancelled stops early; if it gets as far as ``succeed``
anyway, the write is refused and its files, under its own attempt's prefix, never overwrite the winner's.

Downloads, copies and uploads run in threads of their own while the stage's thread waits for them, at a checkpoint
every :data:`POLL` seconds: a forced shutdown, the attempt's time limit, a cancellation or a lost attempt stops the
stage there, without waiting for the transfer (the pipeline's I/O threads are not interrupted by signals, and an SDK
call cannot be cancelled). A transfer left behind that way (:class:`~gpu_worker.settlement.Interrupted`: a forced
shutdown or the time limit) runs on in its daemon thread until the SDK returns, bounded by its own timeouts and
retries; a copy of an input by reference (:func:`shared.ranged.copy_to`) begins no range once its stage has stopped,
for any reason, and ends with the ranges under way (a process exiting waits for those). What a transfer writes goes
to the attempt's work directory (removed at the settlement) or under the attempt's own prefix of ``results``, which
no result names. Uploads: the output files are uploaded concurrently (at most :data:`UPLOADS` at
a time); the finishing thread reports the ``upload`` stage as each one completes, so progress is reported from one
thread, and each report is a checkpoint.

Cancellation: the ``upload`` stage's first report is written at once and tells whether a cancellation was requested,
so a cancelled run uploads nothing. A cancellation that arrives during the upload (seen when the next file
completes, or by ``succeed`` being refused for it) stops the run with :class:`Cancelled`: the uploads not yet
started are dropped, those under way are waited for, and then every file the attempt uploaded is deleted
(best-effort: a file left behind is under the cancelled attempt's prefix, which no result names).

The analysis (torch, rasterio) releases the GIL in its heavy parts, so the lease threads, the SDK's lock renewer and
the pipeline's I/O threads keep running while a long job is analysed.
"""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar
from uuid import UUID

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Input
from gpu_worker.remote import PinnedUrl, open_pinned
from gpu_worker.settlement import AttemptLost, Cancelled, Interrupted
from shared.errors import CropAIError, InvalidImage
from shared.fields import Fields
from shared.inputs import InputChanged, Reference, SourceUnavailable, gdal_path
from shared.jobs import Job, JobStore
from shared.ranged import RangeSource, copy_to

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
UPLOADS = 4  # output files uploaded at the same time (a job has at most a handful)
POLL = 0.2  # seconds between two checkpoints while a download or an upload is under way
T = TypeVar("T")


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


class RemoteInputs(Protocol):
    """What the handler needs of :class:`shared.storage.BlobStore` for an input by reference."""

    def open_input(self, blob_name: str, etag: str | None = None) -> RangeSource: ...

    def input_url(self, blob_name: str) -> str: ...

    def read_url(self, blob_url: str, ttl: timedelta) -> str: ...


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


@dataclass(frozen=True)
class Prepared:
    """The attempt's work directory, holding its downloaded, verified input (removed by :meth:`close`), or, for an
    input by reference, how the analysis reads it (``remote``: nothing downloaded), and for an outside URL the
    pinned source it reads (``source``: its connections closed by :meth:`close`)."""

    directory: tempfile.TemporaryDirectory[str]
    remote: Input | None = None
    source: PinnedUrl | None = None

    @property
    def workdir(self) -> Path:
        return Path(self.directory.name)

    @property
    def image(self) -> Path:
        """The local file, or the name of an input by reference (opened as :attr:`remote` says)."""
        return self.remote.path if self.remote is not None else self.workdir / "input.tif"

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        self.directory.cleanup()


class JobHandler:
    def __init__(
        self,
        jobs: JobStore,
        store: BlobStore,
        analyzer: Analyzer,
        *,
        tmp_dir: Path | None = None,
        remote: RemoteInputs | None = None,
        read_ttl: timedelta = timedelta(hours=2),
        allowed_hosts: tuple[str, ...] = (),
        allow_private_urls: bool = False,
        copy_inputs: bool = True,
        disk_free: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
    ):
        """``allow_private_urls``: an outside image_url may be plain http on a non-public address (tests against a
        local server only: the SSRF guard is off). ``copy_inputs``: a whole-scene job copies its input by reference
        to the work directory first when ``disk_free`` (bytes free where the work directory is) leaves room
        (:meth:`copies`); ``False``: every input by reference is read by ranges."""
        self._jobs = jobs
        self._store = store
        self._analyzer = analyzer
        self._tmp_dir = tmp_dir
        self._remote_inputs = remote
        self._read_ttl = read_ttl  # of the read SAS URL an input by reference is analysed through
        self._allowed_hosts = allowed_hosts
        self._allow_private_urls = allow_private_urls
        self._copy_inputs = copy_inputs
        self._disk_free = disk_free

    def prepare(self, job: Job, checkpoint: Checkpoint, progress: Reporter) -> Prepared:
        """Download the input into a fresh work directory and check its SHA-256 (``InvalidImage`` if it differs).
        An input by reference is first checked to be the version the job was accepted with (ETag and size), then
        copied to the work directory too (:meth:`copies`) or given to the analysis to read by ranges
        (:meth:`_remote`, :func:`gpu_worker.remote.open_pinned`)."""
        directory = tempfile.TemporaryDirectory(prefix=f"crop-ai-{job.job_id}-{job.attempts}-", dir=self._tmp_dir)
        prepared = Prepared(directory)
        path = prepared.workdir / "input.tif"
        reference = Reference.of(job.params)
        try:
            progress.report("download")
            if reference is not None:
                return self._by_reference(job, reference, prepared, checkpoint)
            self._transfer(lambda: self._store.download_input(job.input_blob, path), f"download-{job.job_id}",
                           checkpoint)  # fmt: skip
            actual = sha256_of(path)
            if actual != job.input_sha256:
                raise InvalidImage(
                    f"input blob {job.input_blob} has sha256 {actual}, the job expects {job.input_sha256}"
                )
            checkpoint.check()
        except BaseException:
            prepared.close()
            raise
        return prepared

    def copies(self, job: Job, size: int, workdir: Path) -> bool:
        """Whether an input by reference of ``size`` bytes is copied to the work directory before the analysis
        rather than read by ranges during it: for a whole-scene job, whose two passes each read every block (by
        ranges, the file would cross the network twice, and inside the analysis, not overlapped with the previous
        job's compute as a download is), when the disk keeps at least as much free as the file after the copy. A
        job with fields reads a few percent of the file by ranges."""
        return self._copy_inputs and job.params.get("fields") is None and self._disk_free(workdir) >= 2 * size

    def _by_reference(self, job: Job, reference: Reference, prepared: Prepared, checkpoint: Checkpoint) -> Prepared:
        path = prepared.workdir / "input.tif"
        if reference.kind == "url":
            source = open_pinned(reference, self._allowed_hosts, allow_private=self._allow_private_urls)
            try:
                if self._copied(job, reference, source, path, checkpoint):
                    source.close()
                    return prepared
                return Prepared(prepared.directory, Input(path, reference.size, source.opener()), source)
            except BaseException:
                source.close()
                raise
        blob = self._pinned_blob(reference)
        if self._copied(job, reference, blob, path, checkpoint):
            return prepared
        return Prepared(prepared.directory, self._remote(reference, prepared.workdir))

    def _copied(self, job: Job, reference: Reference, source: RangeSource, path: Path, checkpoint: Checkpoint) -> bool:
        """Copy the pinned input to ``path`` if :meth:`copies` says so; ``False``: it is to be read by ranges (also
        when the disk filled up during the copy: other processes share it)."""
        if not self.copies(job, reference.size, path.parent):
            return False
        try:
            self._copy(job, source, path, checkpoint)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            path.unlink(missing_ok=True)
            extra = {"job_id": str(job.job_id), "action": "copy_input"}
            logger.warning("job %s: no room left on the disk for its input (%d bytes): read by ranges instead",
                           job.job_id, reference.size, extra=extra)  # fmt: skip
            return False
        return True

    def _pinned_blob(self, reference: Reference) -> RangeSource:
        """A blob of the account's storage, once it is known to be the version the job was accepted with
        (:class:`InputChanged` if not, ``InputMissing`` if it is gone)."""
        inputs = self._remote_inputs
        if inputs is None:
            raise InvalidImage("this worker cannot read inputs by reference")
        source = inputs.open_input(reference.location, reference.etag)
        if source.size != reference.size:
            raise InputChanged(f"input blob {reference.location} is {source.size} bytes, not {reference.size}")
        return source

    def _copy(self, job: Job, source: RangeSource, path: Path, checkpoint: Checkpoint) -> None:
        """Copy the pinned input whole to ``path`` (:func:`shared.ranged.copy_to`: every read conditional on its
        version, ``InputChanged`` if it changes meanwhile). A stage stopped meanwhile (a cancellation, a lost
        attempt, a shutdown) stops the copy too: no range is begun after it."""
        stop = threading.Event()
        try:
            self._transfer(lambda: copy_to(source, path, stop), f"copy-{job.job_id}", checkpoint)
        except BaseException:
            stop.set()
            raise
        if path.stat().st_size != source.size:
            raise InputChanged(f"the input copied is {path.stat().st_size} bytes, not {source.size}")
        checkpoint.check()

    def _transfer(self, call: Callable[[], None], name: str, checkpoint: Checkpoint) -> None:
        """``call()`` in a thread of its own (see the module docstring), checking every :data:`POLL` seconds."""
        transfer = _background(call, name)
        while not wait([transfer], timeout=POLL).done:
            checkpoint.check()
        transfer.result()

    def _remote(self, reference: Reference, workdir: Path) -> Input:
        """The ``/vsicurl/`` path of a blob of the account's storage (checked by :meth:`_pinned_blob`), read through
        a short-lived read SAS URL (a user delegation key in Azure). GDAL sends ``If-Match`` with that ETag on every
        ranged read, so a blob overwritten during the analysis fails it (a read error) rather than mixing two
        versions; the URL carries the ETag, so GDAL's process-wide cache never serves another version's bytes. (An
        outside URL is never given to GDAL: :mod:`gpu_worker.remote`.)"""
        inputs = self._remote_inputs
        assert inputs is not None, "checked by _pinned_blob"
        url = inputs.read_url(inputs.input_url(reference.location), self._read_ttl)
        headers = workdir / "input.headers"
        headers.write_text(f"If-Match: {reference.etag}\r\n")
        return Input(gdal_path(url, header_file=headers, etag=reference.etag), reference.size)

    def analyse(self, job: Job, prepared: Prepared, progress: Reporter) -> AnalysisOutput:
        """The analysis of the prepared input; its output files go to the work directory."""
        params = job.params
        fields = Fields.from_params(params["fields"]) if params.get("fields") is not None else None
        request = AnalysisRequest(params["analysis"], list(params["bands"]), params["scale"], progress=progress.report,
                                  fields=fields, source=prepared.remote)  # fmt: skip
        outdir = prepared.workdir / "out"
        outdir.mkdir()
        reference = Reference.of(params)
        try:
            return self._analyzer.analyse(prepared.image, request, outdir)
        except (InvalidImage, SourceUnavailable):
            # A blob's read by ranges refused by If-Match (412), or a 404, reaches us as a failed read: say why. (An
            # outside URL's reads are ours: their errors say it already. A copy was read whole before the analysis.)
            blob = reference if reference is not None and reference.kind != "url" else None
            if blob is not None and prepared.remote is not None and self._remote_inputs is not None:
                self._remote_inputs.open_input(blob.location, blob.etag)  # InputChanged, InputMissing
            raise

    def finish(self, job: Job, output: AnalysisOutput, checkpoint: Checkpoint, progress: Reporter) -> Outcome:
        """Upload the output files and store the result, fenced by the attempt."""
        job_id, attempt = job.job_id, job.attempts
        progress.report("upload")  # written at once: a cancellation requested by now uploads nothing
        checkpoint.check()
        outputs = self._upload(job, output, checkpoint, progress)
        result = {**output.result, "attempt": attempt, "outputs": outputs}
        if self._jobs.succeed(job_id, attempt, result) is None:
            current = self._jobs.get(job_id)
            if current is not None and current.attempts == attempt and current.cancel_requested_at is not None:
                self._discard(job, f"cancellation requested after attempt {attempt}'s last checkpoint")
            raise AttemptLost(f"attempt {attempt} of job {job_id} was superseded before its result was stored")
        return Outcome.SUCCEEDED

    def _upload(self, job: Job, output: AnalysisOutput, checkpoint: Checkpoint, reporter: Reporter) -> dict[str, str]:
        """Upload the files, at most :data:`UPLOADS` at a time; report (a checkpoint) as each one completes but the
        last, and check every :data:`POLL` seconds meanwhile. Whatever stops it, nothing is still uploading when it
        returns or raises, except after :class:`Interrupted` (a forced shutdown, the time limit): the uploads under
        way are left to finish on their own."""
        if not output.files:
            return {}
        outputs: dict[str, str] = {}
        count = len(output.files)
        waiting = list(output.files.items())
        running: dict[Future[str], str] = {}
        try:
            while waiting or running:
                while waiting and len(running) < UPLOADS:
                    key, (path, content_type) = waiting.pop(0)
                    put = functools.partial(self._store.put_result, job.job_id, job.attempts, path.name, path,
                                            content_type)  # fmt: skip
                    running[_background(put, f"upload-{job.job_id}-{key}")] = key
                done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
                for future in done:
                    outputs[running.pop(future)] = future.result()
                if done and (waiting or running):
                    reporter.report("upload", len(outputs) / count)
                elif not done:
                    checkpoint.check()
        except BaseException as e:
            if not isinstance(e, Interrupted):
                wait(running)  # those under way end before it raises (a cancelled attempt's are then deleted)
            if isinstance(e, Cancelled):
                self._discard(job, str(e))
            raise
        return {key: outputs[key] for key in output.files}  # in the analysis' order, whatever the uploads' was

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


def _background(call: Callable[[], T], name: str) -> Future[T]:
    """``call()`` in a daemon thread of its own (one a stage need not wait for: see the module docstring)."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
