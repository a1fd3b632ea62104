"""Inputs by reference (issue 12), in memory: the URL guard, the reference a job records, the ranged header check,
the JSON body of a submit, the submit use case, the worker's ETag check and the CLI's block upload."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import azure.functions as func
import httpx
import pytest

from cli.upload import put_blocks
from functions.submit import by_reference
from gpu_worker import handler as handler_module
from gpu_worker.handler import JobHandler
from gpu_worker.settlement import Cancelled
from shared import ranged
from shared.by_reference import Found, find
from shared.errors import InputMissing, StorageUnavailable
from shared.geotiff import Limits
from shared.inputs import (
    InputChanged,
    InputNotAllowed,
    InputRefused,
    Reference,
    SourceUnavailable,
    check_url,
    gdal_path,
    parse_upload_id,
    read_error,
    upload_blob_name,
)
from shared.jobs import IdempotencyConflict, JobStatus
from shared.ranged import CHUNK, Chunks, inspect_source
from shared.rejection import Rejected
from shared.submission import ByReference, submit
from tests import geotiffs
from tests.checkpoints import StopsAt
from tests.fakes import InMemoryBlobStore, InMemoryJobStore, InMemoryPublisher
from tests.http_server import LoopbackServer
from tests.jobs import job_record

LIMITS = Limits(1 << 30, 130_000_000, 32)
ALLOWED = ("data.example.org", "*.cogs.example.net")


class MemorySource:
    """A file read by ranges, as :class:`shared.storage.BlobRange` reads a blob."""

    def __init__(
        self,
        data: bytes,
        etag: str = '"0x1"',
        fail: Exception | None = None,
        modified: datetime | None = None,
        block_blob: bool = True,
    ) -> None:
        self.data, self.etag, self.fail = data, etag, fail
        self.modified, self.block_blob = modified or datetime.now(UTC), block_blob
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


class MemoryInputs:
    """:class:`shared.by_reference.InputSource` over named in-memory files of the images container."""

    def __init__(self, **files: MemorySource) -> None:
        self.files = files

    def open_input(self, blob_name: str, etag: str | None = None) -> MemorySource:
        if blob_name not in self.files:
            raise InputMissing(f"input blob {blob_name} not found")
        source = self.files[blob_name]
        if etag is not None and etag != source.etag:
            raise InputChanged("changed")
        return source

    def blob_name(self, url: str) -> str | None:
        base = "http://acct.blob/images/"
        return url.split("?")[0][len(base) :] if url.startswith(base) else None

    def input_url(self, blob_name: str) -> str:
        return f"http://acct.blob/images/{blob_name}"

    def read_url(self, blob_url: str, ttl: timedelta) -> str:
        return f"{blob_url}?sig=x"


# The URL guard


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://data.example.org/a.tif", "image_url_not_allowed"),  # https only
        ("https://user:pw@data.example.org/a.tif", "image_url_not_allowed"),
        ("https://data.example.org/a.tif#frag", "image_url_not_allowed"),
        ("https://example.org/a.tif", "image_url_not_allowed"),  # not on the list
        ("https://cogs.example.net/a.tif", "image_url_not_allowed"),  # *.x allows subdomains only
        ("https://data.example.org.evil.com/a.tif", "image_url_not_allowed"),
        ("ftp://data.example.org/a.tif", "invalid_image_url"),
        ("https://data.example.org:99999/a.tif", "invalid_image_url"),
        ("not a url", "invalid_image_url"),
        (42, "invalid_image_url"),
    ],
)
def test_image_urls_refused(url: object, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        check_url(url, ALLOWED)
    assert caught.value.code == code


@pytest.mark.parametrize("url", ["https://data.example.org/s2/a.tif", "https://eu.cogs.example.net/a.tif?x=1"])
def test_image_urls_allowed(url: str) -> None:
    assert check_url(url, ALLOWED) == url


@pytest.mark.parametrize("value", ["nope", 7, None, "0" * 36])
def test_upload_ids_are_uuids(value: object) -> None:
    with pytest.raises(Rejected) as caught:
        parse_upload_id(value)
    assert caught.value.code == "invalid_upload_id"


def test_a_reference_round_trips_and_its_digest_pins_the_version() -> None:
    ref = Reference("upload", upload_blob_name(uuid.uuid4()), '"0x1"', 10)
    assert Reference.of({"input": ref.params()}) == ref
    assert Reference.of({"bands": []}) is None
    assert len(ref.digest) == 64
    assert ref.digest != Reference(ref.kind, ref.location, '"0x2"', 10).digest


def test_the_gdal_path_keeps_the_url_whole() -> None:
    url = "https://acct.blob.core.windows.net/images/a/input.tif?sv=1&sig=a%2Fb"
    path = gdal_path(url, header_file=Path("/tmp/w/h"))
    assert "//" not in str(path)
    options = parse_qs(str(path).removeprefix("/vsicurl?"))
    assert options["url"] == [url]  # parse_qs decodes once: the SAS's own escapes survive
    assert options["header_file"] == ["/tmp/w/h"]
    assert options["list_dir"] == ["no"]


# The ranged header check


def test_chunks_are_fetched_once_and_aligned() -> None:
    source = MemorySource(bytes(range(256)) * 2048)  # 512 KiB
    chunks = Chunks(source)
    assert chunks.range(10, 20) == source.data[10:20]
    assert chunks.range(CHUNK - 5, CHUNK + 5) == source.data[CHUNK - 5 : CHUNK + 5]
    assert chunks.range(0, 2 * CHUNK) == source.data[: 2 * CHUNK]
    assert source.reads == [(0, CHUNK), (CHUNK, CHUNK)]
    assert (chunks.requests, chunks.fetched) == (2, 2 * CHUNK)


def test_a_large_header_is_read_in_one_chunk() -> None:
    data = geotiffs.crafted(width=2000, height=2000)
    header, chunks = inspect_source(MemorySource(data), LIMITS)
    assert (header.width, header.count, header.descriptions) == (2000, 4, ("B02", "B03", "B04", "B08"))
    assert chunks.fetched == CHUNK
    assert chunks.fetched * 400 < len(data)


@pytest.mark.parametrize(
    ("data", "limits", "code"),
    [
        (b"", LIMITS, "empty_body"),
        (b"GIF89a" + bytes(100), LIMITS, "not_a_tiff"),
        (geotiffs.crafted(), Limits(100, 130_000_000, 32), "payload_too_large"),
        (geotiffs.crafted(width=256, height=256)[:3000], LIMITS, "truncated_image"),
        (geotiffs.crafted(width=64, height=64), Limits(1 << 30, 1000, 32), "image_too_large"),
        (b"II*\x00" + bytes(100), LIMITS, "unreadable_image"),
    ],
)
def test_ranged_checks_give_the_codes_of_a_body(data: bytes, limits: Limits, code: str) -> None:
    with pytest.raises(Rejected) as caught:
        inspect_source(MemorySource(data), limits)
    assert caught.value.code == code


@pytest.mark.parametrize("error", [StorageUnavailable("down"), InputChanged("changed"), InputMissing("gone")])
def test_a_failing_source_is_not_an_unreadable_image(error: Exception) -> None:
    class LateFailure(MemorySource):
        def read(self, offset: int, length: int) -> bytes:
            if self.reads:  # the magic, then nothing: GDAL sees a failed read, the caller the error
                raise error
            return super().read(offset, length)

    with pytest.raises(type(error)):
        inspect_source(LateFailure(geotiffs.crafted()), LIMITS, chunk=16)


# The JSON body and the submit


def request(body: object, params: dict[str, str] | None = None) -> func.HttpRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return func.HttpRequest("POST", "http://h/api/jobs", headers={"Content-Type": "application/json"},
                            params=params or {}, body=raw)  # fmt: skip


def test_the_json_body_takes_names_lists_and_numbers_and_the_query_fills_in() -> None:
    parsed = by_reference(
        request({"upload_id": "u", "bands": ["B02", "B03", "B04", "B08"], "scale": 10000, "geometry": {"a": 1}},
                {"priority": "high", "bands": "ignored"}),
        max_fields=5,
    )  # fmt: skip
    assert (parsed.upload_id, parsed.bands, parsed.scale) == ("u", "B02,B03,B04,B08", "10000")
    assert (parsed.priority, parsed.geometry, parsed.max_fields) == ("high", {"a": 1}, 5)


@pytest.mark.parametrize("body", [b"{not json", [1, 2], "text", {"upload_id": "u", "bogus": 1}, {"scale": True}])
def test_bad_json_bodies(body: object) -> None:
    with pytest.raises(Rejected) as caught:
        by_reference(request(body), max_fields=5)
    assert caught.value.code == "invalid_request_body"


def test_exactly_one_of_upload_id_and_image_url() -> None:
    for upload_id, url in ((None, None), (str(uuid.uuid4()), "http://acct.blob/images/a.tif")):
        with pytest.raises(Rejected) as caught:
            find(upload_id, url, MemoryInputs(), LIMITS, ())
        assert caught.value.code == "invalid_request_body"


class World:
    def __init__(self) -> None:
        self.jobs, self.blobs, self.publisher = InMemoryJobStore(), InMemoryBlobStore(), InMemoryPublisher()
        self.upload_id = uuid.uuid4()
        self.inputs = MemoryInputs(**{upload_blob_name(self.upload_id): MemorySource(geotiffs.real(geotiffs.RGBN))})
        self.found: list[Found] = []

    def find(self, r: ByReference) -> Found:
        found = find(r.upload_id, r.image_url, self.inputs, LIMITS, ALLOWED)
        self.found.append(found)
        return found

    def submit(self, **fields: Any) -> Any:
        return submit(ByReference(**fields), limits=LIMITS, jobs=self.jobs, store=self.blobs,
                      publisher=self.publisher, find=self.find)  # fmt: skip


def test_a_submit_by_upload_records_the_upload_as_the_input_and_stores_nothing() -> None:
    w = World()
    outcome = w.submit(upload_id=str(w.upload_id), idempotency_key="k")
    job = outcome.job
    assert job.status is JobStatus.QUEUED
    assert job.input_blob == upload_blob_name(w.upload_id)
    assert job.params["bands"] == ["B02", "B03", "B04", "B08"]
    assert job.params["input"] == {"kind": "upload", "location": job.input_blob, "etag": '"0x1"',
                                   "size": len(geotiffs.real(geotiffs.RGBN))}  # fmt: skip
    assert w.blobs.blobs == {}
    assert [m.job_id for m in w.publisher.messages] == [job.job_id]

    replay = w.submit(upload_id=str(w.upload_id), idempotency_key="k")
    assert (replay.created, replay.job.job_id) == (False, job.job_id)
    w.inputs.files[job.input_blob].etag = '"0x2"'  # re-uploaded: another file for the same key
    with pytest.raises(IdempotencyConflict):
        w.submit(upload_id=str(w.upload_id), idempotency_key="k")


def test_a_submit_by_own_blob_url_reads_it_in_place() -> None:
    w = World()
    job = w.submit(image_url=f"http://acct.blob/images/{upload_blob_name(w.upload_id)}?sig=theirs").job
    assert (job.params["input"]["kind"], job.input_blob) == ("blob", upload_blob_name(w.upload_id))


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"upload_id": str(uuid.uuid4())}, "upload_not_found"),
        ({"image_url": "http://acct.blob/images/missing.tif"}, "image_unreachable"),
        ({"image_url": "https://elsewhere.example.com/a.tif"}, "image_url_not_allowed"),
        ({"geometry": {"type": "Point", "coordinates": [0, 0]}}, "invalid_geometry"),
    ],
)
def test_refused_references_store_nothing(fields: dict[str, Any], code: str) -> None:
    w = World()
    if "image_url" not in fields:
        fields.setdefault("upload_id", str(w.upload_id))
    with pytest.raises(Rejected) as caught:
        w.submit(**fields)
    assert caught.value.code == code
    assert w.jobs.backlog() == 0
    assert w.publisher.messages == []


# The worker


class Quiet:
    def check(self) -> None: ...

    def report(self, stage: str, fraction: float = 0.0) -> None: ...


def prepare(inputs: MemoryInputs, reference: Reference, allowed: tuple[str, ...] = ()) -> Path:
    """The GDAL path the worker reads a blob by ranges through (as a field job reads it; a whole-scene job copies
    the blob first when the disk has room: tests/unit/test_url_inputs.py, tests/integration)."""
    handler = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), object(), remote=inputs,  # type: ignore[arg-type]
                         allowed_hosts=allowed, copy_inputs=False)  # fmt: skip
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 1.0, "input": reference.params()})
    prepared = handler.prepare(job, Quiet(), Quiet())
    try:
        assert prepared.workdir.joinpath("input.headers").read_bytes() == f"If-Match: {reference.etag}\r\n".encode()
        image = prepared.remote
        assert image is not None
        assert (image.size, image.opener, image.path) == (reference.size, None, prepared.image)
        return image.path
    finally:
        prepared.close()


def test_the_worker_reads_an_unchanged_blob_through_vsicurl() -> None:
    inputs = MemoryInputs(a=MemorySource(b"x" * 10))
    path = prepare(inputs, Reference("blob", "a", '"0x1"', 10))
    url = parse_qs(str(path).removeprefix("/vsicurl?"))["url"][0]
    assert url == "http://acct.blob/images/a?sig=x&etag=%220x1%22"  # the version: a key of its own in GDAL's cache


def test_each_version_of_a_blob_has_its_own_url_in_gdals_cache() -> None:
    """GDAL's /vsicurl/ cache is process-wide, keyed by URL: a job pinned to the blob's new version must not be
    served the old version's bytes a job before it read (the read SAS URL alone can be the same for both: signed in
    the same second, or not signed at all)."""
    inputs = MemoryInputs(a=MemorySource(b"x" * 10))
    first = prepare(inputs, Reference("blob", "a", '"0x1"', 10))
    inputs.files["a"].etag = '"0x2"'
    second = prepare(inputs, Reference("blob", "a", '"0x2"', 10))
    assert first != second


@pytest.mark.parametrize(
    ("reference", "error"),
    [
        (Reference("blob", "a", '"0x2"', 10), InputChanged),
        (Reference("blob", "a", '"0x1"', 11), InputChanged),
        (Reference("blob", "gone", '"0x1"', 10), InputMissing),
        (Reference("url", "https://no-longer-allowed.example.com/a.tif", '"e"', 10), InputNotAllowed),
    ],
)
def test_the_worker_refuses_a_changed_input(reference: Reference, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        prepare(MemoryInputs(a=MemorySource(b"x" * 10)), reference)
    assert not caught.value.transient  # type: ignore[attr-defined]


def test_a_host_no_longer_allowed_is_image_url_not_allowed() -> None:
    reference = Reference("url", "https://no-longer-allowed.example.com/a.tif", '"e"', 10)
    with pytest.raises(InputNotAllowed) as caught:
        prepare(MemoryInputs(), reference, allowed=("other.example.com",))
    assert caught.value.code == "image_url_not_allowed"


@pytest.mark.parametrize(
    ("status", "own", "error"),
    [
        (404, False, InputMissing),
        (410, False, InputMissing),
        (412, False, InputChanged),
        (None, False, SourceUnavailable),  # no answer: a timeout, a reset connection, a short body
        (503, False, SourceUnavailable),
        (500, True, SourceUnavailable),
        (429, False, SourceUnavailable),
        (408, False, SourceUnavailable),
        (403, False, InputRefused),  # an outside file no longer public: retrying cannot help
        (401, False, InputRefused),
        (400, False, InputRefused),
        (200, False, InputRefused),  # a 200 to a range request: the host no longer serves ranges
        (302, False, InputRefused),  # redirects are never followed
        (403, True, SourceUnavailable),  # our own storage refusing our SAS: a role assignment still propagating
        (401, True, SourceUnavailable),
        (404, True, InputMissing),
    ],
)
def test_a_failed_read_fails_the_job_by_its_status(status: int | None, own: bool, error: type[Exception]) -> None:
    failure = read_error(status, "detail", own=own)
    assert type(failure) is error
    assert failure.transient is (error is SourceUnavailable)


# The CLI's block upload


def test_put_blocks_uploads_blocks_in_parallel_then_the_block_list(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes: 3 blocks of 4096
    blocks: dict[str, bytes] = {}
    committed: list[str] = []

    def storage(req: httpx.Request) -> httpx.Response:
        query = parse_qs(req.url.query.decode())
        assert query["sig"] == ["s"]
        if query["comp"] == ["block"]:
            blocks[query["blockid"][0]] = req.content
        else:
            committed.extend(part.split("</Latest>")[0] for part in req.content.decode().split("<Latest>")[1:])
            assert req.headers["x-ms-blob-content-type"] == "image/tiff"
        return httpx.Response(201)

    with httpx.Client(transport=httpx.MockTransport(storage)) as client:
        sent = put_blocks(client, "https://acct/images/uploads/u/input.tif?sig=s", path, block_size=4096)
    assert sent == 10240
    assert len(committed) == 3
    assert b"".join(blocks[i] for i in committed) == path.read_bytes()


def test_submit_above_the_threshold_uploads_then_submits_by_reference(tmp_path: Path) -> None:
    from tests.unit.test_cli import Run, job_json

    path = tmp_path / "scene.tif"
    path.write_bytes(geotiffs.real(geotiffs.RGBN))
    upload_id = str(uuid.uuid4())
    expires = datetime.now(UTC).isoformat()

    def api(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/api/uploads":
            return httpx.Response(201, json={"upload_id": upload_id, "expires_at": expires, "max_bytes": 1 << 33,
                                             "upload_url": f"http://store/images/uploads/{upload_id}/input.tif?sig=s",
                                             "headers": {}})  # fmt: skip
        if req.url.host == "store":
            return httpx.Response(201)
        assert req.url.path == "/api/jobs"
        assert json.loads(req.content) == {"upload_id": upload_id, "priority": "high"}
        view = job_json(JobStatus.QUEUED)
        body = {k: view[k] for k in ("job_id", "status", "priority")} | {"status_url": "http://h/api/jobs/x"}
        return httpx.Response(202, json=body)

    run = Run(api)
    code, _out, err = run("submit", str(path), "--priority", "high", "--upload-above", "1000")
    assert code == 0, err
    assert next(r.url.path for r in run.requests) == "/api/uploads"
    assert run.requests[-1].headers["content-type"] == "application/json"


def test_a_stopped_stage_stops_the_copy_of_a_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-scene job copies its blob in a thread while the stage checks the attempt every POLL seconds. When the
    stage stops (here a cancellation), the copy begins no range after it: nothing else would end it (a blob's
    source has no connection of its own to close) and the input may be gigabytes."""
    monkeypatch.setattr(ranged, "COPY_RANGE", 1000)
    monkeypatch.setattr(handler_module, "POLL", 0.01)

    class SlowSource(MemorySource):
        def read(self, offset: int, length: int) -> bytes:
            time.sleep(0.05)
            return super().read(offset, length)

    source = SlowSource(bytes(100_000))
    worker = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), object(), remote=MemoryInputs(a=source),  # type: ignore[arg-type]
                        tmp_dir=tmp_path)  # fmt: skip
    reference = Reference("blob", "a", '"0x1"', source.size)
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 1.0, "input": reference.params()})
    with pytest.raises(Cancelled):
        worker.prepare(job, StopsAt(2, Cancelled("cancellation requested")), Quiet())
    assert list(tmp_path.iterdir()) == []
    copying = [t for t in threading.enumerate() if t.name == f"copy-{job.job_id}"]
    for thread in copying:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert len(source.reads) <= 2 * ranged.COPY_THREADS < 100  # those under way when it stopped, not all 100


def test_a_read_refused_mid_analysis_because_the_blob_changed_is_input_changed(tmp_path: Path) -> None:
    from shared.errors import InvalidImage

    class RefusedRead:
        def analyse(self, image_path: Path, request: object, workdir: Path) -> object:
            inputs.files["a"].etag = '"0x2"'  # overwritten while GDAL read it: its If-Match read answered 412
            raise InvalidImage("HTTP response code: 412")

    inputs = MemoryInputs(a=MemorySource(b"x" * 10))
    handler = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), RefusedRead(), remote=inputs,  # type: ignore[arg-type]
                         copy_inputs=False)  # fmt: skip
    reference = Reference("blob", "a", '"0x1"', 10)
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 1.0, "analysis": "crop-health",
                                                "input": reference.params()})  # fmt: skip
    prepared = handler.prepare(job, Quiet(), Quiet())
    try:
        with pytest.raises(InputChanged):
            handler.analyse(job, prepared, Quiet())
    finally:
        prepared.close()


def test_a_geometry_is_passed_on_as_the_jobs_fields() -> None:
    w = World()
    square = [[-75.672, 37.718], [-75.671, 37.718], [-75.671, 37.719], [-75.672, 37.719], [-75.672, 37.718]]  # on RGBN
    job = w.submit(upload_id=str(w.upload_id), geometry={"type": "Polygon", "coordinates": [square]}).job
    fields = job.params["fields"]
    assert fields["type"] == "FeatureCollection"
    assert [f["id"] for f in fields["features"]] == ["1"]


class RangeServer:
    """A local http server of one file with Range, ETag and If-Match (a COG host, minus TLS)."""

    def __init__(self, data: bytes, etag: str = '"v1"', ranges: bool = True) -> None:
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None: ...

            def do_GET(self) -> None:
                server.requests.append({k.lower(): v for k, v in self.headers.items()})
                if self.headers.get("If-Match", server.etag) != server.etag:
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
                body = server.data[first : last + 1] if server.ranges else server.data
                self.send_response(206 if server.ranges else 200)
                if server.ranges:
                    self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(server.data)}")
                self.send_header("ETag", server.etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.data, self.etag, self.ranges = data, etag, ranges
        self.requests: list[dict[str, str]] = []
        self._httpd = LoopbackServer(Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/scene.tif"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def test_an_outside_file_is_read_by_ranges_pinned_to_its_etag() -> None:
    from shared.http_range import connection_pool, open_url

    server = RangeServer(geotiffs.crafted(width=2000, height=2000))
    try:
        with connection_pool() as pool:
            source, _first = open_url(server.url, pool, allow_private=True)  # private: a local test server
            header, _chunks = inspect_source(source, LIMITS)
            assert (source.size, source.etag, header.width) == (len(server.data), '"v1"', 2000)
            assert len(server.requests) == 1  # the first 64 KiB held the whole header
            server.etag = '"v2"'  # replaced: a read past what is held carries If-Match and is refused
            with pytest.raises(InputChanged):
                source.read(CHUNK, 100)
        assert server.requests[-1]["if-match"] == '"v1"'
        assert server.requests[0]["host"].startswith("127.0.0.1:")
    finally:
        server.close()


def test_outside_files_are_refused_without_ranges_or_on_private_addresses() -> None:
    from shared.http_range import connection_pool, open_url

    server = RangeServer(b"II*\x00" + bytes(100), ranges=False)
    try:
        with connection_pool() as pool:
            with pytest.raises(Rejected) as caught:
                open_url(server.url, pool, allow_private=True)
            assert caught.value.code == "image_unreachable"
            with pytest.raises(Rejected) as caught:  # the SSRF guard: loopback is not a public address
                open_url(server.url.replace("http:", "https:"), pool)
            assert caught.value.code == "image_url_not_allowed"
        assert len(server.requests) == 1
    finally:
        server.close()


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (
            MemorySource(geotiffs.real(geotiffs.RGBN), modified=datetime.now(UTC) - timedelta(hours=25)),
            "upload_expired",
        ),
        (MemorySource(geotiffs.real(geotiffs.RGBN), block_blob=False), "upload_not_found"),
    ],
)
def test_an_upload_must_be_a_recent_block_blob(source: MemorySource, code: str) -> None:
    """Read in place, an upload expires by the lifecycle rule counted from its last write: one submitted a day later
    could vanish before its job (or a retry) reads it. The write SAS also lets a client create an append or page
    blob, which that rule does not delete."""
    upload_id = uuid.uuid4()
    inputs = MemoryInputs(**{upload_blob_name(upload_id): source})
    with pytest.raises(Rejected) as refused:
        find(str(upload_id), None, inputs, LIMITS, ALLOWED)
    assert refused.value.code == code
    assert source.reads == []  # refused before its header is read
    fresh = MemorySource(geotiffs.real(geotiffs.RGBN), modified=datetime.now(UTC) - timedelta(hours=23))
    assert find(str(upload_id), None, MemoryInputs(**{upload_blob_name(upload_id): fresh}), LIMITS, ALLOWED)
