"""Field boundaries on a submit with the image in the request: the form's ``geometry`` part of ``POST /api/jobs`` and
``POST /api/batches`` goes through the checks of the JSON body's ``geometry`` (``shared.fields``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from functions import deps
from shared.fields import Fields
from tests import geotiffs
from tests.functions_client import body, post_job
from tests.job_api_client import call
from tests.unit.test_functions import World, assert_problem

BOUNDARY = "cropaiboundary"
UTM18N = {"type": "name", "properties": {"name": "EPSG:32618"}}


def square(x: float, y: float, side: float = 200.0) -> dict[str, Any]:
    ring = [[x, y], [x + side, y], [x + side, y - side], [x, y - side], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


# On the real crops (tests/geotiffs.py): from (439730, 4175460), 10 m pixels, UTM 18N.
TWO_FIELDS = {
    "type": "FeatureCollection",
    "crs": UTM18N,
    "features": [
        {"type": "Feature", "id": "north", "geometry": square(439800, 4175400), "properties": {"crop": "maize"}},
        {"type": "Feature", "id": 7, "geometry": square(440300, 4175000), "properties": None},
    ],
}
OUTSIDE = {"type": "Feature", "geometry": square(500000, 4175400), "crs": UTM18N}


def form(images: list[bytes], geometry: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart body: ``images`` as file parts ``image``; ``geometry`` as ``(kind, text)`` parts, ``kind``
    ``"file"`` (with a filename) or ``"field"`` (a plain form field)."""
    parts = []
    for data in images:
        head = 'Content-Disposition: form-data; name="image"; filename="scene.tif"\r\nContent-Type: image/tiff'
        parts.append(f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    for kind, text in geometry:
        head = 'Content-Disposition: form-data; name="geometry"'
        if kind == "file":
            head += '; filename="fields.geojson"\r\nContent-Type: application/geo+json'
        parts.append(f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + text + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture
def world() -> Iterator[World]:
    w = World(MAX_FIELDS="2", MAX_BATCH_SIZE="4")
    deps.use(w.deps())
    yield w
    deps.use(None)


@pytest.mark.parametrize("kind", ["file", "field"])
def test_a_geometry_part_becomes_the_jobs_fields(world: World, kind: str) -> None:
    data, content_type = form([geotiffs.real()], [(kind, json.dumps(TWO_FIELDS).encode())])
    response = post_job(data, content_type=content_type)
    assert response.status_code == 202, response.get_body()
    job = world.job(body(response)["job_id"])
    fields = Fields.from_params(job.params["fields"])
    assert [f.id for f in fields] == ["north", "7"]
    assert fields.items[0].properties == {"crop": "maize"}
    assert fields.items[0].area_ha == pytest.approx(4.0, rel=0.01)  # 200 m x 200 m, UTM's scale factor aside
    assert world.publisher.messages[0].job_id == job.job_id


def test_without_a_geometry_part_the_job_has_no_fields(world: World) -> None:
    data, content_type = form([geotiffs.real()], [])
    response = post_job(data, content_type=content_type)
    assert response.status_code == 202
    assert "fields" not in world.job(body(response)["job_id"]).params


def _collection(count: int) -> dict[str, Any]:
    features = [{"type": "Feature", "geometry": square(439800 + 300 * k, 4175400)} for k in range(count)]
    return {"type": "FeatureCollection", "crs": UTM18N, "features": features}


@pytest.mark.parametrize(
    ("parts", "status", "code"),
    [
        ([("field", b"{not json")], 422, "invalid_geometry"),
        ([("file", b"\xff\xfe")], 422, "invalid_geometry"),
        ([("field", json.dumps(TWO_FIELDS).encode())] * 2, 422, "invalid_geometry"),
        ([("field", b'{"type": "Point", "coordinates": [0, 0]}')], 422, "invalid_geometry"),
        ([("field", json.dumps(_collection(3)).encode())], 422, "too_many_fields"),
        ([("file", json.dumps(OUTSIDE).encode())], 422, "geometry_outside_scene"),
    ],
)
def test_a_bad_geometry_part_is_refused_and_nothing_is_stored(
    world: World, parts: list[tuple[str, bytes]], status: int, code: str
) -> None:
    data, content_type = form([geotiffs.real()], parts)
    assert_problem(post_job(data, content_type=content_type), status, code)
    assert world.publisher.sent == []
    assert world.jobs.backlog() == 0


def test_a_batch_geometry_applies_to_every_image(world: World) -> None:
    images = [geotiffs.real(), geotiffs.real(geotiffs.RGBN)]
    data, content_type = form(images, [("file", json.dumps(TWO_FIELDS).encode())])
    response = call("submit_batch", "POST", "batches", body=data, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.get_body()
    for entry in body(response)["jobs"]:
        assert [f["id"] for f in world.job(entry["job_id"]).params["fields"]["features"]] == ["north", "7"]


def test_a_batch_geometry_outside_one_image_names_that_image(world: World) -> None:
    coast = geotiffs.real(geotiffs.DATA / "s2_l1c_coast_256.tif")  # 8 km east of the fields crop
    data, content_type = form([geotiffs.real(), coast], [("field", json.dumps(TWO_FIELDS).encode())])
    response = call("submit_batch", "POST", "batches", body=data, headers={"Content-Type": content_type})
    problem = assert_problem(response, 422, "geometry_outside_scene")
    assert problem["index"] == 1
    assert world.publisher.sent == []


def test_a_batch_with_an_invalid_geometry_is_refused_before_any_image(world: World) -> None:
    data, content_type = form([geotiffs.real()], [("field", b"[]")])
    response = call("submit_batch", "POST", "batches", body=data, headers={"Content-Type": content_type})
    problem = assert_problem(response, 422, "invalid_geometry")
    assert "index" not in problem
