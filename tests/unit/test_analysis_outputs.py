"""Scene fractions, cover and the output files: COGs on the input's grid, values equal to a numpy reference,
a quicklook PNG a person can read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import rasterio
import rasterio.env
import rasterio.windows
import torch
from affine import Affine
from PIL import Image

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer, quicklook
from gpu_worker.analysis.outputs import RasterSink, tile_for
from gpu_worker.analysis.products import _finish_all
from gpu_worker.analysis.quicklook import MAX_SIDE
from gpu_worker.settlement import Cancelled

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(torch.device("cpu"))


def run(analyzer: Analyzer, path: Path, workdir: Path, bands: list[str] | None = None) -> AnalysisOutput:
    return analyzer.analyse(path, AnalysisRequest("crop-health", bands or [], 10000.0), workdir)


def write_tif(path: Path, data: np.ndarray, names: list[str]) -> Path:
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": "uint16", "crs": "EPSG:32618", "transform": Affine(10, 0, 440000, 0, -10, 4175000),
               "nodata": 0, "tiled": True, "compress": "deflate"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path


@pytest.mark.parametrize(
    ("crop", "keys"),
    [
        ("s2_l1c_fields_256.tif", {"ndvi_cog", "cloud_mask_cog", "cover_cog", "quicklook_png"}),
        ("s2_rgbn_fields_128.tif", {"ndvi_cog", "quicklook_png"}),
    ],
)
def test_outputs_follow_the_bands(crop: str, keys: set[str], analyzer: Analyzer, tmp_path: Path) -> None:
    out = run(analyzer, DATA / crop, tmp_path)
    assert set(out.files) == keys
    for path, content_type in out.files.values():
        assert path.parent == tmp_path
        assert path.stat().st_size > 0
        assert content_type in {"image/png", "image/tiff; application=geotiff; profile=cloud-optimized"}
    assert not list(tmp_path.glob(".*partial*"))  # partial files are cleaned up


def test_rgbn_has_no_cloud_mask_and_no_cover(analyzer: Analyzer, tmp_path: Path) -> None:
    result = run(analyzer, DATA / "s2_rgbn_fields_128.tif", tmp_path).result
    assert result["cloud_fraction"] is None
    assert result["clear_fraction"] is None
    assert result["cloud_mask"] is None
    assert result["indices_clear"] is None
    assert result["cover"] is None
    assert result["vegetation_fraction"] > 0.5


def test_real_scene_fractions(analyzer: Analyzer, tmp_path: Path) -> None:
    (tmp_path / "coast").mkdir()
    coast = run(analyzer, DATA / "s2_l1c_coast_256.tif", tmp_path / "coast").result
    fields = run(analyzer, DATA / "s2_l1c_fields_256.tif", tmp_path).result
    assert coast["water_fraction"] > 0.5  # lagoon and open sea
    assert fields["water_fraction"] < 0.1
    assert fields["vegetation_fraction"] > 0.5
    cover = fields["cover"]
    assert set(cover) == {"bare", "green", "non_green"}
    assert sum(cover.values()) == pytest.approx(1.0)
    assert cover["green"] > cover["bare"]  # summer fields and hedges
    assert fields["indices_clear"]["ndvi"]["mean"] == pytest.approx(fields["indices"]["ndvi"]["mean"])  # no cloud


def test_fractions_against_numpy(analyzer: Analyzer, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(100, 5000, size=(4, 60, 70)).astype(np.uint16)
    data[:, :5, :] = 0  # nodata rows
    path = write_tif(tmp_path / "in.tif", data, ["blue", "green", "red", "nir"])
    result = run(analyzer, path, tmp_path).result
    _, g, r, n = (data[i].astype(np.float64) for i in range(4))
    valid = (data != 0).all(axis=0)
    with np.errstate(invalid="ignore"):
        ndvi = (n - r) / (n + r)
        ndwi = (g - n) / (g + n)
    water = valid & (ndwi > 0)
    land = valid & ~water
    assert result["valid_fraction"] == pytest.approx(valid.mean())
    assert result["water_fraction"] == pytest.approx(water.sum() / valid.sum())
    assert result["vegetation_fraction"] == pytest.approx((land & (ndvi > 0.3)).sum() / land.sum())


def test_cogs_share_the_grid_and_hold_the_right_values(analyzer: Analyzer, tmp_path: Path) -> None:
    src_path = DATA / "s2_l1c_fields_256.tif"
    out = run(analyzer, src_path, tmp_path)
    with rasterio.open(src_path) as src:
        dn = src.read().astype(np.float64)
        grid = (src.crs, src.transform, src.width, src.height)
    red, nir = dn[3], dn[7]
    expected = ((nir - red) / (nir + red)).astype(np.float32)
    for key in ("ndvi_cog", "cloud_mask_cog", "cover_cog"):
        with rasterio.open(out.files[key][0]) as cog:
            assert (cog.crs, cog.transform, cog.width, cog.height) == grid
            assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert cog.compression is not None
            assert cog.block_shapes[0] == (256, 256)  # one tile: the smallest power of two that holds 256 x 256
            data = cog.read()
        if key == "ndvi_cog":
            np.testing.assert_allclose(data[0], expected, rtol=1e-6, atol=1e-7)  # float32 from float32 reflectance
        elif key == "cover_cog":
            assert data.shape[0] == 3
            land = data[0] != 255
            assert land.mean() > 0.9
            assert np.abs(data[:, land].astype(int).sum(axis=0) - 100).max() <= 2  # percent, rounded per band
        else:
            assert set(np.unique(data).tolist()) <= {0, 1}


def test_large_scene_gets_tiled_cog_with_overviews_and_a_small_quicklook(analyzer: Analyzer, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(200, 4000, size=(4, 1300, 1100)).astype(np.uint16)
    data[:, 1200:, :] = 0
    path = write_tif(tmp_path / "big.tif", data, ["B02", "B03", "B04", "B08"])
    saved_window = analyzer._crop_health.window
    analyzer._crop_health.window = 512  # several windows, with partial ones at the edges
    try:
        out = run(analyzer, path, tmp_path)
    finally:
        analyzer._crop_health.window = saved_window
    with rasterio.open(out.files["ndvi_cog"][0]) as cog:
        assert cog.block_shapes[0] == (512, 512)
        assert cog.overviews(1)  # internal overviews
        ndvi = cog.read(1)
    r, n = data[2].astype(np.float64), data[3].astype(np.float64)
    with np.errstate(invalid="ignore"):
        expected = np.where(data[2] != 0, (n - r) / (n + r), np.nan).astype(np.float32)
    np.testing.assert_allclose(ndvi, expected, rtol=1e-6, atol=1e-7)  # NaN where nodata on both sides; float32
    with Image.open(out.files["quicklook_png"][0]) as png:
        assert png.format == "PNG"
        assert max(png.size) <= MAX_SIDE
        assert png.height > png.width  # the scene is taller than wide, plus the legend below


@pytest.mark.parametrize(
    ("width", "height", "tile"),
    [(1, 1, 16), (16, 9, 16), (17, 3, 32), (128, 128, 128), (200, 90, 256), (512, 512, 512), (513, 20, 512),
     (11000, 11000, 512)],
)  # fmt: skip
def test_a_raster_smaller_than_a_tile_gets_one_tile_that_just_holds_it(width: int, height: int, tile: int) -> None:
    assert tile_for(width, height) == tile


def test_a_small_cog_is_one_small_tile_with_the_same_pixels(tmp_path: Path) -> None:
    grid = {"width": 100, "height": 60, "crs": "EPSG:32618", "transform": Affine(10, 0, 440000, 0, -10, 4175000)}
    data = np.random.default_rng(3).random((60, 100), dtype=np.float32)
    data[:5] = np.nan
    sink = RasterSink(tmp_path / "small.tif", grid, count=1, dtype="float32", nodata=float("nan"),
                      overview_resampling="average")  # fmt: skip
    sink.write(rasterio.windows.Window(0, 0, 100, 60), data)
    with rasterio.open(sink.finish()) as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert cog.block_shapes == [(128, 128)]
        assert cog.overviews(1) == []
        np.testing.assert_array_equal(cog.read(1), data)  # NaN where NaN


def test_the_cached_legend_gives_the_same_quicklook_as_a_fresh_one(analyzer: Analyzer, tmp_path: Path) -> None:
    out = run(analyzer, DATA / "s2_l1c_fields_256.tif", tmp_path)
    ndvi, cloud = out.files["ndvi_cog"][0], out.files["cloud_mask_cog"][0]
    quicklook._legend.cache_clear()
    fresh = quicklook.render(ndvi, tmp_path / "fresh.png", cloud).read_bytes()
    assert quicklook._legend.cache_info().misses == 1
    cached = quicklook.render(ndvi, tmp_path / "cached.png", cloud).read_bytes()
    assert quicklook._legend.cache_info().hits == 1
    assert cached == fresh
    without_clouds = quicklook.render(ndvi, tmp_path / "clear.png").read_bytes()  # another legend: no cloud key
    assert quicklook._legend.cache_info().misses == 2
    assert without_clouds != fresh


def test_open_sea_has_no_land_so_no_cover_and_no_vegetation_fraction(analyzer: Analyzer, tmp_path: Path) -> None:
    with rasterio.open(DATA / "s2_l1c_coast_256.tif") as src:
        profile = src.profile | {"width": 40, "height": 40}
        data = src.read(window=rasterio.windows.Window(200, 200, 40, 40))
        names = src.descriptions
    path = tmp_path / "sea.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    result = run(analyzer, path, tmp_path).result
    assert result["water_fraction"] == 1.0
    assert result["vegetation_fraction"] is None
    assert result["cover"] is None
    assert result["indices"]["ndvi"]["p90"] < 0


class _SlowSink:
    """A sink whose COG copy takes a while and is recorded."""

    def __init__(self, name: str, copied: list[str]) -> None:
        self.name, self.copied, self.path = name, copied, Path(name)

    def finish(self) -> Path:
        threading.Event().wait(0.2)
        self.copied.append(self.name)
        return self.path


def test_an_interruption_during_the_outputs_cancels_the_copies_not_yet_started() -> None:
    """A cancellation (a progress report's checkpoint) while the COGs are copied: the copy under way ends, the
    queued ones never start, and the error comes out at once after it (before, every queued copy ran first)."""
    copied: list[str] = []
    sinks = {name: _SlowSink(name, copied) for name in ("ndvi_cog", "cloud_mask_cog", "a", "b", "c")}
    reports: list[float] = []

    def progress(stage: str, fraction: float) -> None:
        reports.append(fraction)
        if len(reports) == 2:
            raise Cancelled("cancellation requested")

    with pytest.raises(Cancelled):
        _finish_all(cast(dict[str, RasterSink], sinks), ("ndvi_cog", "cloud_mask_cog"), lambda: Path("q.png"),
                    progress, lambda key, path: None)  # fmt: skip
    assert copied in (["ndvi_cog"], ["ndvi_cog", "cloud_mask_cog"])  # the one under way at most, never a, b, c


def test_the_cog_copies_run_with_the_analysis_threads_gdal_setting(tmp_path: Path) -> None:
    """The copies run in a pool thread, which has no rasterio.Env of its own: it gets the caller's
    GDAL_NUM_THREADS (outside the main thread rasterio sets it per thread)."""
    seen: list[object] = []

    class Sink:
        path = tmp_path / "x.tif"

        def finish(self) -> Path:
            seen.append(rasterio.env.get_gdal_config("GDAL_NUM_THREADS"))
            return self.path

    def analysis() -> None:
        with rasterio.Env(GDAL_NUM_THREADS=3):
            _finish_all(cast(dict[str, RasterSink], {"ndvi_cog": Sink()}), ("ndvi_cog",), lambda: tmp_path / "q.png",
                        lambda stage, fraction: None, lambda key, path: None)  # fmt: skip

    thread = threading.Thread(target=analysis)  # a computing thread other than the main one
    thread.start()
    thread.join()
    assert seen == [3]
