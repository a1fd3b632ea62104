"""Field boundaries at submit (shared/fields.py): what parses, each way it is refused, the geodesic area, the job
params round trip and the footprint check."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import rasterio
import shapely  # type: ignore[import-untyped]
from pyproj import Geod, Transformer
from shapely.geometry import Polygon  # type: ignore[import-untyped]

from shared.errors import InvalidMessage
from shared.fields import Fields, check_intersects, parse_fields
from shared.geotiff import ImageHeader, Limits, inspect
from shared.rejection import Rejected
from tests import geotiffs

UTM18N = {"type": "name", "properties": {"name": "EPSG:32618"}}
# The real Sentinel-2 crop (tests/geotiffs.py FIELDS): 256 x 256 pixels of 10 m from (439730, 4175460), UTM 18N.
SCENE_TRANSFORM = (10.0, 0.0, 439730.0, 0.0, -10.0, 4175460.0)


def square(x: float, y: float, side: float) -> list[list[list[float]]]:
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def polygon(coordinates: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": coordinates, **extra}


def feature(geometry: Any, fid: Any = None, **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "Feature", "geometry": geometry, "properties": properties or None}
    return out if fid is None else out | {"id": fid}


def collection(*features: dict[str, Any], crs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features), **({"crs": crs} if crs else {})}


LON_LAT = square(-75.67, 37.71, 0.001)


def test_a_bare_polygon_is_one_field_with_id_1_in_wgs84() -> None:
    fields = parse_fields(polygon(LON_LAT), 10)
    assert (fields.crs, [f.id for f in fields], fields.items[0].properties) == ("OGC:CRS84", ["1"], None)


def test_feature_ids_come_from_id_then_properties_id_then_position() -> None:
    fields = parse_fields(
        collection(
            feature(polygon(square(-75.67, 37.71, 0.001)), "north", crop="wheat"),
            feature(polygon(square(-75.66, 37.71, 0.001)), 12),
            feature(polygon(square(-75.65, 37.71, 0.001)), None, id="p-7"),
            feature(polygon(square(-75.64, 37.71, 0.001))),
        ),
        10,
    )
    assert [f.id for f in fields] == ["north", "12", "p-7", "4"]
    assert fields.items[0].properties == {"crop": "wheat"}


def test_a_feature_with_a_crs_and_a_null_id() -> None:
    value = feature(polygon(square(440000, 4174000, 100)), None, id=None) | {"id": None, "crs": UTM18N}
    fields = parse_fields(value, 1)
    assert (fields.crs, fields.items[0].id) == ("EPSG:32618", "1")


def test_a_multipolygon_with_a_hole_and_a_height_is_accepted() -> None:
    shell = [[0.0, 0.0, 5.0], [1.0, 0.0, 5.0], [1.0, 1.0, 5.0], [0.0, 1.0, 5.0], [0.0, 0.0, 5.0]]
    hole = [[0.2, 0.2], [0.2, 0.4], [0.4, 0.4], [0.4, 0.2], [0.2, 0.2]]
    value = {"type": "MultiPolygon", "coordinates": [[shell, hole], square(2.0, 0.0, 1.0)[0:1]]}
    (field,) = parse_fields(value, 1)
    assert field.geometry.geom_type == "MultiPolygon"
    assert field.geometry.area == pytest.approx(1 - 0.04 + 1)


@pytest.mark.parametrize(
    "name", ["EPSG:32618", "epsg:32618", "urn:ogc:def:crs:EPSG::32618", "urn:ogc:def:crs:EPSG:9.8.1:32618"]
)
def test_a_legacy_named_crs_is_accepted(name: str) -> None:
    fields = parse_fields(collection(feature(polygon(square(440000, 4175000, 100))),
                                     crs={"type": "name", "properties": {"name": name}}), 1)  # fmt: skip
    assert fields.crs == "EPSG:32618"
    assert -75.69 < fields.items[0].wgs84.bounds[0] < -75.65


@pytest.mark.parametrize("name", ["urn:ogc:def:crs:OGC:1.3:CRS84", "OGC:CRS84", "EPSG:4326"])
def test_wgs84_names_mean_longitude_latitude(name: str) -> None:
    fields = parse_fields(polygon(LON_LAT, crs={"type": "name", "properties": {"name": name}}), 1)
    assert fields.crs == "OGC:CRS84"
    assert fields.items[0].wgs84.bounds[0] == -75.67


def test_area_is_geodesic_and_agrees_with_utm_within_half_a_percent() -> None:
    """A 400 m x 500 m field drawn in UTM 18N: its geodesic area (pyproj Geod on the WGS 84 vertices) and its
    planar UTM area (shapely) agree within 0.5 % (the UTM scale factor here makes them differ by ~0.07 %)."""
    ring = [[440000, 4174000], [440400, 4174000], [440400, 4174500], [440000, 4174500], [440000, 4174000]]
    (field,) = parse_fields(collection(feature(polygon([ring])), crs=UTM18N), 1)
    utm_ha = 400 * 500 / 10_000
    to_lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    lonlat = [to_lonlat.transform(x, y) for x, y in field.geometry.exterior.coords]
    geodesic_ha = abs(Geod(ellps="WGS84").geometry_area_perimeter(Polygon(lonlat))[0]) / 10_000
    assert field.area_ha == pytest.approx(geodesic_ha, rel=1e-9)
    assert field.area_ha == pytest.approx(utm_ha, rel=0.005)
    assert abs(field.area_ha / utm_ha - 1) > 1e-4  # geodesic, not the planar area passed through


def test_area_ignores_ring_orientation_and_subtracts_holes() -> None:
    ccw, cw = square(-75.67, 37.71, 0.01)[0], square(-75.67, 37.71, 0.01)[0][::-1]
    hole = square(-75.668, 37.712, 0.002)[0]
    a = parse_fields(polygon([ccw]), 1).items[0].area_ha
    b = parse_fields(polygon([cw]), 1).items[0].area_ha
    c = parse_fields(polygon([ccw, hole]), 1).items[0].area_ha
    assert a == pytest.approx(b, rel=1e-12)
    assert a > 0
    assert c == pytest.approx(a * (1 - 0.04), rel=1e-3)


def test_params_round_trip_through_json() -> None:
    value = collection(feature(polygon(square(440000.5, 4174000.25, 123.4)), "a", crop="maize"),
                       feature({"type": "MultiPolygon", "coordinates": [square(441000, 4174000, 50)]}, "b"),
                       crs=UTM18N)  # fmt: skip
    fields = parse_fields(value, 10)
    again = Fields.from_params(json.loads(json.dumps(fields.to_params())))
    assert again.crs == fields.crs
    assert [(f.id, f.properties, f.area_ha) for f in again] == [(f.id, f.properties, f.area_ha) for f in fields]
    assert all(shapely.equals_exact(a.geometry, b.geometry, 0) for a, b in zip(again, fields, strict=True))
    wgs84 = parse_fields(polygon(LON_LAT), 1)
    assert "crs" not in wgs84.to_params()
    assert Fields.from_params(wgs84.to_params()).items[0].area_ha == wgs84.items[0].area_ha


def test_params_that_do_not_parse_are_a_permanent_error_in_the_worker() -> None:
    with pytest.raises(InvalidMessage, match="do not parse"):
        Fields.from_params({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]})


NAN = float("nan")
BOWTIE = [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (polygon(BOWTIE), r"not a valid polygon: Self-intersection\[0.5 0.5\]"),
        (polygon([[[0, 0], [1, 0], [1, 1], [0, 1]]]), "not closed"),
        (polygon([[[0, 0], [1, 0], [0, 0]]]), "at least 4 positions"),
        (polygon([[[0, 0], [1, 0], [2, 0], [0, 0]]]), "not a valid polygon"),  # collapsed: no area
        (polygon([square(0, 0, 1)[0], square(5, 5, 1)[0]]), "Hole lies outside shell"),
        ({"type": "MultiPolygon", "coordinates": [square(0, 0, 4), square(1, 1, 1)]}, "not a valid polygon"),
        (polygon([[[0, 0], [1, NAN], [1, 1], [0, 1], [0, 0]]]), "NaN or infinite"),
        (polygon([[[0, 0], [1, math.inf], [1, 1], [0, 1], [0, 0]]]), "NaN or infinite"),
        (polygon([[[0, 0], [1, "0"], [1, 1], [0, 1], [0, 0]]]), r"must be \[x, y\]"),
        (polygon([[[0, 0], [True, 0], [1, 1], [0, 1], [0, 0]]]), r"must be \[x, y\]"),
        (polygon([]), "empty"),
        (polygon([[]]), "at least 4 positions"),
        ({"type": "MultiPolygon", "coordinates": [[]]}, "empty"),
        (collection(), "empty"),
        (collection(feature(None, "x")), "'x' has no geometry: it is empty"),
        ({"type": "Point", "coordinates": [0, 0]}, "not 'Point'"),
        (collection(feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "x")), "Polygon or MultiPolygon"),
        (collection(feature(polygon(LON_LAT), "a"), feature(polygon(LON_LAT), "a")), "'a' is used twice"),
        (collection(feature(polygon(LON_LAT), 1), feature(polygon(LON_LAT), None, id="1")), "'1' is used twice"),
        (collection(feature(polygon(LON_LAT), True)), "id must be"),
        (collection(feature(polygon(LON_LAT), "")), "id must be"),
        (polygon(square(440000, 4174000, 100)), r"is it projected\? give its crs member"),
        (polygon(square(179.9, 0, 0.2)), "outside longitude"),
        (polygon([[[-179, 0], [179, 0], [179, 1], [-179, 1], [-179, 0]]]), "antimeridian"),
        (polygon(LON_LAT, crs={"type": "name", "properties": {"name": "EPSG:99999"}}), "no such EPSG code"),
        (polygon(LON_LAT, crs={"type": "name", "properties": {"name": "+proj=utm +zone=18"}}), "unknown CRS"),
        (polygon(LON_LAT, crs={"type": "name", "properties": {"name": "EPSG:5703"}}), "neither geographic"),
        (polygon(LON_LAT, crs={"type": "link", "properties": {"href": "x"}}), "must be a named CRS"),
        (polygon(LON_LAT, crs="EPSG:4326"), "must be a named CRS"),
        (collection(feature(polygon(LON_LAT)) | {"crs": UTM18N}), "top-level object only"),
        (collection(feature(polygon(LON_LAT, crs=UTM18N))), "top-level object only"),
        (collection(feature(polygon(LON_LAT)) | {"properties": [1]}), "properties must be an object"),
        (collection({"type": "Polygon", "coordinates": LON_LAT}), "not a GeoJSON Feature"),
        ([polygon(LON_LAT)], "must be a GeoJSON object"),
    ],
)
def test_invalid_geometry_is_refused_with_the_reason(value: Any, message: str) -> None:
    with pytest.raises(Rejected, match=message) as info:
        parse_fields(value, 10)
    assert info.value.code == "invalid_geometry"


def test_nan_from_json_text_is_refused() -> None:
    value = json.loads('{"type": "Polygon", "coordinates": [[[0, 0], [1, NaN], [1, 1], [0, 1], [0, 0]]]}')
    with pytest.raises(Rejected, match="NaN"):
        parse_fields(value, 1)


def test_too_many_fields() -> None:
    value = collection(*(feature(polygon(square(-75.6 + i * 0.01, 37.7, 0.001)), i) for i in range(4)))
    assert len(parse_fields(value, 4)) == 4
    with pytest.raises(Rejected, match="4 fields; the limit is 3") as info:
        parse_fields(value, 3)
    assert info.value.code == "too_many_fields"


def test_too_many_vertices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shared.fields.MAX_VERTICES", 9)
    with pytest.raises(Rejected, match="more than 9 vertices"):
        parse_fields(collection(feature(polygon(LON_LAT), 1), feature(polygon(LON_LAT), 2)), 10)


def header(crs: str | None = "EPSG:32618", transform: tuple[float, ...] | None = SCENE_TRANSFORM) -> ImageHeader:
    return ImageHeader(256, 256, 13, "uint16", (), crs, transform)


def test_check_intersects_passes_fields_that_touch_the_scene_even_in_another_crs() -> None:
    inside = feature(polygon(square(440000, 4174000, 100)), "in")
    partly = feature(polygon(square(442200, 4173000, 500)), "partly")  # crosses the east edge (442290)
    check_intersects(parse_fields(collection(inside, partly, crs=UTM18N), 10), header())
    lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    ring = [list(lonlat.transform(x, y)) for x, y in square(440000, 4174000, 100)[0]]
    check_intersects(parse_fields(polygon([ring]), 1), header())


def test_check_intersects_refuses_fields_outside_the_scene() -> None:
    inside = feature(polygon(square(440000, 4174000, 100)), "in")
    outside = feature(polygon(square(443000, 4174000, 100)), "east")  # 700 m east of the edge
    with pytest.raises(Rejected, match="1 of the 2 fields lie outside the image: 'east'") as info:
        check_intersects(parse_fields(collection(inside, outside, crs=UTM18N), 10), header())
    assert info.value.code == "geometry_outside_scene"
    with pytest.raises(Rejected, match="outside the image"):
        check_intersects(parse_fields(polygon(square(10.0, 50.0, 0.01)), 1), header())  # Germany


def test_check_intersects_without_a_crs_refuses_and_without_a_transform_leaves_it_to_the_worker() -> None:
    fields = parse_fields(polygon(square(10.0, 50.0, 0.01)), 1)
    with pytest.raises(Rejected, match="no CRS") as info:
        check_intersects(fields, header(crs=None))
    assert info.value.code == "geometry_outside_scene"
    check_intersects(fields, header(transform=None))


def test_check_intersects_refuses_an_image_crs_proj_cannot_read() -> None:
    fields = parse_fields(polygon(square(10.0, 50.0, 0.01)), 1)
    with pytest.raises(Rejected, match="cannot be placed in the image's CRS") as info:
        check_intersects(fields, header(crs='LOCAL_CS["nowhere"]'))
    assert info.value.code == "geometry_outside_scene"


def test_the_submitted_header_carries_the_geotransform_so_submit_refuses_fields_off_the_scene() -> None:
    """The header the API reads from an upload (``shared.geotiff.inspect``) is the one check_intersects gets."""
    header = inspect(geotiffs.real(), Limits(max_bytes=10**8, max_pixels=10**8, max_bands=32))
    with rasterio.open(geotiffs.FIELDS) as ds:
        assert (header.transform, header.crs) == (tuple(ds.transform)[:6], "EPSG:32618")
        west, south = ds.bounds.left, ds.bounds.bottom
    inside = collection(feature(polygon(square(west + 500, south + 500, 100)), "in"), crs=UTM18N)
    check_intersects(parse_fields(inside, 1), header)
    with pytest.raises(Rejected, match="outside the image") as info:
        check_intersects(parse_fields(polygon(square(10.0, 50.0, 0.01)), 1), header)  # Germany
    assert info.value.code == "geometry_outside_scene"


def test_a_field_split_at_the_antimeridian_is_one_field_with_both_parts() -> None:
    """RFC 7946 3.1.9: a geometry crossing the antimeridian is cut in two parts, one each side of it."""
    east = [[179.9, -17.0], [180.0, -17.0], [180.0, -16.9], [179.9, -16.9], [179.9, -17.0]]
    west = [[-180.0, -17.0], [-179.9, -17.0], [-179.9, -16.9], [-180.0, -16.9], [-180.0, -17.0]]
    fields = parse_fields({"type": "MultiPolygon", "coordinates": [[east], [west]]}, 1)
    (field,) = fields
    both = Geod(ellps="WGS84").geometry_area_perimeter(Polygon(east))[0] * 2
    assert field.area_ha == pytest.approx(abs(both) / 10_000, rel=1e-6)
