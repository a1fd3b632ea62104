"""BlobStore against a real Azurite: inputs, results, SAS read URLs, and the errors it translates."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import BlobServiceClient

from shared.by_reference import find
from shared.errors import CropAIError, InputMissing, StorageUnavailable
from shared.geotiff import Limits
from shared.jobs import JobStatus
from shared.rejection import Rejected
from shared.settings import Settings
from shared.status import job_view
from shared.storage import BlobStore
from tests import geotiffs
from tests.jobs import job_record

pytestmark = pytest.mark.integration


def store_for(connection_string: str) -> BlobStore:
    suffix = uuid.uuid4().hex[:10]  # containers of their own: Azurite is shared by the session
    settings = Settings.from_env(
        {"AzureWebJobsStorage": connection_string, "ServiceBusConnection": "unused", "DATABASE_URL": "unused",
         "IMAGES_CONTAINER": f"images{suffix}", "RESULTS_CONTAINER": f"results{suffix}"}
    )  # fmt: skip
    return BlobStore.from_settings(settings)


@pytest.fixture
def store(blob_connection_string: str) -> Iterator[BlobStore]:
    store = store_for(blob_connection_string)
    store.ensure_containers()
    store.ensure_containers()  # idempotent
    yield store
    store.close()


def test_input_round_trip_with_sha256_metadata(store: BlobStore, tmp_path: Path) -> None:
    data = geotiffs.real()
    sha = hashlib.sha256(data).hexdigest()
    job_id = uuid.uuid4()
    name = store.put_input(job_id, data, sha)
    assert name == f"{job_id}/input.tif"
    blob = store._service.get_blob_client(store.images_container, name)
    etag = blob.get_blob_properties().etag
    assert store.put_input(job_id, data, sha) == name  # a replay keeps the stored blob: no overwrite under a download
    assert blob.get_blob_properties().etag == etag
    store.download_input(name, tmp_path / "in.tif")
    assert (tmp_path / "in.tif").read_bytes() == data
    assert store.input_sha256(name) == sha


def test_missing_input_is_permanent(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(InputMissing) as info:
        store.download_input(f"{uuid.uuid4()}/input.tif", tmp_path / "in.tif")
    assert not info.value.transient


def test_result_url_is_readable_only_with_its_sas(store: BlobStore, tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    (tmp_path / "q.png").write_bytes(b"\x89PNG fake quicklook")
    url = store.put_result(job_id, 3, "quicklook.png", tmp_path / "q.png", "image/png")
    assert url.endswith(f"/{store.results_container}/{job_id}/3/quicklook.png")
    signed = store.read_url(url, timedelta(minutes=5))
    query = parse_qs(urlsplit(signed).query)
    assert query["sp"] == ["r"]
    assert "se" in query
    assert "sig" in query
    ok = httpx.get(signed)
    assert ok.status_code == 200
    assert ok.content == b"\x89PNG fake quicklook"
    assert ok.headers["content-type"] == "image/png"
    assert httpx.get(url).status_code in (401, 403, 404)  # private container: no anonymous read


def test_foreign_urls_are_not_signed(store: BlobStore) -> None:
    url = "https://elsewhere.blob.core.windows.net/results/x/ndvi.tif"
    assert store.read_url(url, timedelta(minutes=5)) == url


def test_storage_that_is_not_there_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    store = BlobStore(BlobServiceClient.from_connection_string(conn, retry_total=0))  # fail fast, no retries
    with pytest.raises(StorageUnavailable) as info:
        store.put_input(uuid.uuid4(), b"II*\x00", "0" * 64)
    assert info.value.transient


def test_a_missing_container_is_not_the_clients_fault(blob_connection_string: str) -> None:
    store = store_for(blob_connection_string)  # containers never created
    with pytest.raises(StorageUnavailable):
        store.put_input(uuid.uuid4(), b"II*\x00", "0" * 64)
    store.close()


@pytest.mark.parametrize("action", ["download_input", "input_sha256"])
@pytest.mark.parametrize(
    ("containers", "error"),
    [(True, InputMissing), (False, StorageUnavailable)],
    ids=["missing-blob-is-permanent", "missing-container-is-transient"],
)
def test_download_side_missing_blob_versus_missing_container(
    blob_connection_string: str, tmp_path: Path, action: str, containers: bool, error: type[CropAIError]
) -> None:
    """Only BlobNotFound means the input is gone; a wrong IMAGES_CONTAINER must not dead-letter every job."""
    store = store_for(blob_connection_string)
    if containers:
        store.ensure_containers()
    name = f"{uuid.uuid4()}/input.tif"
    args: tuple[object, ...] = (name, tmp_path / "in.tif") if action == "download_input" else (name,)
    with pytest.raises(error) as info:
        getattr(store, action)(*args)
    assert type(info.value) is error
    assert isinstance(info.value, CropAIError)
    assert info.value.transient is (error is StorageUnavailable)
    store.close()


class _BearerToken:
    """A token credential: the store signs with a user delegation key, which it must fetch from the service."""

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken("not-a-real-token", int(time.time()) + 3600)


def test_a_url_that_cannot_be_signed_is_served_unsigned(caplog: pytest.LogCaptureFixture) -> None:
    """The user delegation key fetch fails (here: nothing listens): the status view still answers, unsigned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    account = f"https://127.0.0.1:{port}/devstoreaccount1"
    store = BlobStore(BlobServiceClient(account, credential=_BearerToken(), retry_total=0))
    url = f"{account}/results/{uuid.uuid4()}/ndvi.tif"
    with pytest.raises(StorageUnavailable):
        store.read_url(url, timedelta(minutes=5))  # the adapter itself still says what happened
    job = job_record(JobStatus.SUCCEEDED, result={"outputs": {"ndvi_cog": url}})
    with caplog.at_level(logging.WARNING, logger="shared.status"):
        view = job_view(job, store, timedelta(minutes=5))
    assert view["result"]["outputs"] == {"ndvi_cog": url}
    [record] = [r for r in caplog.records if getattr(r, "action", None) == "sign_url_failed"]
    assert getattr(record, "job_id", None) == str(job.job_id)
    store.close()


@pytest.mark.parametrize(
    "path", ["../results/{job}/1/ndvi.tif", "%2e%2e/results/{job}/1/ndvi.tif", "a/./b.tif", "a//b"]
)
def test_an_image_url_cannot_leave_the_images_container(store: BlobStore, tmp_path: Path, path: str) -> None:
    """HTTP clients normalise dot segments: ``images/../results/...`` would read the results container with the
    API's account-wide role. A submit refuses such a name before reading anything."""
    job = uuid.uuid4()
    result = tmp_path / "ndvi.tif"
    result.write_bytes(geotiffs.real())
    store.put_result(job, 1, "ndvi.tif", result, "image/tiff")  # a real blob the traversal would reach
    url = f"{store.input_url('x').rsplit('/', 1)[0]}/{path.format(job=job)}"
    with pytest.raises(ValueError, match="segment"):
        store.blob_name(url)
    limits = Limits(max_bytes=10**8, max_pixels=10**8, max_bands=32)
    with pytest.raises(Rejected) as refused:
        find(None, url, store, limits, allowed=())
    assert refused.value.code == "invalid_image_url"


def test_an_image_url_of_the_images_container_names_its_blob(store: BlobStore) -> None:
    assert store.blob_name(f"{store.input_url('archive/T33UUP.tif')}?sv=x&sig=y") == "archive/T33UUP.tif"
    assert store.blob_name("https://elsewhere.blob.core.windows.net/images/a.tif") is None
