"""Issue 4 through the HTTP API: crop-health science on real scenes, its downloadable outputs, and the model slot.

Every job is submitted to ``POST /api/jobs`` and read back from its status URL; every output is fetched with a
plain HTTP GET of the URL the status endpoint returns (a read SAS against Azurite). References: numpy on the
input (NDVI mean, the model's class map), the scene itself (clear fields, sea, a cumulus field), the COG layout.

The 256 px crops fit in one 512 x 512 COG tile, so GDAL writes no overview for them (the COG driver stops once a
level fits in one tile); overviews are asserted on a 640 px scene grown from the fields crop by mirroring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import rasterio
from PIL import Image

from tests.acceptance.client import poll, submit
from tests.acceptance.models import CLASS_NAMES, MODEL_NAME, NODATA_CLASS, expected_classes

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("worker")]

DATA = Path(__file__).resolve().parents[1] / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"
COAST = DATA / "s2_l1c_coast_256.tif"
RGBN = DATA / "s2_rgbn_fields_128.tif"
LANDSAT = DATA / "l8_cloudy_200.tif"
CROP_HEALTH_COGS = ("ndvi_cog", "cover_cog", "cloud_mask_cog")
COG_TILE = 512  # gpu_worker.analysis.outputs.TILE


def cog_tile(width: int, height: int) -> int:
    """512, or the smallest power of two (at least 16) that holds a smaller raster (outputs.tile_for)."""
    side = 16
    while side < min(max(width, height), COG_TILE):
        side *= 2
    return side


def analyse(api: httpx.Client, path: Path, **params: str) -> dict[str, Any]:
    response = submit(api, path.read_bytes(), params=params)
    assert response.status_code == 202, response.text
    return poll(api, response.headers["Location"])


def succeeded(api: httpx.Client, path: Path, **params: str) -> dict[str, Any]:
    final = analyse(api, path, **params)
    assert final["status"] == "succeeded", final
    result: dict[str, Any] = final["result"]
    return result


def download(url: str, into: Path) -> Path:
    """A plain GET, as a browser would: no credentials but what the URL carries."""
    assert url.startswith("http"), url
    assert "/results/" in url, url
    assert "sig=" in url, f"not a read SAS: {url}"  # the results container is private
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    into.write_bytes(response.content)
    return into


def mirrored(src: Path, out: Path, size: int) -> Path:
    """``src`` grown to ``size`` x ``size`` by mirroring at its edges, on the same pixel grid (origin shifted)."""
    with rasterio.open(src) as ds:
        profile, data, names = ds.profile, ds.read(), ds.descriptions
    pad = (size - data.shape[1]) // 2, (size - data.shape[2]) // 2
    grown = np.pad(data, ((0, 0), (pad[0], size - data.shape[1] - pad[0]), (pad[1], size - data.shape[2] - pad[1])),
                   mode="reflect")  # fmt: skip
    transform = profile["transform"] @ rasterio.Affine.translation(-pad[1], -pad[0])
    profile.update(width=size, height=size, transform=transform, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")  # fmt: skip
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(grown)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return out


def assert_cog_on_input_grid(cog: Path, source: Path) -> rasterio.DatasetReader:
    """Same CRS, transform and size as ``source``; a tiled COG; overviews whenever the scene exceeds one tile."""
    ds = rasterio.open(cog)
    with rasterio.open(source) as src:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (src.crs, src.transform, src.width, src.height)
    assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    assert ds.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
    tile = cog_tile(ds.width, ds.height)
    assert set(ds.block_shapes) == {(tile, tile)}  # tiles, not strips
    if max(ds.width, ds.height) > COG_TILE:
        assert ds.overviews(1), f"{cog.name}: no internal overviews on a {ds.width} x {ds.height} scene"
    else:
        assert ds.overviews(1) == []  # one tile: nothing to reduce
    return ds


def assert_quicklook(png: Path) -> Image.Image:
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert max(image.size) <= 1024
        image.load()
        return image


def test_clear_fields_scene_gives_cover_indices_and_downloadable_outputs(api: httpx.Client, tmp_path: Path) -> None:
    result = succeeded(api, FIELDS)

    assert result["analysis"] == "crop-health"
    assert result["cloud_mask"]["method"] == "s2cloudless"
    assert result["cloud_fraction"] < 0.05  # a cloud-free scene
    assert result["clear_fraction"] == pytest.approx(1 - result["cloud_fraction"])
    cover = result["cover"]
    assert set(cover) == {"green", "non_green", "bare"}
    assert all(0.0 <= v <= 1.0 for v in cover.values())
    assert sum(cover.values()) == pytest.approx(1.0, abs=0.02)
    assert result["vegetation_fraction"] > 0.5  # summer fields and hedges
    assert result["indices"]["ndvi"]["p50"] > 0.3

    outputs = result["outputs"]
    assert set(outputs) == {*CROP_HEALTH_COGS, "quicklook_png"}
    cogs = {key: download(outputs[key], tmp_path / f"{key}.tif") for key in CROP_HEALTH_COGS}
    for path in cogs.values():
        assert_cog_on_input_grid(path, FIELDS).close()
    with rasterio.open(cogs["ndvi_cog"]) as ndvi:
        values = ndvi.read(1).astype(np.float64)
    valid = np.isfinite(values)
    assert int(valid.sum()) == result["indices"]["ndvi"]["count"]
    assert float(values[valid].mean()) == pytest.approx(result["indices"]["ndvi"]["mean"], abs=1e-4)
    with rasterio.open(cogs["cloud_mask_cog"]) as mask:
        clouds = mask.read(1)
    assert set(np.unique(clouds)) <= {0, 1, 255}
    assert float((clouds == 1).sum() / (clouds != 255).sum()) == pytest.approx(result["cloud_fraction"], abs=1e-6)
    with rasterio.open(cogs["cover_cog"]) as cover_cog:
        assert cover_cog.count == 3
        assert cover_cog.dtypes[0] == "uint8"
    assert_quicklook(download(outputs["quicklook_png"], tmp_path / "quicklook.png"))


def test_larger_scene_outputs_have_internal_overviews(api: httpx.Client, tmp_path: Path) -> None:
    scene = mirrored(FIELDS, tmp_path / "fields_640.tif", 640)
    result = succeeded(api, scene)

    assert result["scene"]["width"] == 640
    for key in CROP_HEALTH_COGS:
        with assert_cog_on_input_grid(download(result["outputs"][key], tmp_path / f"{key}.tif"), scene) as ds:
            assert ds.overviews(1) == [2]
    quicklook = assert_quicklook(download(result["outputs"]["quicklook_png"], tmp_path / "quicklook.png"))
    assert quicklook.width == 640  # at full resolution below 1024 px (the legend goes below)


def test_quicklook_of_a_scene_over_1024_px_is_scaled_down(api: httpx.Client, tmp_path: Path) -> None:
    scene = mirrored(RGBN, tmp_path / "rgbn_1200.tif", 1200)
    result = succeeded(api, scene)

    assert set(result["outputs"]) == {"ndvi_cog", "quicklook_png"}  # no cloud mask or cover from four bands
    assert result["cloud_fraction"] is None
    with assert_cog_on_input_grid(download(result["outputs"]["ndvi_cog"], tmp_path / "ndvi.tif"), scene) as ds:
        assert ds.overviews(1) == [2, 4]
    assert_quicklook(download(result["outputs"]["quicklook_png"], tmp_path / "quicklook.png"))


def test_coast_scene_is_mostly_sea(api: httpx.Client) -> None:
    result = succeeded(api, COAST)

    assert result["water_fraction"] > 0.5
    assert result["indices"]["ndvi"]["p50"] < 0.0
    assert result["cloud_fraction"] < 0.05


def test_cloudy_landsat_scene_is_masked_with_its_qa_band(api: httpx.Client, tmp_path: Path) -> None:
    # Landsat-8 L1 DN: reflectance ~ DN / 50000 (the scene's own gain 2e-5; the -0.1 offset is ignored here).
    result = succeeded(api, LANDSAT, scale="50000")

    assert result["cloud_mask"]["method"] == "landsat-qa"
    assert result["cloud_fraction"] > 0.3  # a cumulus field
    with rasterio.open(LANDSAT) as src:
        qa = src.read(7).astype(np.int64)
    cloudy = ((qa >> 14) & 3 >= 2) | ((qa >> 12) & 3 == 3)  # pre-collection BQA: cloud >= medium, cirrus high
    assert result["cloud_fraction"] == pytest.approx(float(cloudy.mean()), abs=1e-6)
    with rasterio.open(download(result["outputs"]["cloud_mask_cog"], tmp_path / "clouds.tif")) as mask:
        np.testing.assert_array_equal(mask.read(1), cloudy.astype(np.uint8))


def test_model_slot_matches_numpy_pixel_for_pixel(api: httpx.Client, tmp_path: Path) -> None:
    result = succeeded(api, RGBN, analysis=f"model:{MODEL_NAME}")

    with rasterio.open(RGBN) as src:
        red, nir = src.read(src.descriptions.index("B04") + 1), src.read(src.descriptions.index("B08") + 1)
        expected = expected_classes(red, nir, src.nodata)
    valid = expected != NODATA_CLASS
    assert result["analysis"] == f"model:{MODEL_NAME}"
    assert result["model"]["name"] == MODEL_NAME
    assert result["model"]["class_names"] == list(CLASS_NAMES)
    histogram = {name: float((expected == k).sum() / valid.sum()) for k, name in enumerate(CLASS_NAMES)}
    assert 0.2 < histogram["vegetation"] < 0.8  # both classes really occur
    assert result["class_histogram"] == pytest.approx(histogram, abs=1e-12)
    assert set(result["outputs"]) == {"class_map_cog"}
    cog = download(result["outputs"]["class_map_cog"], tmp_path / "classes.tif")
    with assert_cog_on_input_grid(cog, RGBN) as ds:
        assert ds.dtypes[0] == "uint8"
        assert ds.nodata == NODATA_CLASS
        np.testing.assert_array_equal(ds.read(1), expected)


@pytest.mark.parametrize("analysis", ["model:nope", "model:nir-over-red2"], ids=["unknown", "near-miss"])
def test_unknown_model_fails_the_job_with_unknown_analysis(api: httpx.Client, analysis: str) -> None:
    final = analyse(api, RGBN, analysis=analysis)

    assert final["status"] == "failed", final
    assert final["error"]["code"] == "unknown_analysis"
    assert "result" not in final or not final["result"]
