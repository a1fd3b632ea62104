"""Per-field statistics (crop-health with field boundaries) equal an independent reference on the same pixels: pixel
centres inside the polygon by shapely (not GDAL's rasteriser), indices in float64 numpy, on the real Sentinel-2 and
Landsat-8 crops (tests/data: contains modified Copernicus Sentinel data 2017; Landsat-8 courtesy of the USGS). The
analysis window is 64 px, so fields cross windows; one field runs off the scene and is clipped."""

from __future__ import annotations

import functools
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely  # type: ignore[import-untyped]
import torch
from affine import Affine
from PIL import Image
from pyproj import Transformer

from gpu_worker.analysis import AnalysisRequest, Analyzer, cloudmask
from gpu_worker.analysis.cover import band_indices
from gpu_worker.analysis.crop_health import CropHealth
from gpu_worker.settlement import Action, RetryPolicy, decide
from shared.bands import resolve
from shared.errors import GeometryOutsideScene, NoValidPixels, UnknownAnalysis
from shared.fields import Fields, parse_fields
from tests import geotiffs
from tests.unit.test_analysis_validity import ReadCounter

L8 = geotiffs.DATA / "l8_cloudy_200.tif"
INDEX_NAMES = ("ndvi", "ndwi", "evi", "savi")
TOLERANCE = 1e-6  # the analysis computes NDVI, NDWI and SAVI in float32 (docs/analysis.md, "Numerics")


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(torch.device("cpu"))


@pytest.fixture
def small_windows(analyzer: Analyzer, monkeypatch: pytest.MonkeyPatch) -> Analyzer:
    monkeypatch.setattr(analyzer._crop_health, "window", 64)
    return analyzer


def run(analyzer: Analyzer, path: Path, workdir: Path, fields: Fields | None, scale: float = 10000.0) -> Any:
    workdir.mkdir(exist_ok=True)
    return analyzer.analyse(path, AnalysisRequest("crop-health", [], scale, fields=fields), workdir)


def to_map(path: Path, points: list[tuple[float, float]]) -> list[list[float]]:
    """Pixel (column, row) positions -> a closed ring of the file's map coordinates."""
    with rasterio.open(path) as ds:
        ring = [list(ds.transform @ xy) for xy in points]
    return [*ring, ring[0]]


def rect(c0: float, r0: float, c1: float, r1: float) -> list[tuple[float, float]]:
    return [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]


def utm_fields(path: Path, crs: str, shapes: dict[str, list[list[list[tuple[float, float]]]]]) -> dict[str, Any]:
    """A FeatureCollection in the scene's CRS; ``shapes``: id -> polygons -> rings in pixel coordinates."""
    features = []
    for fid, polygons in shapes.items():
        coordinates = [[to_map(path, ring) for ring in rings] for rings in polygons]
        geometry = {"type": "Polygon", "coordinates": coordinates[0]} if len(coordinates) == 1 else {
            "type": "MultiPolygon", "coordinates": coordinates}  # fmt: skip
        features.append({"type": "Feature", "id": fid, "geometry": geometry, "properties": {"name": f"field {fid}"}})
    return {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}}, "features": features}


# On the 256 x 256 fields crop (pixel coordinates): "cross" spans four 64 px windows, "edge" runs off the east and
# south edges, "multi" is two parts, "sliver" lies between pixel centres (no pixel), "holed" has a hole, "overlap"
# overlaps "cross".
S2_SHAPES = {
    "cross": [[[(40.3, 50.2), (150.7, 45.9), (170.2, 120.4), (90.6, 160.8), (35.1, 110.3)]]],
    "edge": [[[(220.4, 180.3), (300.2, 190.7), (290.9, 270.1), (215.6, 250.8)]]],
    "multi": [[rect(180.2, 20.3, 200.8, 40.6)], [rect(230.1, 60.2, 250.7, 90.9)]],
    "sliver": [[rect(100.6, 200.6, 100.9, 200.9)]],
    "holed": [[rect(20.2, 170.4, 80.9, 240.3), rect(40.7, 190.8, 60.3, 210.2)]],
    "overlap": [[rect(120.4, 100.3, 190.6, 150.2)]],  # shares pixels with "cross": each field is measured alone
}


def centres_inside(path: Path, geometry: Any) -> np.ndarray:
    """[h, w] bool: pixels whose centre is inside ``geometry`` (scene CRS), by shapely."""
    with rasterio.open(path) as ds:
        cols, rows = np.meshgrid(np.arange(ds.width) + 0.5, np.arange(ds.height) + 0.5)
        t = ds.transform
        xs, ys = t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows
    inside: np.ndarray = shapely.contains_xy(geometry, xs, ys)
    return inside


def summary(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    p10, p50, p90 = np.percentile(values, (10, 50, 90))
    return {"mean": values.mean(), "std": values.std(), "p10": p10, "p50": p50, "p90": p90, "count": values.size}


def reference(
    analyzer: Analyzer, path: Path, mask: np.ndarray, scale: float, cloud: np.ndarray | None
) -> dict[str, Any]:
    """The field's statistics computed independently on its pixels: float64 numpy from the stored DNs (nodata 0)."""
    with rasterio.open(path) as ds:
        dn = ds.read().astype(np.float64)
        bands = resolve([d or "" for d in ds.descriptions])
        nodata = ds.nodata
    band = {role: dn[bands.index(role)] for role in ("blue", "green", "red", "nir")}
    ok = {role: (v != nodata) & mask for role, v in band.items()}
    r = {role: v / scale for role, v in band.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        formulas = {
            "ndvi": ((r["nir"] - r["red"]) / (r["nir"] + r["red"]), ok["red"] & ok["nir"]),
            "ndwi": ((r["green"] - r["nir"]) / (r["green"] + r["nir"]), ok["green"] & ok["nir"]),
            "evi": (2.5 * (r["nir"] - r["red"]) / (r["nir"] + 6 * r["red"] - 7.5 * r["blue"] + 1),
                    ok["blue"] & ok["red"] & ok["nir"]),
            "savi": (1.5 * (r["nir"] - r["red"]) / (r["nir"] + r["red"] + 0.5), ok["red"] & ok["nir"]),
        }  # fmt: skip
    index = {name: (v, m & np.isfinite(v)) for name, (v, m) in formulas.items()}
    valid = index["ndvi"][1]
    cloudy = np.zeros_like(valid) if cloud is None else cloud & valid
    clear = valid & ~cloudy
    ndwi, ndwi_ok = index["ndwi"][0], index["ndwi"][1] & valid
    water = clear & ndwi_ok & (ndwi > 0)
    land = clear & ~water
    n = int(mask.sum())
    out: dict[str, Any] = {
        "pixel_count": n,
        "valid_fraction": valid.sum() / n if n else None,
        "cloud_fraction": cloudy.sum() / valid.sum() if valid.any() and cloud is not None else None,
        "water_fraction": water.sum() / (clear & ndwi_ok).sum() if (clear & ndwi_ok).any() else None,
        "vegetation_fraction": (land & (index["ndvi"][0] > 0.3)).sum() / land.sum() if land.any() else None,
        "indices": {name: summary(v[m & valid]) for name, (v, m) in index.items()},
        "indices_clear": {name: summary(v[m & clear]) for name, (v, m) in index.items()} if cloud is not None else None,
        "cover": None,
    }  # fmt: skip
    channels = band_indices(bands)
    assert channels is not None
    counted = land & np.all([dn[c] != nodata for c in channels], axis=0)
    if counted.any():
        pixels = torch.from_numpy(dn[channels[1:]][:, counted].astype(np.float32)) / scale  # float32, as the worker
        with torch.inference_mode():
            means = analyzer._crop_health.cover.fractions(pixels).to(torch.float64).mean(dim=1).tolist()
        out["cover"] = dict(zip(("bare", "green", "non_green"), means, strict=True))
    return out


def max_diff(got: Any, want: Any, where: str = "") -> float:
    """The largest absolute difference between two result trees; asserts that they have the same nulls and keys."""
    if want is None or got is None:
        assert got is None, f"{where}: {got!r} != {want!r}"
        assert want is None, f"{where}: {got!r} != {want!r}"
        return 0.0
    if isinstance(want, dict):
        assert set(want) <= set(got), where
        return max([max_diff(got[k], want[k], f"{where}.{k}") for k in want] or [0.0])
    if isinstance(want, int | np.integer | str | bool):
        assert got == want, f"{where}: {got} != {want}"
        return 0.0
    return abs(float(got) - float(want))


def fields_in_scene_crs(fields: Fields, crs: str) -> list[Any]:
    """The fields' polygons in ``crs``, transformed here with pyproj (not by the code under test)."""
    if fields.crs == crs:
        return [f.geometry for f in fields]
    t = Transformer.from_crs(fields.crs, crs, always_xy=True)
    return [shapely.transform(f.geometry, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1]))) for f in fields]


def check_against_reference(
    analyzer: Analyzer, path: Path, result: dict[str, Any], fields: Fields, scale: float, cloud: np.ndarray | None
) -> float:
    crs = result["scene"]["crs"]
    worst = 0.0
    for entry, field, geometry in zip(result["fields"], fields, fields_in_scene_crs(fields, crs), strict=True):
        want = reference(analyzer, path, centres_inside(path, geometry), scale, cloud)
        assert (entry["id"], entry["area_ha"], entry["properties"]) == (field.id, field.area_ha, field.properties)
        worst = max(worst, max_diff(entry, want, entry["id"]))
    assert worst < TOLERANCE
    return worst


def test_per_field_statistics_equal_an_independent_reference(small_windows: Analyzer, tmp_path: Path) -> None:
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", S2_SHAPES), 10)
    out = run(small_windows, geotiffs.FIELDS, tmp_path / "w", fields)
    check_against_reference(small_windows, geotiffs.FIELDS, out.result, fields, 10000.0, np.zeros((256, 256), bool))
    by_id = {f["id"]: f for f in out.result["fields"]}
    assert 0 < by_id["edge"]["pixel_count"] < by_id["edge"]["area_ha"] * 100  # clipped: a 10 m pixel is 0.01 ha
    sliver = by_id["sliver"]
    assert (sliver["pixel_count"], sliver["valid_fraction"], sliver["cover"]) == (0, None, None)
    assert all(v is None for v in sliver["indices"].values())
    assert "valid_fraction" not in out.result  # fields instead of the whole scene's statistics
    assert out.result["cover_note"]


def test_fields_given_in_wgs84_are_reprojected_to_the_scene(small_windows: Analyzer, tmp_path: Path) -> None:
    utm = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", S2_SHAPES), 10)
    to_lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)

    def lonlat(ring: Any) -> list[list[float]]:
        return [list(to_lonlat.transform(x, y)) for x, y in ring.coords]

    features = [
        {"type": "Feature", "id": f.id, "properties": f.properties,
         "geometry": {"type": "MultiPolygon", "coordinates": [[lonlat(p.exterior), *map(lonlat, p.interiors)]
                                                              for p in getattr(f.geometry, "geoms", [f.geometry])]}}
        for f in utm
    ]  # fmt: skip
    fields = parse_fields({"type": "FeatureCollection", "features": features}, 10)
    out = run(small_windows, geotiffs.FIELDS, tmp_path / "w", fields)
    check_against_reference(small_windows, geotiffs.FIELDS, out.result, fields, 10000.0, np.zeros((256, 256), bool))
    same = run(small_windows, geotiffs.FIELDS, tmp_path / "u", utm).result["fields"]
    for a, b in zip(out.result["fields"], same, strict=True):
        assert a["area_ha"] == pytest.approx(b["area_ha"], rel=1e-6)  # the same polygon, its vertices reprojected
        assert {k: v for k, v in a.items() if k != "area_ha"} == {k: v for k, v in b.items() if k != "area_ha"}


def test_landsat_fields_with_clouds_equal_the_reference(small_windows: Analyzer, tmp_path: Path) -> None:
    """The real cloudy Landsat-8 crop (30 m, UTM 16N, pre-collection BQA): cloud fractions per field from the QA
    bits, computed here in numpy."""
    shapes = {
        "cloudy": [[[(30.2, 20.6), (140.3, 35.1), (120.8, 110.4), (25.5, 90.2)]]],
        "edge": [[rect(150.3, 130.2, 230.8, 240.9)]],
    }
    fields = parse_fields(utm_fields(L8, "EPSG:32616", shapes), 10)
    out = run(small_windows, L8, tmp_path / "w", fields, scale=50000.0)
    with rasterio.open(L8) as ds:
        qa = ds.read(7).astype(np.int64)
    cloud = (((qa >> 14) & 3) >= 2) | (((qa >> 12) & 3) == 3)
    check_against_reference(small_windows, L8, out.result, fields, 50000.0, cloud)
    assert 0 < out.result["fields"][0]["cloud_fraction"] < 1


def test_the_s2_cloud_mask_over_the_fields_equals_the_whole_scenes(
    small_windows: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass 1 reads only the coarse cells the fields' mask depends on; the mask is the same as the whole scene's.
    The crop is cloud-free at s2cloudless's threshold, so the test lowers it (as the reference file does)."""
    low = float(np.load(geotiffs.DATA / "s2cloudless_s2_l1c_fields_256.npz")["threshold_low"])
    monkeypatch.setattr(cloudmask, "postprocess", functools.partial(cloudmask.postprocess, threshold=low))
    shapes = {"corner": [[rect(3.3, 4.4, 40.2, 30.1)]], "middle": S2_SHAPES["cross"][:1]}
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", shapes), 10)
    scene = run(small_windows, geotiffs.FIELDS, tmp_path / "s", None)
    with rasterio.open(scene.files["cloud_mask_cog"][0]) as cog:
        cloud = cog.read(1) == 1
    assert cloud.any()
    out = run(small_windows, geotiffs.FIELDS, tmp_path / "f", fields)
    check_against_reference(small_windows, geotiffs.FIELDS, out.result, fields, 10000.0, cloud)
    assert any(0 < f["cloud_fraction"] < 1 for f in out.result["fields"])


def test_each_field_gets_a_clip_holding_exactly_its_pixels(small_windows: Analyzer, tmp_path: Path) -> None:
    """Each field's COG covers its pixel box on the scene's grid; its bands equal the whole scene's NDVI, cloud mask
    and cover COGs at the field's pixels (pixel centres inside the polygon, by shapely) and are nodata elsewhere."""
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", S2_SHAPES), 10)
    out = run(small_windows, geotiffs.FIELDS, tmp_path / "f", fields)
    scene = run(small_windows, geotiffs.FIELDS, tmp_path / "s", None)
    keys = [f"field_{n}_cog" for n in range(1, len(fields) + 1)]
    assert set(out.files) == {*keys, "quicklook_png"}
    assert [entry["output"] for entry in out.result["fields"]] == keys
    assert [out.files[k][0].name for k in keys] == [f"field_{n}.tif" for n in range(1, len(fields) + 1)]
    with (
        rasterio.open(scene.files["ndvi_cog"][0]) as whole,
        rasterio.open(scene.files["cloud_mask_cog"][0]) as cloud_cog,
        rasterio.open(scene.files["cover_cog"][0]) as cover_cog,
    ):
        expected = np.concatenate([whole.read(), cloud_cog.read().astype(np.float32), cover_cog.read()])
        expected[1][cloud_cog.read(1) == 255] = np.nan
        expected[2:][cover_cog.read() == 255] = np.nan
        transform, crs = whole.transform, whole.crs
    for key, geometry, entry in zip(keys, fields_in_scene_crs(fields, "EPSG:32618"), out.result["fields"], strict=True):
        inside = centres_inside(geotiffs.FIELDS, geometry)
        with rasterio.open(out.files[key][0]) as clip:
            col, row = (round(v) for v in ~transform @ (clip.transform.c, clip.transform.f))
            assert clip.transform == transform @ transform.translation(col, row)
            assert (clip.crs, clip.count, clip.dtypes[0]) == (crs, 5, "float32")
            assert clip.descriptions == ("ndvi", "cloud", "bare_cover_percent", "green_cover_percent",
                                         "non_green_cover_percent")  # fmt: skip
            assert clip.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            bands = clip.read()
        rows, cols = slice(row, row + clip.height), slice(col, col + clip.width)
        local = inside[rows, cols]
        assert local.sum() == inside.sum() == entry["pixel_count"], key  # the clip holds every pixel of the field
        want = np.where(local, expected[:, rows, cols], np.nan)
        np.testing.assert_array_equal(bands, want, err_msg=key)
    assert np.isfinite(expected[2:]).any()
    assert (expected[1] == 0).any()
    with Image.open(out.files["quicklook_png"][0]) as png:
        assert png.format == "PNG"
        assert (np.asarray(png)[:-72] == 255).any()  # the field outlines (palette index 255: black)


def test_the_quicklook_of_far_apart_fields_has_a_bounded_size(tmp_path: Path) -> None:
    """Two small clips 20 000 px apart: the quicklook shows both, at most 1024 px wide."""
    from gpu_worker.analysis import quicklook

    clips = []
    for n, (col, row) in enumerate([(100, 200), (20_000, 15_000)]):
        path = tmp_path / f"field_{n}.tif"
        data = np.full((5, 40, 30), np.nan, np.float32)
        data[0] = 0.5 + 0.1 * n
        transform = Affine(10, 0, col * 10, 0, -10, -row * 10)
        with rasterio.open(path, "w", driver="GTiff", width=30, height=40, count=5, dtype="float32",
                           nodata=float("nan"), crs="EPSG:32618", transform=transform) as dst:  # fmt: skip
            dst.write(data)
        clips.append((path, col, row))
    png = quicklook.render_clips(clips, 20_030, 15_040, tmp_path / "q.png", clouds=True)
    with Image.open(png) as image:
        assert image.width <= quicklook.MAX_SIDE
        assert image.height <= quicklook.MAX_SIDE
        pixels = np.asarray(image)[: -quicklook.LEGEND_HEIGHT]
    ramp = pixels < quicklook.RAMP_STEPS  # NDVI colours (not no data, legend or outline)
    scale = max(20_030 / quicklook.MAX_SIDE, 15_040 / (quicklook.MAX_SIDE - quicklook.LEGEND_HEIGHT))
    for _, col, row in clips:  # each field at its place, however small
        assert ramp[int(row / scale), int(col / scale)], (col, row)
    assert ramp.sum() <= 2 * 3 * 3  # and nothing else: a 30 x 40 clip spans at most 3 x 3 quicklook pixels


def test_only_the_windows_under_the_fields_are_read(
    small_windows: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = {"a": [[rect(3.3, 4.4, 40.2, 30.1)]], "b": [[rect(70.3, 10.2, 90.1, 20.8)]]}  # two fields, 2 windows
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", shapes), 10)
    reads = ReadCounter(monkeypatch)
    run(small_windows, geotiffs.FIELDS, tmp_path / "s", None)
    whole = reads.pixels
    reads.pixels = 0
    run(small_windows, geotiffs.FIELDS, tmp_path / "f", fields)
    assert reads.pixels < whole / 4


def scene_with_a_hole(tmp_path: Path) -> Path:
    """The RGBN crop with its top-left 64 x 64 pixels nodata (0)."""
    with rasterio.open(geotiffs.RGBN) as src:
        data, names = src.read(), [d or "" for d in src.descriptions]
    data[:, :64, :64] = 0
    return geotiffs.write_scene(tmp_path / "hole.tif", data, names, nodata=0)


def test_a_field_without_valid_pixels_is_reported_with_nulls(small_windows: Analyzer, tmp_path: Path) -> None:
    path = scene_with_a_hole(tmp_path)
    fields = parse_fields(utm_fields(path, "EPSG:32618", {"empty": [[rect(10.2, 10.2, 40.7, 40.7)]],
                                                          "fine": [[rect(80.2, 80.2, 100.7, 100.7)]]}), 10)  # fmt: skip
    result = run(small_windows, path, tmp_path / "w", fields).result
    empty, fine = result["fields"]
    assert (empty["pixel_count"], empty["valid_fraction"]) == (961, 0.0)  # 31 x 31 pixel centres, all nodata
    assert (empty["indices"]["ndvi"], empty["cover"], empty["cloud_fraction"]) == (None, None, None)
    assert (fine["valid_fraction"], fine["indices"]["ndvi"]["count"]) == (1.0, 441)


def test_fields_without_any_valid_pixel_fail_no_valid_pixels(small_windows: Analyzer, tmp_path: Path) -> None:
    path = scene_with_a_hole(tmp_path)
    fields = parse_fields(utm_fields(path, "EPSG:32618", {"a": [[rect(10.2, 10.2, 40.7, 40.7)]],
                                                          "b": [[rect(45.2, 45.2, 60.7, 60.7)]]}), 10)  # fmt: skip
    with pytest.raises(NoValidPixels, match="nodata or not a number in red and NIR within the fields"):
        run(small_windows, path, tmp_path / "w", fields)
    assert list((tmp_path / "w").iterdir()) == []


def test_a_field_outside_the_scene_fails_the_job_permanently(analyzer: Analyzer, tmp_path: Path) -> None:
    lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    inside = [list(lonlat.transform(x, y)) for x, y in to_map(geotiffs.FIELDS, rect(10, 10, 20, 20))]
    away = [[10.0, 50.0], [10.01, 50.0], [10.01, 50.01], [10.0, 50.0]]  # Germany
    features = [
        {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [ring]}}
        for fid, ring in (("in", inside), ("away", away))
    ]
    fields = parse_fields({"type": "FeatureCollection", "features": features}, 10)
    with pytest.raises(GeometryOutsideScene, match="1 of the 2 fields lie outside the image: 'away'") as info:
        run(analyzer, geotiffs.FIELDS, tmp_path / "w", fields)
    decision = decide(info.value, 1, RetryPolicy(5, timedelta(seconds=1), timedelta(seconds=1)))
    assert (decision.action, decision.reason, decision.fail_code) == (
        Action.DEAD_LETTER, "GeometryOutsideScene", "geometry_outside_scene",
    )  # fmt: skip


def test_fields_with_a_model_analysis_are_refused(analyzer: Analyzer, tmp_path: Path) -> None:
    fields = parse_fields({"type": "Polygon", "coordinates": [[[-75.67, 37.71], [-75.66, 37.71], [-75.66, 37.72],
                                                               [-75.67, 37.71]]]}, 1)  # fmt: skip
    with pytest.raises(UnknownAnalysis, match="crop-health"):
        analyzer.analyse(geotiffs.FIELDS, AnalysisRequest("model:x", [], 1.0, fields=fields), tmp_path)


def test_area_agrees_with_the_utm_area_of_the_same_polygon() -> None:
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", S2_SHAPES), 10)
    for field in fields:
        planar_ha = field.geometry.area / 10_000  # UTM 18N, metres
        assert field.area_ha == pytest.approx(planar_ha, rel=0.005)
        assert not math.isclose(field.area_ha, planar_ha, rel_tol=1e-5)


def test_fields_without_a_pixel_centre_fail_no_valid_pixels(analyzer: Analyzer, tmp_path: Path) -> None:
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", {"tiny": S2_SHAPES["sliver"]}), 10)
    with pytest.raises(NoValidPixels, match="no pixel of the image has its centre inside a field"):
        run(analyzer, geotiffs.FIELDS, tmp_path / "w", fields)
    assert list((tmp_path / "w").iterdir()) == []


def test_a_scene_without_a_crs_cannot_take_fields(analyzer: Analyzer, tmp_path: Path) -> None:
    with rasterio.open(geotiffs.RGBN) as src:
        data, names = src.read(), [d or "" for d in src.descriptions]
    path = geotiffs.write_scene(tmp_path / "nocrs.tif", data, names, crs=None)
    fields = parse_fields(utm_fields(geotiffs.RGBN, "EPSG:32618", {"a": [[rect(10.2, 10.2, 40.7, 40.7)]]}), 10)
    with pytest.raises(GeometryOutsideScene, match="no CRS"):
        run(analyzer, path, tmp_path / "w", fields)


def test_the_batched_cover_path_gives_the_same_fields(tmp_path: Path) -> None:
    """On CUDA the cover MLP runs through the dynamic batcher; the per-field sums must not depend on it (run here on
    the CPU with the same code)."""
    fields = parse_fields(utm_fields(geotiffs.FIELDS, "EPSG:32618", S2_SHAPES), 10)
    request = AnalysisRequest("crop-health", [], 10000.0, fields=fields)
    results = []
    for batching in (False, True):
        workdir = tmp_path / str(batching)
        workdir.mkdir()
        health = CropHealth(torch.device("cpu"), window=64, cover_batching=batching)
        results.append(health.run(geotiffs.FIELDS, request, workdir).result["fields"])
    direct, batched = results
    for a, b in zip(direct, batched, strict=True):
        assert max_diff(b, a, a["id"]) < 1e-6
