"""Field boundaries (GeoJSON polygons) for per-field statistics: parsed and checked at submit, carried in the job's
params under ``"fields"``, placed on the scene by the worker (docs/analysis.md, "Field statistics").

    parse_fields(value, max_fields) -> Fields       raises Rejected: invalid_geometry | too_many_fields
    Fields.to_params() / Fields.from_params(...)    the job's params["fields"] (a GeoJSON FeatureCollection)
    check_intersects(fields, header)                raises Rejected: geometry_outside_scene

Accepted: a Polygon or MultiPolygon (one field, id "1"), a Feature, or a FeatureCollection of up to ``max_fields``
features. A feature's id is its ``id`` (string or integer), else ``properties.id``, else its 1-based position.
Coordinates are WGS 84 longitude, latitude (RFC 7946), unless the top-level object has a legacy (2008) named ``crs``
member with an EPSG code (``EPSG:32633``, ``urn:ogc:def:crs:EPSG::32633``) or CRS84: always x then y (easting,
northing; longitude, latitude), whatever the CRS's official axis order, as GDAL reads GeoJSON. Nothing else is
accepted as a CRS (no WKT, PROJ strings or linked CRSs). A third coordinate (height) is dropped.

Each polygon must be valid by GEOS's rules (closed rings of at least 4 positions, no self-intersection, holes inside
their shell, parts of a MultiPolygon not overlapping), with finite coordinates and a non-zero area. Fields may
overlap one another: each is measured on its own. Ring orientation is not checked (RFC 7946 says not to refuse).
``area_ha`` is geodesic, on the WGS 84 ellipsoid, from the polygon's vertices in WGS 84 (pyproj's ``Geod``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely  # type: ignore[import-untyped]
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError, ProjError
from shapely.geometry import MultiPolygon, Polygon, box  # type: ignore[import-untyped]

from shared.errors import InvalidMessage
from shared.geotiff import ImageHeader
from shared.rejection import Rejected

WGS84 = "OGC:CRS84"  # longitude, latitude on WGS 84: RFC 7946's only CRS
MAX_VERTICES = 100_000  # positions in all fields together: bounds the work of a request, not a field's detail
MAX_ID_LENGTH = 200
_EPSG = re.compile(r"^(?:EPSG:|urn:ogc:def:crs:EPSG:[0-9.]*:)([0-9]{1,6})$", re.IGNORECASE)
_CRS84 = re.compile(r"^(?:OGC:|urn:ogc:def:crs:OGC:[0-9.]*:)?CRS84$", re.IGNORECASE)
_GEOD = Geod(ellps="WGS84")


def _invalid(detail: str) -> Rejected:
    return Rejected("invalid_geometry", detail)


@dataclass(frozen=True)
class Field:
    """One field: ``geometry`` a shapely (Multi)Polygon in the fields' CRS, ``wgs84`` the same in longitude,
    latitude."""

    id: str
    geometry: Any
    wgs84: Any
    area_ha: float
    properties: dict[str, Any] | None = None


@dataclass(frozen=True)
class Fields:
    crs: str  # "OGC:CRS84" or "EPSG:<code>"
    items: tuple[Field, ...]

    def __iter__(self) -> Iterator[Field]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_params(self) -> dict[str, Any]:
        """A GeoJSON FeatureCollection (with a ``crs`` member unless WGS 84) that :meth:`from_params` reads back."""
        crs = {} if self.crs == WGS84 else {"crs": {"type": "name", "properties": {"name": self.crs}}}
        features = [
            {"type": "Feature", "id": f.id, "geometry": _geojson(f.geometry), "properties": f.properties}
            for f in self.items
        ]
        return {"type": "FeatureCollection", **crs, "features": features}

    @classmethod
    def from_params(cls, value: object) -> Fields:
        """The fields of :meth:`to_params` (a job's params); :class:`InvalidMessage` (permanent) if they do not
        parse, which only a job not submitted through :func:`parse_fields` can carry."""
        features = value.get("features") if isinstance(value, dict) else None
        try:
            return parse_fields(value, max(len(features) if isinstance(features, list) else 0, 1))
        except Rejected as e:
            raise InvalidMessage(f"the job's fields do not parse: {e.detail}") from e


def parse_fields(value: object, max_fields: int) -> Fields:
    """Parse GeoJSON field boundaries; raises :class:`Rejected` (``invalid_geometry``, ``too_many_fields``)."""
    if not isinstance(value, dict):
        raise _invalid("fields must be a GeoJSON object (Polygon, MultiPolygon, Feature or FeatureCollection)")
    crs = _crs(value.get("crs"))
    kind = value.get("type")
    if kind == "FeatureCollection":
        features = value.get("features")
        if not isinstance(features, list) or not features:
            raise _invalid("the FeatureCollection has no features: it is empty")
    elif kind == "Feature":
        features = [_without_crs(value)]
    elif kind in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": _without_crs(value)}]
    else:
        raise _invalid(f"fields must be a Polygon, MultiPolygon, Feature or FeatureCollection, not {kind!r}")
    if len(features) > max_fields:
        raise Rejected("too_many_fields", f"{len(features)} fields; the limit is {max_fields}")
    to_wgs84 = None if crs == WGS84 else Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)
    fields, seen, vertices = [], set(), 0
    for position, feature in enumerate(features, start=1):
        field_id, properties, coordinates = _feature(feature, position)
        if field_id in seen:
            raise _invalid(f"field id {field_id!r} is used twice: ids must be unique")
        seen.add(field_id)
        vertices += _count(coordinates)
        if vertices > MAX_VERTICES:
            raise _invalid(f"the fields have more than {MAX_VERTICES} vertices in all: simplify them")
        fields.append(_field(field_id, properties, coordinates, to_wgs84))
    return Fields(crs, tuple(fields))


def _without_crs(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "crs"}


def _crs(member: object) -> str:
    if member is None:
        return WGS84
    props = member.get("properties") if isinstance(member, dict) else None
    name = props.get("name") if isinstance(props, dict) else None
    if not isinstance(member, dict) or member.get("type") != "name" or not isinstance(name, str):
        raise _invalid('crs must be a named CRS: {"type": "name", "properties": {"name": "EPSG:32633"}}')
    if _CRS84.match(name):
        return WGS84
    code = _EPSG.match(name)
    if code is None:
        raise _invalid(f"unknown CRS {name!r}: give an EPSG code (EPSG:32633) or leave crs out for WGS 84")
    try:
        crs = CRS.from_epsg(int(code.group(1)))
    except CRSError as e:
        raise _invalid(f"unknown CRS {name!r}: no such EPSG code") from e
    if not (crs.is_projected or crs.is_geographic):
        raise _invalid(f"CRS {name!r} ({crs.name}) is neither geographic nor projected")
    return WGS84 if crs.to_epsg() == 4326 else f"EPSG:{crs.to_epsg()}"


def _feature(feature: object, position: int) -> tuple[str, dict[str, Any] | None, list[Any]]:
    """(id, properties, polygons' coordinates) of one feature."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise _invalid(f"feature {position} is not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if "crs" in feature or (isinstance(geometry, dict) and "crs" in geometry):
        raise _invalid(f"feature {position}: crs is accepted on the top-level object only")
    properties = feature.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise _invalid(f"feature {position}: properties must be an object or null")
    raw_id = next((v for v in (feature.get("id"), (properties or {}).get("id")) if v is not None), position)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not 0 < len(str(raw_id)) <= MAX_ID_LENGTH:
        raise _invalid(f"feature {position}: id must be a non-empty string (at most {MAX_ID_LENGTH}) or an integer")
    field_id = str(raw_id)
    if not isinstance(geometry, dict):
        raise _invalid(f"field {field_id!r} has no geometry: it is empty")
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if kind not in ("Polygon", "MultiPolygon"):
        raise _invalid(f"field {field_id!r} is a {kind!r}: a field must be a Polygon or MultiPolygon")
    if not isinstance(coordinates, list) or not coordinates:
        raise _invalid(f"field {field_id!r} has no coordinates: it is empty")
    polygons = [coordinates] if kind == "Polygon" else coordinates
    return field_id, properties, [_rings(field_id, polygon) for polygon in polygons]


def _rings(field_id: str, polygon: object) -> list[list[tuple[float, float]]]:
    if not isinstance(polygon, list) or not polygon:
        raise _invalid(f"field {field_id!r}: a polygon has no rings: it is empty")
    rings = []
    for ring in polygon:
        if not isinstance(ring, list) or len(ring) < 4:
            raise _invalid(f"field {field_id!r}: a ring needs at least 4 positions (the last repeating the first)")
        points = [_position(field_id, p) for p in ring]
        if points[0] != points[-1]:
            raise _invalid(f"field {field_id!r}: a ring is not closed (its last position must equal its first)")
        rings.append(points)
    return rings


def _position(field_id: str, p: object) -> tuple[float, float]:
    if not isinstance(p, list) or len(p) not in (2, 3) or not all(_number(v) for v in p):
        raise _invalid(f"field {field_id!r}: a position must be [x, y] or [x, y, z] numbers, not {p!r:.60}")
    x, y = float(p[0]), float(p[1])
    if not (math.isfinite(x) and math.isfinite(y)):
        raise _invalid(f"field {field_id!r}: a coordinate is NaN or infinite")
    return x, y


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(polygons: list[Any]) -> int:
    return sum(len(ring) for rings in polygons for ring in rings)


def _field(
    field_id: str, properties: dict[str, Any] | None, polygons: list[Any], to_wgs84: Transformer | None
) -> Field:
    parts = [Polygon(rings[0], rings[1:]) for rings in polygons]
    geometry = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    if not geometry.is_valid:
        raise _invalid(f"field {field_id!r} is not a valid polygon: {shapely.is_valid_reason(geometry)}")
    if geometry.area <= 0:
        raise _invalid(f"field {field_id!r} has no area: it is empty")
    wgs84 = geometry if to_wgs84 is None else shapely.transform(geometry, _xy(to_wgs84))
    west, south, east, north = wgs84.bounds
    if not (west >= -180 and east <= 180 and south >= -90 and north <= 90):  # NaN (a failed transform) fails too
        where = "is it projected? give its crs member" if to_wgs84 is None else "outside the CRS's valid range"
        raise _invalid(f"field {field_id!r} lies outside longitude -180..180, latitude -90..90: {where}")
    parts_wgs84 = list(wgs84.geoms) if isinstance(wgs84, MultiPolygon) else [wgs84]
    if any(part.bounds[2] - part.bounds[0] > 180 for part in parts_wgs84):  # RFC 7946 3.1.9: split, one part a side
        raise _invalid(f"field {field_id!r} spans more than 180 degrees of longitude: split it at the antimeridian")
    return Field(field_id, geometry, wgs84, geodesic_area_m2(wgs84) / 10_000, properties)


def _xy(transformer: Transformer) -> Any:
    """For :func:`shapely.transform`: [N, 2] coordinates through ``transformer``."""

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return apply


def geodesic_area_m2(wgs84: Any) -> float:
    """Area on the WGS 84 ellipsoid of a (Multi)Polygon in longitude, latitude, whatever its rings' orientation."""
    total = 0.0
    for part in getattr(wgs84, "geoms", [wgs84]):
        shell = abs(_GEOD.polygon_area_perimeter(*part.exterior.xy)[0])
        holes = sum(abs(_GEOD.polygon_area_perimeter(*ring.xy)[0]) for ring in part.interiors)
        total += shell - holes
    return total


class PlacementError(ValueError):
    """The fields cannot be placed on the image: PROJ cannot read its CRS or transform to it."""


def in_crs(fields: Fields, crs: str) -> list[Any]:
    """The fields' geometries in ``crs`` (any form pyproj reads: "EPSG:32618", WKT), vertex by vertex; a vertex that
    does not project comes out infinite. Raises :class:`PlacementError`."""
    try:
        target = CRS.from_user_input(crs)
        if CRS.from_user_input(fields.crs) == target:
            return [f.geometry for f in fields]
        transformer = Transformer.from_crs(CRS.from_user_input(fields.crs), target, always_xy=True)
    except (CRSError, ProjError) as e:
        raise PlacementError(f"the fields cannot be placed in the image's CRS: {e}") from e
    return [shapely.transform(f.geometry, _xy(transformer)) for f in fields]


def outside(fields: Fields, crs: str, transform: Sequence[float], width: int, height: int) -> list[str]:
    """Ids of the fields that do not intersect the scene: ``width`` x ``height`` pixels on ``transform`` (affine
    a, b, c, d, e, f) in ``crs``. A field that does not project into ``crs`` (infinite coordinates) is outside.
    Raises :class:`PlacementError`."""
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    corners = [(c + a * col + b * row, f + d * col + e * row) for col, row in ((0, 0), (width, 0), (width, height),
                                                                               (0, height))]  # fmt: skip
    footprint = Polygon(corners)
    if b == 0 and d == 0:
        footprint = box(*footprint.bounds)
    placed = zip(fields, in_crs(fields, crs), strict=True)
    return [f.id for f, g in placed if not (np.isfinite(shapely.get_coordinates(g)).all() and g.intersects(footprint))]


def outside_detail(ids: list[str], total: int) -> str:
    shown = ", ".join(repr(i) for i in ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return f"{len(ids)} of the {total} fields lie outside the image: {shown}"


def check_intersects(fields: Fields, header: ImageHeader) -> None:
    """Refuse fields that do not intersect the image (``geometry_outside_scene``), when its header tells where it
    is: a CRS and a geotransform (``header.transform``, affine a..f). Without a geotransform the worker decides."""
    if header.crs is None:
        raise Rejected("geometry_outside_scene", "the image has no CRS: fields cannot be placed on it")
    if header.transform is None:
        return
    try:
        ids = outside(fields, header.crs, header.transform, header.width, header.height)
    except PlacementError as e:
        raise Rejected("geometry_outside_scene", str(e)) from e
    if ids:
        raise Rejected("geometry_outside_scene", outside_detail(ids, len(fields)))


def _geojson(geometry: Any) -> dict[str, Any]:
    def rings(polygon: Any) -> list[list[list[float]]]:
        return [[list(xy) for xy in ring.coords] for ring in (polygon.exterior, *polygon.interiors)]

    if isinstance(geometry, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [rings(p) for p in geometry.geoms]}
    return {"type": "Polygon", "coordinates": rings(geometry)}
