"""Issue 12 through the HTTP API on the local stack: a direct upload past the 100 MB body limit, a job by blob URL,
an input changed after its submit, and the references a submit refuses (the Claim-Check pattern)."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import rasterio
from affine import Affine
from azure.storage.blob import BlobClient, BlobServiceClient

from tests.acceptance.client import independent_means, poll
from tests.acceptance.harness import Stack
from tests.geotiffs import RGBN

pytestmark = pytest.mark.acceptance
log = logging.getLogger(__name__)

BIG = 3700  # 3700 x 3700 x 4 bands x uint16, uncompressed: 109.5 MB, past the 100 MB a request body may carry


def big_geotiff(path: Path) -> Path:
    """The real 128 px B02/B03/B04/B08 crop repeated over 3700 x 3700 pixels, uncompressed, pixel-interleaved."""
    with rasterio.open(RGBN) as src:
        crop, profile = src.read(), src.profile
    reps = -(-BIG // crop.shape[1])
    data = np.tile(crop, (1, reps, reps))[:, :BIG, :BIG]
    profile.update(width=BIG, height=BIG, compress=None, tiled=False, interleave="pixel", blockxsize=None,
                   blockysize=None, transform=Affine(10.0, 0.0, 439730.0, 0.0, -10.0, 4175460.0))  # fmt: skip
    profile = {k: v for k, v in profile.items() if v is not None}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for band, name in enumerate(("B02", "B03", "B04", "B08"), start=1):
            dst.set_band_description(band, name)
    return path


def submit_json(api: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return api.post("/api/jobs", json=body)


def own_blob(stack: Stack, data: bytes) -> str:
    """``data`` as a blob of the stack's images container (uploaded with the account's key); its URL."""
    service = BlobServiceClient.from_connection_string(stack.state["blob_connection_string"])
    with service:
        blob = service.get_blob_client("images", f"references/{uuid.uuid4()}.tif")
        blob.upload_blob(data)
        return str(blob.url)


@pytest.mark.usefixtures("worker")
def test_a_large_upload_goes_straight_to_storage_and_its_job_succeeds(api: httpx.Client, tmp_path: Path) -> None:
    path = big_geotiff(tmp_path / "big.tif")
    assert path.stat().st_size > 100 * 1024 * 1024
    ticket = api.post("/api/uploads")
    assert ticket.status_code == 201, ticket.text
    upload = ticket.json()
    assert upload["headers"] == {"x-ms-blob-type": "BlockBlob"}
    assert upload["max_bytes"] >= path.stat().st_size

    started = time.perf_counter()
    with path.open("rb") as f:  # block blob, 4 blocks at a time (azcopy does the same from the command line)
        BlobClient.from_blob_url(upload["upload_url"], max_block_size=8 << 20).upload_blob(f, max_concurrency=4)
    uploaded = time.perf_counter() - started
    started = time.perf_counter()
    response = submit_json(api, {"upload_id": upload["upload_id"], "priority": "high"})
    submitted = time.perf_counter() - started
    assert response.status_code == 202, response.text
    log.warning("upload of %d bytes: %.2f s; submit: %.3f s", path.stat().st_size, uploaded, submitted)

    body = poll(api, response.headers["Location"], timeout=180)
    assert body["status"] == "succeeded", body
    result = body["result"]
    assert result["scene"]["width"] == BIG
    assert result["scene"]["band_count"] == 4
    expected = independent_means(RGBN)  # the crop repeated: the same statistics, up to the partial last tiles
    assert result["indices"]["ndvi"]["mean"] == pytest.approx(expected["ndvi"], abs=0.01)
    assert result["indices"]["ndvi"]["count"] == BIG * BIG


@pytest.mark.usefixtures("worker")
def test_a_job_by_blob_url_reads_the_blob_in_place(stack: Stack, api: httpx.Client) -> None:
    url = own_blob(stack, RGBN.read_bytes())
    started = time.perf_counter()
    response = submit_json(api, {"image_url": url, "bands": ["B02", "B03", "B04", "B08"], "scale": 10000})
    by_reference = time.perf_counter() - started
    started = time.perf_counter()
    as_bytes = api.post("/api/jobs", content=RGBN.read_bytes(), headers={"Content-Type": "image/tiff"})
    log.warning("submit by reference: %.3f s; the same file as bytes: %.3f s", by_reference,
                time.perf_counter() - started)  # fmt: skip
    poll(api, as_bytes.headers["Location"])
    assert response.status_code == 202, response.text
    body = poll(api, response.headers["Location"])
    assert body["status"] == "succeeded", body
    assert body["result"]["indices"]["ndvi"]["mean"] == pytest.approx(independent_means(RGBN)["ndvi"], abs=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"image_url": "https://example.com/scene.tif"}, 400, "image_url_not_allowed"),
        ({"image_url": "http://169.254.169.254/latest/meta-data"}, 400, "image_url_not_allowed"),
        ({"upload_id": str(uuid.uuid4())}, 422, "upload_not_found"),
        ({"upload_id": "nope"}, 400, "invalid_upload_id"),
        ({"upload_id": str(uuid.uuid4()), "image_url": "https://example.com/a.tif"}, 400, "invalid_request_body"),
        ({"image": "x"}, 400, "invalid_request_body"),
    ],
)
def test_references_refused_at_submit(api: httpx.Client, body: dict[str, Any], status: int, code: str) -> None:
    response = submit_json(api, body)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text


def test_a_missing_blob_is_refused_at_submit(stack: Stack, api: httpx.Client) -> None:
    url = own_blob(stack, b"x").rsplit("/", 1)[0] + "/missing.tif"
    response = submit_json(api, {"image_url": url})
    assert (response.status_code, response.json()["code"]) == (422, "image_unreachable"), response.text


def test_a_blob_changed_after_its_submit_fails_the_job_input_changed(stack: Stack, api: httpx.Client) -> None:
    stack.stop_workers()  # the change lands before any worker reads the blob
    url = own_blob(stack, RGBN.read_bytes())
    response = submit_json(api, {"image_url": url})
    assert response.status_code == 202, response.text
    BlobClient.from_connection_string(
        stack.state["blob_connection_string"], "images", url.split("/images/", 1)[1]
    ).upload_blob(RGBN.read_bytes(), overwrite=True)  # the same bytes, a new version: a new ETag
    stack.ensure_worker()
    body = poll(api, response.headers["Location"])
    assert (body["status"], body["error"]["code"]) == ("failed", "input_changed"), body
