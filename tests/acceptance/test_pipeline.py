"""Submit → queue → worker → status over HTTP against the running stack, with real GeoTIFFs and every failure path.

``result.indices.ndvi.mean`` is checked against an independent numpy computation within 1e-4.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio

from tests.acceptance.client import independent_means, poll, submit
from tests.acceptance.harness import Stack

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("worker")]

DATA = Path(__file__).resolve().parents[1] / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"
COAST = DATA / "s2_l1c_coast_256.tif"
RGBN = DATA / "s2_rgbn_fields_128.tif"


def _rewrite(src: Path, out: Path, *, dtype: str | None = None, descriptions: bool = True, hole: bool = False) -> Path:
    """A variant of ``src``: float32 reflectance (NaN nodata), without band descriptions, or with nodata holes."""
    with rasterio.open(src) as ds:
        profile = ds.profile
        data = ds.read()
        names = ds.descriptions
    if dtype == "float32":
        stack = np.where(data == 0, np.nan, data / 10000.0).astype(np.float32)
        profile.update(dtype="float32", nodata=float("nan"), predictor=1)
    else:
        stack = data.copy()
    if hole:
        fill = profile["nodata"]
        stack[:, 10:60, 20:90] = fill  # every band missing
        stack[names.index("B04"), 100:140, :] = fill  # only red missing: out of NDVI, still in NDWI
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(stack)
        if descriptions:
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)
    return out


@pytest.mark.parametrize(
    ("make", "params"),
    [
        pytest.param(lambda tmp: FIELDS, {}, id="13-band-fields"),
        pytest.param(lambda tmp: COAST, {}, id="13-band-coast-with-water"),
        pytest.param(lambda tmp: RGBN, {"bands": "B02,B03,B04,B08"}, id="4-band-with-bands-param"),
        pytest.param(lambda tmp: _rewrite(FIELDS, tmp / "holes.tif", hole=True), {}, id="nodata-holes"),
        pytest.param(lambda tmp: _rewrite(FIELDS, tmp / "float.tif", dtype="float32"), {}, id="float-reflectance"),
        pytest.param(
            lambda tmp: _rewrite(RGBN, tmp / "nameless.tif", descriptions=False),
            {"bands": "blue,green,red,nir"},
            id="no-descriptions-common-names",
        ),
        pytest.param(lambda tmp: RGBN, {"bands": "B02,B03,B04,B08", "scale": "5000"}, id="explicit-scale"),
    ],
)
def test_submitted_geotiff_is_analysed_and_matches_numpy(
    api: httpx.Client, tmp_path: Path, make: object, params: dict[str, str]
) -> None:
    path: Path = make(tmp_path)  # type: ignore[operator]
    response = submit(api, path.read_bytes(), params=params)

    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["job_id"]
    # A free worker may claim the job between the send and the 202: the body reports the row as it is then.
    assert body["status"] in {"queued", "running"}, body
    assert response.headers["Location"].endswith(f"/api/jobs/{job_id}")
    assert int(response.headers["Retry-After"]) >= 1
    assert body["status_url"].endswith(f"/api/jobs/{job_id}")

    final = poll(api, response.headers["Location"])
    assert final["status"] == "succeeded", final
    assert final["attempts"] >= 1
    bands = params["bands"].split(",") if "bands" in params else None
    bands = ["B02", "B03", "B04", "B08"] if bands == ["blue", "green", "red", "nir"] else bands
    expected = independent_means(path, bands, float(params["scale"]) if "scale" in params else None)
    indices = final["result"]["indices"]
    assert indices["ndvi"]["mean"] == pytest.approx(expected["ndvi"], abs=1e-4)
    assert indices["savi"]["mean"] == pytest.approx(expected["savi"], abs=1e-4)
    assert 0.0 < final["result"]["valid_fraction"] <= 1.0
    assert final["result"]["scene"]["width"] == rasterio.open(path).width


def test_multipart_upload_is_accepted(api: httpx.Client) -> None:
    response = api.post("/api/jobs", files={"image": ("scene.tif", RGBN.read_bytes(), "image/tiff")})
    assert response.status_code == 202, response.text
    assert poll(api, response.headers["Location"])["status"] == "succeeded"


def _problem(response: httpx.Response) -> dict[str, object]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, object] = response.json()
    assert {"type", "title", "status", "detail", "code"} <= problem.keys()
    assert problem["status"] == response.status_code
    return problem


@pytest.mark.parametrize(
    ("content", "content_type", "code"),
    [
        (b"hello, this is not an image", "text/plain", "unsupported_media_type"),
        (b'{"image": "base64?"}', "application/json", "invalid_request_body"),  # JSON is a submit by reference
        (b"", "image/tiff", "empty_body"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png", "unsupported_media_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/tiff", "not_a_tiff"),
        (b"II*\x00" + b"\0" * 60, "image/tiff", "unreadable_image"),  # TIFF magic, nothing behind it
    ],
    ids=["text", "json", "empty", "png", "png-as-tiff", "tiff-magic-only"],
)
def test_non_geotiff_bodies_get_a_problem(api: httpx.Client, content: bytes, content_type: str, code: str) -> None:
    problem = _problem(api.post("/api/jobs", content=content, headers={"Content-Type": content_type}))
    assert problem["code"] == code, problem


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"bands": "B02,B03"}, "band_count_mismatch"),
        ({"bands": "X1,X2,X3,X4"}, "invalid_bands"),
        ({"scale": "-1"}, "invalid_scale"),
        ({"scale": "many"}, "invalid_scale"),
        ({"analysis": "poetry"}, "invalid_analysis"),
    ],
    ids=["too-few-bands", "unknown-band-names", "negative-scale", "non-numeric-scale", "unknown-analysis"],
)
def test_bad_parameters_get_a_problem(api: httpx.Client, params: dict[str, str], code: str) -> None:
    problem = _problem(submit(api, RGBN.read_bytes(), params=params))
    assert problem["code"] == code, problem


@pytest.mark.parametrize("fraction", [0.5, 0.9], ids=["half", "most"])
def test_truncated_geotiff_is_refused_or_fails_with_a_code(api: httpx.Client, fraction: float) -> None:
    data = FIELDS.read_bytes()
    response = submit(api, data[: int(len(data) * fraction)])
    if response.status_code == 202:
        final = poll(api, response.headers["Location"])
        assert final["status"] == "failed", final
        assert final["error"]["code"]
    else:
        _problem(response)


def test_body_over_the_100_mb_limit_is_413_before_it_is_sent(stack: Stack) -> None:
    url = httpx.URL(stack.api_url)
    with socket.create_connection((url.host, url.port or 80), timeout=30) as sock:
        head = f"POST /api/jobs HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: image/tiff\r\n"
        sock.sendall(f"{head}Content-Length: {100 * 1024 * 1024 + 1}\r\n\r\n".encode())
        with sock.makefile("rb") as response:
            status_line = response.readline()
    assert status_line.split()[1] == b"413"


def test_unknown_job_is_404(api: httpx.Client) -> None:
    assert _problem(api.get(f"/api/jobs/{uuid.uuid4()}"))["status"] == 404


@pytest.mark.parametrize("job_id", ["not-a-uuid", "12345", "0b5e4a8c-93a1-4f27-9a53-1c0f5e2d7a1"])
def test_malformed_job_id_is_400(api: httpx.Client, job_id: str) -> None:
    assert _problem(api.get(f"/api/jobs/{job_id}"))["status"] == 400


def test_repeated_idempotency_key_returns_the_same_job(api: httpx.Client) -> None:
    key = f"acceptance-{uuid.uuid4()}"
    first = submit(api, RGBN.read_bytes(), Idempotency_Key=key)
    second = submit(api, RGBN.read_bytes(), Idempotency_Key=key)
    assert first.status_code == 202, first.text
    assert second.status_code in (200, 202), second.text
    assert second.json()["job_id"] == first.json()["job_id"]
    assert poll(api, first.headers["Location"])["status"] == "succeeded"


def test_same_idempotency_key_with_other_bytes_is_409(api: httpx.Client) -> None:
    key = f"acceptance-{uuid.uuid4()}"
    assert submit(api, RGBN.read_bytes(), Idempotency_Key=key).status_code == 202
    assert _problem(submit(api, FIELDS.read_bytes(), Idempotency_Key=key))["status"] == 409
