"""An outside ``image_url`` through the worker (prepare, analyse) against local http servers: every read goes to the
address the SSRF guard checked, through rasterio's opener, never through GDAL's /vsicurl/ (which resolves the host
itself, follows redirects and keeps a process-wide cache). The servers are http://127.0.0.1, which the guard refuses:
the handler is built with ``allow_private_urls=True`` and the host on its allow-list."""

from __future__ import annotations

import errno
import http.server
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

from gpu_worker import handler, remote
from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer
from gpu_worker.handler import JobHandler
from gpu_worker.remote import PinnedUrl
from gpu_worker.settlement import Cancelled, is_transient
from shared import ranged
from shared.errors import InputMissing, InvalidImage
from shared.http_range import RangeRefused, connection_pool
from shared.inputs import InputChanged, InputNotAllowed, InputRefused, Reference, SourceUnavailable, gdal_path
from shared.jobs import JobStatus
from shared.ranged import CHUNK, Chunks
from tests import geotiffs
from tests.checkpoints import StopsAt
from tests.fakes import InMemoryBlobStore, InMemoryJobStore
from tests.http_server import LoopbackServer
from tests.jobs import job_record

# 4 bands of 1024 x 1024 (random: 8 MB), 256 px DEFLATE tiles.
DATA = geotiffs.crafted(width=1024, height=1024, tiled=True, blockxsize=256, blockysize=256, compress="deflate")


class UrlServer:
    """One file by ranges with an ETag and If-Match, as a COG host serves it (416 past the end). ``redirect``: a URL
    that HEAD requests (GDAL's first) are sent to with a 302, and GET requests too after GET ``redirect_after``;
    ``status``: answered instead of the file after GET ``fail_after``, up to GET ``fail_until``; ``delay``: seconds
    each GET waits. ``requests``: (method, Range) of each request."""

    def __init__(self, data: bytes, etag: str = '"v1"') -> None:
        server = self
        self.data, self.etag = data, etag
        self.requests: list[tuple[str, str | None]] = []
        self.redirect: str | None = None
        self.redirect_after = 10**9
        self.status, self.fail_after, self.fail_until = 0, 10**9, 10**9
        self.delay = 0.0  # seconds each GET waits before it answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None: ...

            def reply(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
                self.send_response(code)
                for k, v in (headers | {"Content-Length": str(len(body))}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                server.requests.append(("HEAD", None))
                if server.redirect is not None:
                    return self.reply(302, {"Location": server.redirect})
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.send_header("ETag", server.etag)
                self.end_headers()

            def do_GET(self) -> None:
                server.requests.append(("GET", self.headers.get("Range")))
                time.sleep(server.delay)
                gets = sum(1 for method, _ in server.requests if method == "GET")
                if server.redirect is not None and gets > server.redirect_after:
                    return self.reply(302, {"Location": server.redirect})
                if server.fail_after < gets <= server.fail_until:
                    return self.reply(server.status, {})
                if self.headers.get("If-Match", server.etag) != server.etag:
                    return self.reply(412, {})
                first, last = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
                if first >= len(server.data):
                    return self.reply(416, {"Content-Range": f"bytes */{len(server.data)}"})
                body = server.data[first : last + 1]
                self.reply(206, {"Content-Range": f"bytes {first}-{first + len(body) - 1}/{len(server.data)}",
                                 "ETag": server.etag}, body)  # fmt: skip

        self._httpd = LoopbackServer(Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/scene.tif"

    @property
    def gets(self) -> int:
        return sum(1 for method, _ in self.requests if method == "GET")

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker tries a read that failed on the network again, a second apart: only once here, at once."""
    monkeypatch.setattr(remote, "RETRIES", 1)
    monkeypatch.setattr(remote, "RETRY_DELAY", 0.0)


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(torch.device("cpu"), threads=1)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[UrlServer] = []

    def start(data: bytes = DATA, etag: str = '"v1"') -> UrlServer:
        servers.append(UrlServer(data, etag))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class NoAnalysis:
    def analyse(self, image_path: Path, request: object, workdir: Path) -> object:
        raise AssertionError("not called")


class Quiet:
    def check(self) -> None: ...

    def report(self, stage: str, fraction: float = 0.0) -> None: ...


def run_job(
    analyzer: Any, url: str, etag: str = '"v1"', size: int = len(DATA), copy: bool = False, **handler: Any
) -> AnalysisOutput:
    """The worker's prepare and analyse stages of a whole-scene job on ``url`` (pinned to ``etag`` and ``size``):
    read by ranges during the analysis, as a field job reads it, or with ``copy`` copied to the work directory first,
    as a whole-scene job is when the disk has room (``copy_inputs``)."""
    kwargs = {"allowed_hosts": ("127.0.0.1",), "allow_private_urls": True, "copy_inputs": copy} | handler
    worker = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), analyzer, **kwargs)  # type: ignore[arg-type]
    reference = Reference("url", url, etag, size)
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 10000.0, "analysis": "crop-health",
                                                "input": reference.params()})  # fmt: skip
    prepared = worker.prepare(job, Quiet(), Quiet())
    try:
        if copy:
            assert prepared.remote is None
            assert prepared.image.stat().st_size == size
        else:
            assert prepared.remote is not None
            assert prepared.remote.opener is not None  # never a /vsicurl/ path
        return worker.analyse(job, prepared, Quiet())
    finally:
        prepared.close()


def bytes_sent(server: UrlServer) -> int:
    """The bytes of the file the server's range requests asked for."""
    total = 0
    for _, asked in server.requests:
        first, last = (int(v) for v in (asked or "bytes=0-0").removeprefix("bytes=").split("-"))
        total += min(last, len(server.data) - 1) - first + 1
    return total


def local(data: bytes, analyzer: Analyzer, tmp_path: Path) -> AnalysisOutput:
    path = tmp_path / "local.tif"
    path.write_bytes(data)
    (tmp_path / "local").mkdir(exist_ok=True)
    return analyzer.analyse(path, AnalysisRequest("crop-health", [], 10000.0), tmp_path / "local")


def test_an_outside_url_is_analysed_through_the_pinned_reads(analyzer: Analyzer, serve: Any, tmp_path: Path) -> None:
    server = serve()
    out = run_job(analyzer, server.url)
    assert out.result["indices"] == local(DATA, analyzer, tmp_path).result["indices"]
    assert all(method == "GET" for method, _ in server.requests)  # no HEAD: GDAL's /vsicurl/ never saw it
    assert server.gets <= 12  # read ahead in file order: 8 MB in a few requests, not one per 64 KiB or per tile


def test_a_whole_scene_job_copies_the_file_once_in_large_ranges(
    analyzer: Analyzer, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By ranges, the analysis' two passes each read every tile: the file crosses the network about twice. Copied
    first, it crosses once, in COPY_RANGE ranges, and the result is the same."""
    monkeypatch.setattr(ranged, "COPY_RANGE", 3 * 1024 * 1024)  # three ranges of the 8 MB file
    monkeypatch.setattr(remote, "HELD_BYTES", 1024 * 1024)  # read by ranges, as a scene larger than what they hold
    by_range_server, copied = serve(), serve()
    by_ranges = run_job(analyzer, by_range_server.url)
    by_copy = run_job(analyzer, copied.url, copy=True)
    assert by_copy.result["indices"] == by_ranges.result["indices"] == local(DATA, analyzer, tmp_path).result["indices"]
    # the first range checks the ETag and size (open_pinned), then the copy: the file once
    assert len(DATA) < bytes_sent(copied) <= len(DATA) + 64 * 1024
    assert copied.gets == 1 + -(-len(DATA) // (3 * 1024 * 1024))
    assert bytes_sent(by_range_server) > 1.5 * len(DATA)


def test_only_a_whole_scene_job_with_room_on_the_disk_is_copied(serve: Any, tmp_path: Path) -> None:
    """A job with fields reads a few percent of the file by ranges; a disk that would keep less free than the file
    after the copy leaves the whole-scene job to read by ranges too."""
    server = serve()
    reference = Reference("url", server.url, '"v1"', len(DATA))
    params = {"bands": [], "scale": 10000.0, "analysis": "crop-health", "input": reference.params()}
    field = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}

    def prepared_remotely(free: int, **extra: Any) -> bool:
        worker = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), NoAnalysis(), allowed_hosts=("127.0.0.1",),  # type: ignore[arg-type]
                            allow_private_urls=True, disk_free=lambda path: free)  # fmt: skip
        prepared = worker.prepare(job_record(JobStatus.RUNNING, params=params | extra), Quiet(), Quiet())
        try:
            return prepared.remote is not None
        finally:
            prepared.close()

    assert not prepared_remotely(2 * len(DATA))
    assert prepared_remotely(2 * len(DATA) - 1)
    assert prepared_remotely(10 * len(DATA), fields=field)


def test_a_cancellation_stops_the_copy_at_the_next_checkpoint(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy runs in a thread of its own while the stage checks the attempt every POLL seconds: a cancellation
    stops the stage there, its work directory is removed, and the copy begins no range after it (those under way
    end): it does not go on reading a file nobody will analyse."""
    monkeypatch.setattr(ranged, "COPY_RANGE", 512 * 1024)  # 15 ranges, 4 at a time, 0.2 s each
    monkeypatch.setattr(handler, "POLL", 0.01)
    server = serve()
    server.delay = 0.2

    worker = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), NoAnalysis(), tmp_dir=tmp_path,  # type: ignore[arg-type]
                        allowed_hosts=("127.0.0.1",), allow_private_urls=True)  # fmt: skip
    reference = Reference("url", server.url, '"v1"', len(DATA))
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 10000.0, "analysis": "crop-health",
                                                "input": reference.params()})  # fmt: skip
    with pytest.raises(Cancelled):
        worker.prepare(job, StopsAt(2, Cancelled("cancellation requested")), Quiet())
    assert list(tmp_path.iterdir()) == []
    for thread in threading.enumerate():
        if thread.name == f"copy-{job.job_id}":
            thread.join(timeout=30)
            assert not thread.is_alive()
    ranges = -(-len(DATA) // (512 * 1024))
    assert server.gets <= 1 + ranged.COPY_THREADS < 1 + ranges  # the first range, then those under way


def test_a_disk_that_fills_up_during_the_copy_leaves_the_job_to_read_by_ranges(
    analyzer: Analyzer, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room counted before the copy is no promise (other worker processes share the disk): a copy that runs out
    of it part way is dropped (the partial file removed), and the analysis reads the file by ranges instead."""
    monkeypatch.setattr(ranged, "COPY_RANGE", 1024 * 1024)
    writes: list[int] = []
    write_at = ranged._write_at

    def filling(fd: int, data: bytes, offset: int) -> None:
        writes.append(offset)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_at(fd, data, offset)

    monkeypatch.setattr(ranged, "_write_at", filling)
    server = serve()
    worker = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), analyzer, allowed_hosts=("127.0.0.1",),  # type: ignore[arg-type]
                        allow_private_urls=True, disk_free=lambda path: 10 * len(DATA))  # fmt: skip
    reference = Reference("url", server.url, '"v1"', len(DATA))
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 10000.0, "analysis": "crop-health",
                                                "input": reference.params()})  # fmt: skip
    prepared = worker.prepare(job, Quiet(), Quiet())
    try:
        assert len(writes) >= 3  # two ranges written, the third one found the disk full
        assert prepared.remote is not None
        assert not (prepared.workdir / "input.tif").exists()
        out = worker.analyse(job, prepared, Quiet())
    finally:
        prepared.close()
    assert out.result["indices"] == local(DATA, analyzer, tmp_path).result["indices"]


def test_a_scene_of_several_windows_is_decoded_in_the_background(
    analyzer: Analyzer, serve: Any, tmp_path: Path
) -> None:
    """Two windows (1024 px each): the next one is decoded in a thread of its own, where rasterio must still find
    the opener (a context variable) when GDAL looks the file up."""
    data = geotiffs.crafted(width=1024, height=1100, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    server = serve(data)
    out = run_job(analyzer, server.url, size=len(data))
    assert out.result["indices"] == local(data, analyzer, tmp_path).result["indices"]


def test_gdal_would_follow_a_redirect_the_worker_never_does(analyzer: Analyzer, serve: Any) -> None:
    """The allow-listed host answers GDAL-style requests (its first is a HEAD) with a 302 to another address (an
    internal one in an attack: 127.0.0.1, 168.63.129.16): the job reads the file from the checked address, and the
    other server is never contacted."""
    internal = serve()
    server = serve()
    server.redirect = internal.url
    with rasterio.open(gdal_path(server.url + "?control")) as ds:  # what /vsicurl/ did: it follows the HEAD's 302
        assert ds.width == 1024
    assert internal.requests, "GDAL followed the redirect"
    internal.requests.clear()

    assert run_job(analyzer, server.url).result["valid_fraction"] == 1.0
    assert internal.requests == []


@pytest.mark.parametrize("copy", [False, True], ids=["by-ranges", "copied"])
def test_a_redirect_mid_read_fails_the_job_permanently(analyzer: Analyzer, serve: Any, copy: bool) -> None:
    internal = serve()
    server = serve()
    server.redirect, server.redirect_after = internal.url, 1  # the first range answers, then 302s
    with pytest.raises(InputRefused) as caught:
        run_job(analyzer, server.url, copy=copy)
    assert (caught.value.code, is_transient(caught.value)) == ("input_refused", False)
    assert internal.requests == []


def test_a_changed_file_is_never_read_from_a_cache(analyzer: Analyzer, serve: Any, tmp_path: Path) -> None:
    """Job 1 reads the URL at v1; the file is replaced (v2, other pixels); job 2, accepted with v2, reads v2 (and
    a job still pinned to v1 fails input_changed), never v1's bytes from a process-wide cache."""
    server = serve()
    first = run_job(analyzer, server.url)
    control = gdal_path(server.url + "?control")
    with rasterio.open(control) as ds:  # what /vsicurl/ did: it keeps v1 ...
        assert ds.height == 1024
    newer = geotiffs.crafted(width=1024, height=768, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    server.data, server.etag = newer, '"v2"'
    gets = server.gets
    with rasterio.open(control) as ds:  # ... and serves it for the same URL after the file changed, unasked
        assert (ds.height, server.gets) == (1024, gets)
    gets = server.gets
    second = run_job(analyzer, server.url, '"v2"', len(newer))
    assert server.gets > gets + 1  # the pixels were read again, not only the first range
    assert second.result["indices"] == local(newer, analyzer, tmp_path).result["indices"]
    assert second.result["indices"] != first.result["indices"]
    with pytest.raises(InputChanged):
        run_job(analyzer, server.url, '"v1"', len(DATA))


@pytest.mark.parametrize("copy", [False, True], ids=["by-ranges", "copied"])
def test_a_file_replaced_mid_read_is_input_changed(analyzer: Analyzer, serve: Any, copy: bool) -> None:
    server = serve()
    server.status, server.fail_after = 412, 1
    with pytest.raises(InputChanged):
        run_job(analyzer, server.url, copy=copy)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (404, InputMissing, "input_missing"),
        (410, InputMissing, "input_missing"),
        (403, InputRefused, "input_refused"),
        (200, InputRefused, "input_refused"),  # no longer answers ranges
        (503, SourceUnavailable, "image_unreachable"),
    ],
)
@pytest.mark.parametrize("after", [0, 1], ids=["before-the-job", "mid-read"])
@pytest.mark.parametrize("copy", [False, True], ids=["by-ranges", "copied"])
def test_a_failed_read_is_the_jobs_error(
    analyzer: Analyzer, serve: Any, status: int, error: type[Exception], code: str, after: int, copy: bool
) -> None:
    """Deleted (404) before the job ran or while it read: ``input_missing``, permanent, not retried
    JOB_MAX_ATTEMPTS times; a 503 stays transient."""
    server = serve()
    server.status, server.fail_after = status, after
    with pytest.raises(error) as caught:
        run_job(analyzer, server.url, copy=copy)
    assert caught.value.code == code  # type: ignore[attr-defined]
    assert is_transient(caught.value) is (status == 503)


@pytest.mark.parametrize("copy", [False, True], ids=["by-ranges", "copied"])
def test_a_passing_network_failure_is_tried_again(analyzer: Analyzer, serve: Any, copy: bool) -> None:
    server = serve()
    server.status, server.fail_after = 503, 1
    server.fail_until = 2  # one 503, then the file again
    assert run_job(analyzer, server.url, copy=copy).result["valid_fraction"] == 1.0


def test_a_size_that_differs_is_input_changed(analyzer: Analyzer, serve: Any) -> None:
    server = serve()
    with pytest.raises(InputChanged):
        run_job(analyzer, server.url, size=len(DATA) - 1)


def test_the_ssrf_guard_holds_in_the_worker(analyzer: Analyzer, serve: Any) -> None:
    """Without the test allowance, a host that resolves to a non-public address (or plain http) is refused before
    a byte is read; a host no longer on the allow-list too: ``image_url_not_allowed``, permanent."""
    server = serve()
    with pytest.raises(InputNotAllowed) as caught:
        run_job(analyzer, server.url, allow_private_urls=False)
    assert caught.value.code == "image_url_not_allowed"
    with pytest.raises(InputNotAllowed):
        run_job(analyzer, server.url, allowed_hosts=("data.example.org",))
    assert server.requests == []


def corrupt(data: bytes, what: str) -> bytes:
    """``data`` with its first tile's DEFLATE stream garbled, or its tile offsets array (tag 324) said to lie past
    the end of the file (a corrupt directory)."""
    out = bytearray(data)
    if what == "tile":
        with rasterio.MemoryFile(data) as mem, mem.open() as ds:
            offset = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        out[offset : offset + 64] = bytes(range(64))
        return bytes(out)
    assert out[:4] == b"II*\x00"
    ifd = struct.unpack("<I", out[4:8])[0]
    for n in range(struct.unpack("<H", out[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * n
        if struct.unpack("<H", out[entry : entry + 2])[0] == 324:
            out[entry + 8 : entry + 12] = struct.pack("<I", len(out) + 4096)
            return bytes(out)
    raise AssertionError("no TileOffsets")


@pytest.mark.parametrize("what", ["tile", "directory"])
def test_a_corrupt_remote_file_is_invalid_image_not_transient(analyzer: Analyzer, serve: Any, what: str) -> None:
    """Every byte arrives, but the file does not decode: permanent, as for a local file, never a retry loop."""
    data = corrupt(DATA, what)
    server = serve(data)
    with pytest.raises(InvalidImage) as caught:
        run_job(analyzer, server.url, size=len(data))
    assert not is_transient(caught.value)


def test_reads_are_bounded_and_read_ahead_in_file_order() -> None:
    class Memory:
        etag, reads = '"v1"', 0

        def __init__(self, data: bytes) -> None:
            self.data = data

        @property
        def size(self) -> int:
            return len(self.data)

        def read(self, offset: int, length: int) -> bytes:
            self.reads += 1
            return self.data[offset : offset + length]

    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    source = Memory(data)
    chunks = Chunks(source, CHUNK, limit=8 * CHUNK, ahead=8)
    for start in range(0, len(data), 10_000):  # through the file in order, as GDAL reads a scene
        assert chunks.range(start, min(len(data), start + 10_000)) == data[start : start + 10_000]
    assert source.reads <= 12  # 64 chunks: 1 + 2 + 4 + 8 + 8 + ...
    assert len(chunks._held) <= 8  # never more than the limit held
    assert chunks.range(0, 100) == data[:100]  # dropped, fetched again


def test_an_http_status_is_told_apart(serve: Any) -> None:
    server = serve()
    server.status, server.fail_after = 404, 1
    with connection_pool() as pool:
        source = PinnedUrl(server.url, pool, allow_private=True)
        with pytest.raises(InputMissing) as caught:
            source.read(10 * CHUNK, 100)
    assert isinstance(caught.value.__cause__, RangeRefused)
    assert caught.value.__cause__.status == 404


def test_the_pinned_read_costs_little_more_than_vsicurl(analyzer: Analyzer, serve: Any) -> None:
    """A whole-scene read through the opener against /vsicurl/ on the same server (docs/lifecycle.md, "Cost")."""
    server = serve()
    started = time.perf_counter()
    with rasterio.open(gdal_path(server.url + "?vsicurl")) as ds:
        expected = ds.read()
    vsicurl = time.perf_counter() - started, len(server.requests)
    server.requests.clear()
    with connection_pool() as pool:
        source = PinnedUrl(server.url, pool, allow_private=True)
        started = time.perf_counter()
        with rasterio.open("/pinned/input.tif", opener=source.opener()) as ds:
            assert np.array_equal(ds.read(), expected)
    pinned = time.perf_counter() - started, len(server.requests)
    print(f"whole scene {len(DATA)} bytes: /vsicurl/ {vsicurl[0]:.3f} s {vsicurl[1]} requests, "
          f"opener {pinned[0]:.3f} s {pinned[1]} requests")  # fmt: skip
    assert pinned[1] <= max(12, 2 * vsicurl[1])
