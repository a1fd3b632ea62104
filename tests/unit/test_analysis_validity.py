"""Bad input never ends "succeeded": an image without one valid pixel fails with ``no_valid_pixels``, whatever the
reason (NaN, zeros, nodata, a scale that under- or overflows, a sparse file with nothing written); clouds are not bad
input; and a sparse file's empty windows are skipped with the same result as the dense file, at a fraction of the
CPU."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from gpu_worker.analysis import AnalysisRequest, Analyzer
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.settlement import Action, RetryPolicy, decide
from shared.errors import NoValidPixels, PermanentError
from tests import geotiffs
from tests.unit.test_analysis_model_dispatch import install
from tests.unit.test_models import NirOverRed

RGBN = ("B02", "B03", "B04", "B08")


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> Analyzer:
    models = tmp_path_factory.mktemp("models")
    install(models, "veg", NirOverRed())
    return Analyzer(torch.device("cpu"), models_dir=models)


def random_dn(dtype: str = "uint16", shape: tuple[int, int, int] = (4, 40, 50)) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 6000, size=shape).astype(dtype)


def run(analyzer: Analyzer, path: Path, workdir: Path, scale: float = 10000.0, analysis: str = "crop-health") -> Any:
    workdir.mkdir(exist_ok=True)
    return analyzer.analyse(path, AnalysisRequest(analysis, [], scale), workdir)


IDS = ("nan", "nan-nodata", "zero-nodata", "65535-nodata", "zero", "float-zero", "scale-1e39", "scale-1e300",
       "scale-1e-40")  # fmt: skip
NOT_A_NUMBER = "nodata or not a number in red and NIR"
ZERO = "is 0 or not finite in every one of the 2000 pixels"


@pytest.mark.parametrize(
    ("data", "nodata", "scale", "message"),
    [
        (np.full((4, 40, 50), np.nan, np.float32), None, 1.0, NOT_A_NUMBER),
        (np.full((4, 40, 50), np.nan, np.float32), math.nan, 1.0, NOT_A_NUMBER),
        (np.zeros((4, 40, 50), np.uint16), 0, 10000.0, NOT_A_NUMBER),
        (np.full((4, 40, 50), 65535, np.uint16), 65535, 10000.0, NOT_A_NUMBER),
        (np.zeros((4, 40, 50), np.uint16), None, 10000.0, ZERO),
        (np.zeros((4, 40, 50), np.float32), None, 1.0, ZERO),
        (random_dn(), None, 1e39, ZERO),  # DN / scale underflows to 0 in float32
        (random_dn(), None, 1e300, ZERO),
        (random_dn(), None, 1e-40, ZERO),  # DN / scale overflows to inf: NDVI is NaN
    ],
    ids=IDS,
)
def test_an_image_without_one_valid_pixel_fails_no_valid_pixels(
    analyzer: Analyzer, tmp_path: Path, data: np.ndarray, nodata: float | None, scale: float, message: str
) -> None:
    path = geotiffs.write_scene(tmp_path / "bad.tif", data, RGBN, nodata=nodata)
    with pytest.raises(NoValidPixels, match=message) as info:
        run(analyzer, path, tmp_path / "work", scale)
    assert isinstance(info.value, PermanentError)
    assert info.value.code == "no_valid_pixels"
    assert list((tmp_path / "work").iterdir()) == []  # no output left behind


def test_the_worker_fails_the_job_with_the_code_and_dead_letters_it_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, backoff=timedelta(seconds=1), backoff_max=timedelta(seconds=1))
    decision = decide(NoValidPixels("every pixel is nodata"), 1, policy)
    assert (decision.action, decision.reason, decision.fail_code) == (
        Action.DEAD_LETTER, "NoValidPixels", "no_valid_pixels",
    )  # fmt: skip


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_an_extreme_scale_that_keeps_reflectance_finite_is_not_invalid(
    analyzer: Analyzer, tmp_path: Path, scale: float
) -> None:
    """NDVI does not depend on the scale: it matches the sensible scale's (EVI, SAVI and cover assume 0-1
    reflectance and are not meaningful; docs/analysis.md says so)."""
    path = geotiffs.write_scene(tmp_path / "dn.tif", random_dn(), RGBN)
    extreme = run(analyzer, path, tmp_path / "extreme", scale).result
    usual = run(analyzer, path, tmp_path / "usual").result
    assert extreme["valid_fraction"] == 1.0
    assert extreme["indices"]["ndvi"] == pytest.approx(usual["indices"]["ndvi"], abs=1e-6)  # float32 rounding


def test_valid_fraction_counts_only_the_valid_pixels(analyzer: Analyzer, tmp_path: Path) -> None:
    data = random_dn("float32") / np.float32(10000)
    data[:, :10, :] = np.nan  # a quarter NaN
    data[2:, 10:20, :] = 0.0  # a quarter with red = nir = 0 and no nodata declared
    path = geotiffs.write_scene(tmp_path / "half.tif", data, RGBN)
    result = run(analyzer, path, tmp_path / "work", 1.0).result
    assert result["valid_fraction"] == 0.5
    assert {name: v["count"] for name, v in result["indices"].items()} == dict.fromkeys(
        ("ndvi", "ndwi", "evi", "savi"), 1000
    )


def test_a_scene_under_cloud_everywhere_succeeds_with_cloud_fraction_1(analyzer: Analyzer, tmp_path: Path) -> None:
    """Cloudy pixels are valid pixels: not bad input. Landsat-8 with a Collection-2 QA_PIXEL saying cloud."""
    data = np.stack([np.full((40, 50), v, np.uint16) for v in (9000, 10000, 9500, 20000, 22280)])
    path = geotiffs.write_scene(tmp_path / "cloud.tif", data, ("B2", "B3", "B4", "B5", "QA_PIXEL"), nodata=0)
    result = run(analyzer, path, tmp_path / "work", 50000.0).result
    assert (result["valid_fraction"], result["cloud_fraction"], result["clear_fraction"]) == (1.0, 1.0, 0.0)
    assert result["indices"]["ndvi"]["count"] == 2000
    assert result["indices_clear"]["ndvi"] is None
    assert result["vegetation_fraction"] is None


def test_a_model_analysis_without_one_valid_pixel_fails(analyzer: Analyzer, tmp_path: Path) -> None:
    path = geotiffs.write_scene(tmp_path / "nan.tif", np.full((4, 40, 50), np.nan, np.float32), RGBN)
    with pytest.raises(NoValidPixels, match="the model's input bands"):
        run(analyzer, path, tmp_path / "work", 1.0, analysis="model:veg")
    assert list((tmp_path / "work").iterdir()) == []


# --- sparse files -----------------------------------------------------------------------------------------------


def sparse_file(path: Path, *, nodata: float | None, interleave: str = "pixel", dtype: str = "uint16") -> Path:
    """11000 x 11000 x 4 declared, 1.7 KB: not one block written."""
    data = geotiffs.crafted(
        width=11_000, height=11_000, dtype=dtype, write=False, tiled=True, blockxsize=1024, blockysize=1024,
        compress="deflate", SPARSE_OK=True, nodata=nodata, interleave=interleave,
    )  # fmt: skip
    path.write_bytes(data)
    return path


# The one written 1024 x 1024 block of the four bands, no more: a dense file decodes 4 x 11000 x 11000.
READ_PIXELS = 4 * 1024 * 1024


class ReadCounter:
    """The pixels :class:`SceneReader` decodes (its ``read`` and ``read_raw``), per band: what a run costs, counted
    instead of timed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pixels = 0
        read, read_raw = SceneReader.read, SceneReader.read_raw

        def counted_read(reader: SceneReader, window: Window, band_indices: list[int]) -> Any:
            self.pixels += int(window.width * window.height) * len(band_indices)
            return read(reader, window, band_indices)

        def counted_read_raw(reader: SceneReader, window: Window, band_index: int) -> Any:
            self.pixels += int(window.width * window.height)
            return read_raw(reader, window, band_index)

        monkeypatch.setattr(SceneReader, "read", counted_read)
        monkeypatch.setattr(SceneReader, "read_raw", counted_read_raw)


@pytest.mark.parametrize(
    ("nodata", "interleave", "dtype"),
    [(None, "pixel", "uint16"), (0, "pixel", "uint16"), (None, "band", "uint16"), (math.nan, "pixel", "float32")],
)
def test_a_large_file_with_no_block_written_fails_at_once(
    analyzer: Analyzer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nodata: float | None,
    interleave: str,
    dtype: str,
) -> None:
    """Before: 9 s of CPU computing on 121 M fill values, then "succeeded" with null NDVI. Now: no pixel is read."""
    path = sparse_file(tmp_path / "sparse.tif", nodata=nodata, interleave=interleave, dtype=dtype)
    reads = ReadCounter(monkeypatch)
    with pytest.raises(NoValidPixels, match="every block is empty"):
        run(analyzer, path, tmp_path / "work")
    assert reads.pixels == 0


def sparse_and_dense(tmp_path: Path, nodata: float | None) -> tuple[Path, Path]:
    """The real Sentinel-2 crop in 64 x 64 tiles, six of its 16 tiles left unwritten; and the same pixels written
    densely, those tiles filled as GDAL reads them (nodata, or 0)."""
    with rasterio.open(geotiffs.FIELDS) as src:
        data, names = src.read(), [d or "" for d in src.descriptions]
    tiles = [Window(c, r, 64, 64) for r in range(0, 256, 64) for c in range(0, 256, 64)]
    empty = {0, 1, 5, 10, 11, 15}
    dense = data.copy()
    for i in empty:
        dense[:, tiles[i].toslices()[0], tiles[i].toslices()[1]] = 0 if nodata is None else nodata
    layout: dict[str, Any] = {"tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"}
    written = [t for i, t in enumerate(tiles) if i not in empty]
    sparse = geotiffs.write_scene(tmp_path / "sparse.tif", data, names, nodata=nodata, only=written, **layout)
    return sparse, geotiffs.write_scene(tmp_path / "dense.tif", dense, names, nodata=nodata, **layout)


@pytest.mark.parametrize("nodata", [0, 1])
def test_sparse_windows_are_skipped_with_the_dense_files_result(
    analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodata: float
) -> None:
    monkeypatch.setattr(analyzer._crop_health, "window", 64)
    sparse, dense = sparse_and_dense(tmp_path, nodata)
    got, expected = run(analyzer, sparse, tmp_path / "s"), run(analyzer, dense, tmp_path / "d")
    assert got.result == expected.result
    assert got.result["valid_fraction"] == pytest.approx(10 / 16, abs=0.01)
    assert set(got.files) == set(expected.files) == {"ndvi_cog", "cloud_mask_cog", "cover_cog", "quicklook_png"}
    for key in ("ndvi_cog", "cloud_mask_cog", "cover_cog"):
        with rasterio.open(got.files[key][0]) as a, rasterio.open(expected.files[key][0]) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert (str(a.nodatavals), a.profile["blockxsize"]) == (str(b.nodatavals), b.profile["blockxsize"])


def test_without_nodata_an_empty_window_reads_as_zero_and_is_not_valid(
    analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(analyzer._crop_health, "window", 64)
    data = random_dn(shape=(4, 128, 128))
    layout: dict[str, Any] = {"tiled": True, "blockxsize": 64, "blockysize": 64}
    sparse = geotiffs.write_scene(tmp_path / "s.tif", data, RGBN, only=[Window(0, 0, 64, 64)], **layout)
    dense_data = np.zeros_like(data)
    dense_data[:, :64, :64] = data[:, :64, :64]
    dense = geotiffs.write_scene(tmp_path / "d.tif", dense_data, RGBN, **layout)
    got, expected = run(analyzer, sparse, tmp_path / "s"), run(analyzer, dense, tmp_path / "d")
    assert got.result == expected.result
    assert got.result["valid_fraction"] == 0.25


def test_one_written_block_in_a_large_sparse_file_costs_a_fraction_of_a_dense_run(
    analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """11000 x 11000 declared, one 1024 x 1024 block written (10 KB): 9 s of CPU before, 0.7 s now (outputs
    included: they are sparse too, see outputs.py); asserted as the pixels decoded, not the time."""
    path = tmp_path / "one.tif"
    path.write_bytes(sparse_file(tmp_path / "empty.tif", nodata=None).read_bytes())
    with rasterio.open(path, "r+") as ds:
        ds.write(np.full((4, 1024, 1024), 1000, np.uint16), window=Window(0, 0, 1024, 1024))
    reads = ReadCounter(monkeypatch)
    out = run(analyzer, path, tmp_path / "work")
    assert reads.pixels == READ_PIXELS
    assert out.result["valid_fraction"] == 1024 * 1024 / 11_000**2
    assert out.result["indices"]["ndvi"]["count"] == 1024 * 1024
    with rasterio.open(out.files["ndvi_cog"][0]) as cog:
        assert cog.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1)
        assert not cog.get_tag_item("BLOCK_OFFSET_10_10", "TIFF", bidx=1)  # left out: reads as nodata
        assert math.isnan(cog.read(1, window=Window(5000, 5000, 1, 1))[0, 0])
