"""Per-field statistics through the HTTP API on the local stack (issue 12): three fields on the real crop, sent with
an image by ``upload_id`` (JSON) and with the image's bytes (the form's ``geometry`` part); and the geometries a
submit refuses before any job exists."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from azure.storage.blob import BlobClient
from pyproj import Geod, Transformer
from shapely.geometry import shape  # type: ignore[import-untyped]

from shared.settings import Settings
from tests.acceptance.client import poll
from tests.geotiffs import FIELDS

pytestmark = pytest.mark.acceptance

# Hand-drawn on tests/data/s2_l1c_fields_256.tif (UTM 18N, 10 m pixels from (439730, 4175460), 256 x 256): three
# irregular fields well inside the scene, sent in WGS 84 (RFC 7946) as a client would.
UTM = {
    "north-7": [(439900, 4175300), (440450, 4175350), (440600, 4175000), (440100, 4174850), (439880, 4175050)],
    "river": [(441200, 4174600), (441900, 4174700), (442000, 4174300), (441500, 4174100), (441150, 4174250)],
    "south": [(440000, 4173600), (440700, 4173650), (440650, 4173150), (440300, 4173050), (439950, 4173250)],
}
PROPERTIES = {"north-7": {"name": "field north-7", "crop": "maize"}}
TO_WGS84 = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)


def ring(points: Sequence[tuple[float, float]]) -> list[list[float]]:
    lonlat = [[round(c, 7) for c in TO_WGS84.transform(x, y)] for x, y in points]
    return [*lonlat, lonlat[0]]


def polygon(points: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [points]}


THREE: dict[str, Any] = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "id": fid, "geometry": polygon(ring(points)), "properties": PROPERTIES.get(fid)}
        for fid, points in UTM.items()
    ],
}


def geodesic_ha(geometry: dict[str, Any]) -> float:
    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(shape(geometry))
    return abs(area) / 10_000


def urls(value: object) -> Iterator[str]:
    """Every URL in the result's ``outputs`` (whatever its nesting)."""
    if isinstance(value, str) and value.startswith("http"):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from urls(item)
    elif isinstance(value, list):
        for item in value:
            yield from urls(item)


@pytest.fixture(scope="module")
def upload_id(api: httpx.Client) -> str:
    ticket = api.post("/api/uploads")
    assert ticket.status_code == 201, ticket.text
    BlobClient.from_blob_url(ticket.json()["upload_url"]).upload_blob(FIELDS.read_bytes())
    return str(ticket.json()["upload_id"])


def by_upload(api: httpx.Client, upload_id: str, geometry: object) -> httpx.Response:
    return api.post("/api/jobs", json={"upload_id": upload_id, "geometry": geometry})


def as_bytes(api: httpx.Client, upload_id: str, geometry: object) -> httpx.Response:
    files = {"image": ("scene.tif", FIELDS.read_bytes(), "image/tiff"),
             "geometry": ("fields.geojson", json.dumps(geometry).encode(), "application/geo+json")}  # fmt: skip
    return api.post("/api/jobs", files=files)


SUBMITS = [pytest.param(by_upload, id="json-upload_id"), pytest.param(as_bytes, id="multipart-bytes")]


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("submit", SUBMITS)
def test_three_fields_are_measured_each(api: httpx.Client, upload_id: str, submit: Any) -> None:
    response = submit(api, upload_id, THREE)
    assert response.status_code == 202, response.text
    body = poll(api, response.headers["Location"], timeout=60)
    assert body["status"] == "succeeded", body
    fields = body["result"]["fields"]
    assert [f["id"] for f in fields] == list(UTM)
    for field, feature in zip(fields, THREE["features"], strict=True):
        expected = geodesic_ha(feature["geometry"])
        assert field["area_ha"] == pytest.approx(expected, rel=0.005), field["id"]
        assert field["pixel_count"] == pytest.approx(expected * 100, rel=0.05), field["id"]  # 1 ha = 100 pixels
        assert 0 < field["indices"]["ndvi"]["count"] <= field["pixel_count"]
    assert fields[0]["properties"] == PROPERTIES["north-7"]
    outputs = list(urls(body["result"]["outputs"]))
    assert outputs
    for url in outputs:
        download = httpx.get(url, timeout=30)
        assert download.status_code == 200, url
        assert download.content


def _many(count: int) -> dict[str, Any]:
    """``count`` squares of 100 m on a grid inside the scene."""
    x0, y0 = 439800, 4175400
    features = [
        {"type": "Feature", "geometry": polygon(ring([(x, y), (x + 100, y), (x + 100, y - 100), (x, y - 100)]))}
        for k in range(count)
        for x, y in [(x0 + 200 * (k % 11), y0 - 200 * (k // 11))]
    ]
    return {"type": "FeatureCollection", "features": features}


MAX_FIELDS = Settings.model_fields["max_fields"].default  # the stack runs with the default
BOW_TIE = polygon(ring([(440000, 4175000), (440500, 4174500), (440500, 4175000), (440000, 4174500)]))
OUTSIDE = polygon(ring([(460000, 4175000), (460500, 4175000), (460500, 4174500), (460000, 4174500)]))


@pytest.mark.parametrize("submit", SUBMITS)
@pytest.mark.parametrize(
    ("geometry", "code"),
    [
        pytest.param(OUTSIDE, "geometry_outside_scene", id="outside"),
        pytest.param(BOW_TIE, "invalid_geometry", id="bow-tie"),
        pytest.param(_many(MAX_FIELDS + 1), "too_many_fields", id="too-many"),
    ],
)
def test_geometries_refused_at_submit(api: httpx.Client, upload_id: str, submit: Any, geometry: Any, code: str) -> None:
    response = submit(api, upload_id, geometry)
    assert (response.status_code, response.json()["code"]) == (422, code), response.text
