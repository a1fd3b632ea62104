"""Inputs by reference against a real Azurite: the upload SAS, the ranged header check, the worker's GDAL path and
its ETag pin (issue 12)."""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient

from cli.upload import put_blocks
from gpu_worker.handler import JobHandler, Prepared
from shared.by_reference import find
from shared.errors import InputMissing
from shared.geotiff import Limits
from shared.inputs import InputChanged, Reference, gdal_path, upload_blob_name
from shared.jobs import JobStatus
from shared.ranged import copy_to
from shared.rejection import Rejected
from shared.storage import BlobStore
from tests import geotiffs
from tests.fakes import InMemoryJobStore
from tests.integration.test_storage import store_for
from tests.jobs import job_record

pytestmark = pytest.mark.integration

LIMITS = Limits(1 << 30, 130_000_000, 32)


@pytest.fixture
def store(blob_connection_string: str) -> Iterator[BlobStore]:
    store = store_for(blob_connection_string)
    store.ensure_containers()
    yield store
    store.close()


def upload(store: BlobStore, data: bytes) -> uuid.UUID:
    upload_id = uuid.uuid4()
    url, _ = store.upload_url(upload_blob_name(upload_id), timedelta(minutes=5))
    BlobClient.from_blob_url(url).upload_blob(data, max_concurrency=4)
    return upload_id


def test_the_upload_url_writes_that_blob_only(store: BlobStore) -> None:
    upload_id = upload(store, geotiffs.real(geotiffs.RGBN))
    url, expires = store.upload_url(upload_blob_name(upload_id), timedelta(minutes=5))
    assert "sp=cw" in url
    assert expires > expires.now(expires.tzinfo)
    assert httpx.get(url).status_code == 403  # write-only: not even its own blob can be read
    other = url.replace(str(upload_id), str(uuid.uuid4())).replace("input.tif", "other.tif")
    with pytest.raises(HttpResponseError):  # scoped to the blob: the signature names it
        BlobClient.from_blob_url(other).upload_blob(b"x")


def test_an_upload_is_checked_by_ranged_reads(store: BlobStore) -> None:
    data = geotiffs.crafted(width=2000, height=2000)  # 32 MB, the header in the first chunk
    upload_id = upload(store, data)
    found = find(str(upload_id), None, store, LIMITS, ())
    assert found.header.count == 4
    assert found.header.width == 2000
    assert found.reference.kind == "upload"
    assert found.reference.size == len(data)
    assert found.reference.location == upload_blob_name(upload_id)
    assert found.requests == 1
    assert found.read_bytes == 64 * 1024


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not a tiff at all", "not_a_tiff"),
        (geotiffs.crafted(width=256, height=256)[:3000], "truncated_image"),
        (geotiffs.crafted(count=40, descriptions=None), "too_many_bands"),
    ],
)
def test_a_bad_upload_gets_the_same_codes_as_a_body(store: BlobStore, data: bytes, code: str) -> None:
    upload_id = upload(store, data)
    with pytest.raises(Rejected) as caught:
        find(str(upload_id), None, store, LIMITS, ())
    assert caught.value.code == code


def test_missing_uploads_and_blobs_are_refused(store: BlobStore) -> None:
    with pytest.raises(Rejected) as caught:
        find(str(uuid.uuid4()), None, store, LIMITS, ())
    assert caught.value.code == "upload_not_found"
    with pytest.raises(Rejected) as caught:
        find(None, store.input_url("nowhere/input.tif"), store, LIMITS, ())
    assert caught.value.code == "image_unreachable"
    with pytest.raises(Rejected) as caught:
        find(None, "https://example.com/scene.tif", store, LIMITS, ("other.example.org",))
    assert caught.value.code == "image_url_not_allowed"


def test_an_own_blob_url_is_read_with_our_identity(store: BlobStore) -> None:
    data = geotiffs.real(geotiffs.RGBN)
    upload_id = upload(store, data)
    url = store.input_url(upload_blob_name(upload_id)) + "?sv=ignored&sig=whatever"
    found = find(None, url, store, LIMITS, ())
    assert found.reference.kind == "blob"
    assert found.reference.location == upload_blob_name(upload_id)


class NoAnalysis:
    def analyse(self, image_path: Path, request: object, workdir: Path) -> object:
        raise AssertionError("not called")


class Quiet:
    def check(self) -> None: ...

    def report(self, stage: str, fraction: float = 0.0) -> None: ...


def prepare(store: BlobStore, reference: Reference, *, copy: bool = False) -> Prepared:
    """The worker's prepare stage of a whole-scene job on ``reference``: the blob read by ranges through GDAL's
    ``/vsicurl/`` (as a field job reads it), or with ``copy`` copied to the work directory first (as a whole-scene
    job is when the disk has room)."""
    handler = JobHandler(InMemoryJobStore(), store, NoAnalysis(), remote=store, copy_inputs=copy)  # type: ignore[arg-type]
    job = job_record(status=JobStatus.RUNNING, params={"bands": [], "scale": 1.0, "analysis": "crop-health",
                                                       "input": reference.params()})  # fmt: skip
    return handler.prepare(job, Quiet(), Quiet())


def test_the_worker_reads_a_blob_through_vsicurl_pinned_to_its_etag(store: BlobStore) -> None:
    data = geotiffs.real(geotiffs.RGBN)
    upload_id = upload(store, data)
    found = find(str(upload_id), None, store, LIMITS, ())
    prepared = prepare(store, found.reference)
    try:
        image = prepared.image
        assert str(image).startswith("/vsicurl?")
        assert "etag%3D" in str(image)  # the version in the URL (GDAL's cache key): the service ignores it
        with rasterio.open(image) as ds, rasterio.open(geotiffs.RGBN) as expected:
            assert np.array_equal(ds.read(), expected.read())
    finally:
        prepared.close()

    # overwritten after the submit: the worker refuses it before reading (input_changed) ...
    blob = store._service.get_blob_client(store.images_container, found.reference.location)
    blob.upload_blob(geotiffs.real(geotiffs.FIELDS), overwrite=True)
    with pytest.raises(InputChanged):
        prepare(store, found.reference)
    # ... and GDAL's own reads carry If-Match with the ETag of the submit: a changed file is never read
    url = store.read_url(store.input_url(found.reference.location), timedelta(minutes=7))  # not in GDAL's cache
    with tempfile.TemporaryDirectory() as directory:
        headers = Path(directory) / "headers"
        headers.write_text(f"If-Match: {found.reference.etag}\r\n")
        with pytest.raises(rasterio.errors.RasterioIOError):
            rasterio.open(gdal_path(url, header_file=headers))
        headers.write_text(f"If-Match: {blob.get_blob_properties().etag}\r\n")
        url = store.read_url(store.input_url(found.reference.location), timedelta(minutes=8))  # GDAL remembers a 412
        with rasterio.open(gdal_path(url, header_file=headers)) as ds:  # the same read, pinned to the new ETag
            assert ds.count == 13


def test_a_whole_scene_job_copies_the_blob_pinned_to_its_etag(store: BlobStore, tmp_path: Path) -> None:
    data = geotiffs.real(geotiffs.RGBN)
    upload_id = upload(store, data)
    reference = find(str(upload_id), None, store, LIMITS, ()).reference
    prepared = prepare(store, reference, copy=True)
    try:
        assert prepared.remote is None
        assert prepared.image == prepared.workdir / "input.tif"
        assert prepared.image.read_bytes() == data
    finally:
        prepared.close()

    # the version changes between the check and the copy: every range's If-Match refuses it
    pinned = store.open_input(reference.location, reference.etag)
    blob = store._service.get_blob_client(store.images_container, reference.location)
    blob.upload_blob(geotiffs.real(geotiffs.FIELDS), overwrite=True)
    with pytest.raises(InputChanged):
        copy_to(pinned, tmp_path / "copy.tif", threading.Event())
    # ... and a job accepted with the old version is refused before its copy begins
    with pytest.raises(InputChanged):
        prepare(store, reference, copy=True)
    blob.delete_blob()
    with pytest.raises(InputMissing):
        prepare(store, reference, copy=True)


def test_a_new_version_of_a_blob_is_never_read_from_gdals_cache(store: BlobStore) -> None:
    """Job 1 reads the blob (v1) through /vsicurl/; it is overwritten; job 2, accepted with v2, reads v2's pixels,
    not what GDAL's process-wide cache holds of v1 (the two read SAS URLs can be the very same string)."""
    upload_id = upload(store, geotiffs.real(geotiffs.RGBN))
    first = find(str(upload_id), None, store, LIMITS, ()).reference
    before = prepare(store, first)
    try:
        with rasterio.open(before.image) as ds:
            old = ds.read()
    finally:
        before.close()
    blob = store._service.get_blob_client(store.images_container, first.location)
    newer = geotiffs.crafted(width=old.shape[2], height=old.shape[1], count=old.shape[0])
    blob.upload_blob(newer, overwrite=True)
    second = find(str(upload_id), None, store, LIMITS, ()).reference
    after = prepare(store, second)
    try:
        with rasterio.open(after.image) as ds, rasterio.MemoryFile(newer) as mem, mem.open() as expected:
            assert np.array_equal(ds.read(), expected.read())
    finally:
        after.close()


def test_the_cli_block_upload_commits_the_file(store: BlobStore, tmp_path: Path) -> None:
    path = tmp_path / "scene.tif"
    path.write_bytes(geotiffs.crafted(width=600, height=600))  # 2.9 MB: 6 blocks of 512 KiB, 3 at a time
    upload_id = uuid.uuid4()
    url, _ = store.upload_url(upload_blob_name(upload_id), timedelta(minutes=5))
    with httpx.Client() as client:
        assert put_blocks(client, url, path, block_size=512 * 1024, concurrency=3) == path.stat().st_size
    found = find(str(upload_id), None, store, LIMITS, ())
    assert found.reference.size == path.stat().st_size
    blob = store._service.get_blob_client(store.images_container, upload_blob_name(upload_id))
    assert blob.download_blob().readall() == path.read_bytes()
    assert blob.get_blob_properties().content_settings.content_type == "image/tiff"
