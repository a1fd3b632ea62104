"""Blobs of our own storage read through GDAL's /vsicurl/ from a local Range/ETag server (as in test_inputs.py) that
fails part-way through the analysis: a network failure is transient (``SourceUnavailable``, retried), a file that does
not decode stays ``invalid_image``, and a file replaced during the read (412 on If-Match) is ``input_changed``.
(Outside URLs never go through /vsicurl/: tests/unit/test_url_inputs.py.)"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import rasterio
import torch

from gpu_worker.analysis import AnalysisRequest, Analyzer, Input
from gpu_worker.analysis.raster import gdal_errors_as_invalid_image
from gpu_worker.handler import JobHandler
from gpu_worker.settlement import is_transient
from shared import inputs
from shared.errors import InvalidImage
from shared.inputs import InputChanged, Reference, SourceUnavailable, gdal_path
from shared.jobs import JobStatus
from tests import geotiffs
from tests.fakes import InMemoryBlobStore, InMemoryJobStore
from tests.http_server import LoopbackServer
from tests.jobs import job_record

# 4 bands of 1024 x 1024 (random: 8 MB), 256 px DEFLATE tiles.
DATA = geotiffs.crafted(width=1024, height=1024, tiled=True, blockxsize=256, blockysize=256, compress="deflate")


class FlakyServer:
    """One file by ranges with an ETag and If-Match; from request ``fail_after`` on, it answers ``status`` (or, with
    ``status`` 0, closes the connection without a reply) ``fails`` times; ``etag_after`` changes the ETag from that
    request on."""

    def __init__(
        self, data: bytes, *, fail_after: int = 10**9, fails: int = 10**9, status: int = 503, etag_after: int = 10**9
    ) -> None:
        server = self
        self.data, self.requests, self.etag_after = data, 0, etag_after

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None: ...

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.send_header("ETag", server.etag)
                self.end_headers()

            def do_GET(self) -> None:
                server.requests += 1
                etag = server.etag
                failing = fail_after < server.requests <= fail_after + fails
                if failing or self.headers.get("If-Match", etag) != etag:
                    code = status if failing else 412
                    if code == 0:
                        self.close_connection = True
                        return
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first, last = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
                body = server.data[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(server.data)}")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = LoopbackServer(Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/scene.tif"

    @property
    def etag(self) -> str:
        return '"v2"' if self.requests > self.etag_after else '"v1"'

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(autouse=True)
def no_gdal_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL's own retries of a 503 (max_retry=3, 1 s apart, growing) would only make the tests slow."""
    monkeypatch.setattr(inputs, "_VSICURL_OPTIONS", inputs._VSICURL_OPTIONS.replace("max_retry=3", "max_retry=0"))


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(torch.device("cpu"), threads=1)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[FlakyServer] = []

    def start(data: bytes = DATA, **kwargs: int) -> FlakyServer:
        servers.append(FlakyServer(data, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def analyse(analyzer: Analyzer, path: Path | FlakyServer, tmp_path: Path) -> Any:
    """Analyse a local file, or the file ``server`` serves as a blob of ours (/vsicurl/, its size pinned)."""
    workdir = tmp_path / "out"
    workdir.mkdir(parents=True, exist_ok=True)
    source = None if isinstance(path, Path) else Input(gdal_path(path.url), len(path.data))
    image = path if isinstance(path, Path) else source.path  # type: ignore[union-attr]
    return analyzer.analyse(image, AnalysisRequest("crop-health", [], 10000.0, source=source), workdir)


def test_a_remote_input_that_answers_is_analysed(analyzer: Analyzer, serve: Any, tmp_path: Path) -> None:
    server = serve()
    out = analyse(analyzer, server, tmp_path)
    assert out.result["valid_fraction"] == 1.0
    assert server.requests >= 2  # the header, then the pixels (GDAL merges and reads ahead)


@pytest.mark.parametrize("status", [503, 500, 429, 0], ids=["503", "500", "429", "connection-closed"])
def test_a_network_failure_mid_read_is_transient(analyzer: Analyzer, serve: Any, tmp_path: Path, status: int) -> None:
    server = serve(fail_after=1, status=status)  # the header read, then the pixels fail
    with pytest.raises(SourceUnavailable, match="over the network") as caught:
        analyse(analyzer, server, tmp_path)
    assert is_transient(caught.value)  # the settlement abandons the message: another attempt reads it again
    assert caught.value.code == "image_unreachable"


def test_gdal_retries_a_passing_failure_itself(
    analyzer: Analyzer, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the worker's options: max_retry=3
    server = serve(fail_after=1, fails=1)
    assert analyse(analyzer, server, tmp_path).result["valid_fraction"] == 1.0
    assert server.requests == 3  # the header, a 503, the same range again


@pytest.mark.parametrize(
    ("message", "error"),
    [  # GDAL 3.10.3's own words (measured against FlakyServer: a 503, 403, 404 or reset connection all read so)
        ("TIFFFillTile:Read error at row 4294967295, col 4294967295, tile 0; got 0 bytes, expected 458942", True),
        ("'/vsicurl?list_dir=no&url=x' not recognized as being in a supported file format.", True),
        ("TIFFReadDirectory:Failed to read directory at offset 5000", True),  # within the file: the network
        ("TIFFReadDirectory:Failed to read directory at offset 99999999", False),  # past its end: a corrupt IFD
        ("TIFFFetchDirectory:Sanity check on directory count failed, this is probably not a valid IFD offset", False),
        ("_TIFFPartialReadStripArray:Cannot read offset/size for strile around ~0", False),
        ("ZIPDecode:Decoding error at scanline 0", False),
        ("HTTP response code: 503", True),
        ("HTTP response code: 403", True),  # our own storage refusing our SAS: transient
        ("HTTP response code: 404", False),  # the worker re-checks the blob: input_missing
    ],
)
def test_only_what_means_the_network_is_transient(message: str, error: bool) -> None:
    from rasterio._err import CPLE_AppDefinedError

    blob = Input(Path("/vsicurl?url=x"), 10000)
    with pytest.raises((InvalidImage, SourceUnavailable)) as caught, gdal_errors_as_invalid_image("read", source=blob):
        raise CPLE_AppDefinedError(1, 1, message)
    assert isinstance(caught.value, SourceUnavailable) is error
    with pytest.raises(InvalidImage), gdal_errors_as_invalid_image("read"):  # a local file: never transient
        raise CPLE_AppDefinedError(1, 1, message)


def test_a_crs_rasterio_cannot_build_is_an_invalid_image() -> None:
    """The submit does not build the CRS of an image without fields: the worker fails the job, never retries it."""
    from rasterio.errors import CRSError

    with pytest.raises(InvalidImage, match="open: bad crs"), gdal_errors_as_invalid_image("open"):
        raise CRSError("bad crs")


def test_a_network_failure_while_opening_is_transient(analyzer: Analyzer, serve: Any, tmp_path: Path) -> None:
    data = geotiffs.real()  # its directory sits at the end of the file: the second read fetches it
    server = serve(data, fail_after=1)
    with pytest.raises(SourceUnavailable):
        analyse(analyzer, server, tmp_path)


def test_a_remote_file_that_does_not_decode_stays_invalid_image(analyzer: Analyzer, serve: Any, tmp_path: Path) -> None:
    """Every byte arrives, but a tile's DEFLATE stream is garbage: a permanent error, as for a local file."""
    local = tmp_path / "scene.tif"
    local.write_bytes(DATA)
    with rasterio.open(local) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    corrupt = bytearray(DATA)
    corrupt[offset : offset + 64] = bytes(range(64))
    server = serve(bytes(corrupt))
    with pytest.raises(InvalidImage) as caught:
        analyse(analyzer, server, tmp_path)
    assert not isinstance(caught.value, SourceUnavailable)
    assert not is_transient(caught.value)
    local.write_bytes(bytes(corrupt))
    with pytest.raises(InvalidImage):  # the same file read locally: the same error class
        analyse(analyzer, local, tmp_path / "local")


class Quiet:
    def check(self) -> None: ...

    def report(self, stage: str, fraction: float = 0.0) -> None: ...


class ServerInputs:
    """:class:`gpu_worker.handler.RemoteInputs` whose blob ``a`` is served by ``server`` (ETag ``"v1"``)."""

    def __init__(self, server: FlakyServer) -> None:
        self.server = server

    def open_input(self, blob_name: str, etag: str | None = None) -> Any:
        if etag is not None and etag != self.server.etag:
            raise InputChanged("changed")
        return type("Source", (), {"size": len(self.server.data), "etag": self.server.etag})()

    def input_url(self, blob_name: str) -> str:
        return self.server.url

    def read_url(self, blob_url: str, ttl: timedelta) -> str:
        return blob_url


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"fail_after": 1}, SourceUnavailable), ({"etag_after": 1}, InputChanged)],
    ids=["503-transient", "412-input-changed"],
)
def test_the_jobs_analysis_by_reference(
    analyzer: Analyzer, serve: Any, kwargs: dict[str, int], error: type[Exception]
) -> None:
    """Through the worker's handler, read by ranges (as a field job reads it; a whole-scene job copies the blob
    first when the disk has room), If-Match sent with every read: a 503 part-way is the transient
    ``SourceUnavailable``; the blob replaced part-way (412) is re-checked and reported ``input_changed``."""
    server = serve(**kwargs)
    handler = JobHandler(InMemoryJobStore(), InMemoryBlobStore(), analyzer, remote=ServerInputs(server),  # type: ignore[arg-type]
                         copy_inputs=False)  # fmt: skip
    reference = Reference("blob", "a", '"v1"', len(DATA))
    job = job_record(JobStatus.RUNNING, params={"bands": [], "scale": 10000.0, "analysis": "crop-health",
                                                "input": reference.params()})  # fmt: skip
    prepared = handler.prepare(job, Quiet(), Quiet())
    try:
        with pytest.raises(error):
            handler.analyse(job, prepared, Quiet())
    finally:
        prepared.close()
