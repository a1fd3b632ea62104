"""Crop-health indices against an independent numpy computation, on real Sentinel-2 crops and synthetic corners."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from gpu_worker.analysis import AnalysisOutput, AnalysisRequest, Analyzer
from gpu_worker.analysis.indices import INDICES, IndexSpec, compute
from shared.bands import resolve

DATA = Path(__file__).parents[1] / "data"
REAL_CROPS = ["s2_l1c_fields_256.tif", "s2_l1c_coast_256.tif", "s2_rgbn_fields_128.tif"]
STAT_KEYS = ("mean", "std", "p10", "p50", "p90")


def numpy_indices(path: Path, names: list[str] | None = None, scale: float = 10000.0) -> dict[str, Any]:
    """Independent reference: float64 numpy over the valid pixels (red and NIR valid, NDVI defined) where the
    index's bands are valid."""
    with rasterio.open(path) as src:
        data = src.read().astype(np.float64)
        nodata = src.nodatavals
        roles = resolve(names or list(src.descriptions)).roles
    valid = np.isfinite(data)
    for i, nd in enumerate(nodata):
        if nd is not None and not np.isnan(nd):
            valid[i] &= data[i] != nd
    with np.errstate(all="ignore"):
        b = {role: data[i] / scale for role, i in roles.items()}
        formulas: dict[str, tuple[tuple[str, ...], Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
            "ndvi": (("red", "nir"), lambda: (b["nir"] - b["red"], b["nir"] + b["red"])),
            "ndwi": (("green", "nir"), lambda: (b["green"] - b["nir"], b["green"] + b["nir"])),
            "evi": (
                ("blue", "red", "nir"),
                lambda: (2.5 * (b["nir"] - b["red"]), b["nir"] + 6 * b["red"] - 7.5 * b["blue"] + 1),
            ),
            "savi": (("red", "nir"), lambda: (1.5 * (b["nir"] - b["red"]), b["nir"] + b["red"] + 0.5)),
        }
        out: dict[str, Any] = {}
        red, nir = b["red"], b["nir"]
        pixel_ok = valid[roles["red"]] & valid[roles["nir"]] & np.isfinite((nir - red) / (nir + red))
        for name, (needed, formula) in formulas.items():
            if not all(r in roles for r in needed):
                out[name] = None
                continue
            num, den = formula()
            mask = np.logical_and.reduce([valid[roles[r]] for r in needed]) & (den != 0) & pixel_ok
            v = num[mask] / den[mask]
            v = v[np.isfinite(v)]
            p10, p50, p90 = np.percentile(v, [10, 50, 90])
            out[name] = {"mean": v.mean(), "std": v.std(), "p10": p10, "p50": p50, "p90": p90, "count": v.size}
    return out


def analyse(path: Path, tmp_path: Path, bands: list[str] | None = None, window: int | None = None) -> AnalysisOutput:
    analyzer = Analyzer(torch.device("cpu"))
    if window is not None:
        analyzer._crop_health.window = window
    return analyzer.analyse(path, AnalysisRequest("crop-health", bands or [], 10000.0), tmp_path)


def assert_matches(result: dict[str, Any], reference: dict[str, Any]) -> None:
    for name, ref in reference.items():
        got = result["indices"][name]
        if ref is None:
            assert got is None, name
            continue
        assert got["count"] == ref["count"], name
        # The analysis works in float32 (raster.Block), the reference in float64: 1e-6 is the documented bound.
        assert got["mean"] == pytest.approx(ref["mean"], rel=1e-6, abs=1e-7), name
        assert got["std"] == pytest.approx(ref["std"], rel=1e-6, abs=1e-7), name
        for key in ("p10", "p50", "p90"):  # histogram percentiles: within one bin (stats.py)
            assert got[key] == pytest.approx(ref[key], rel=2**-7, abs=2e-5), (name, key)


@pytest.mark.parametrize("crop", REAL_CROPS)
def test_real_crop_matches_numpy(crop: str, tmp_path: Path) -> None:
    out = analyse(DATA / crop, tmp_path)
    assert_matches(out.result, numpy_indices(DATA / crop))
    assert out.result["analysis"] == "crop-health"
    assert out.result["valid_fraction"] == 1.0


@pytest.mark.parametrize("window", [64, 100, 1024])
def test_windowing_does_not_change_the_result(window: int, tmp_path: Path) -> None:
    path = DATA / "s2_l1c_fields_256.tif"
    out = analyse(path, tmp_path, window=window)
    assert_matches(out.result, numpy_indices(path))


def test_scene_metadata(tmp_path: Path) -> None:
    scene = analyse(DATA / "s2_l1c_coast_256.tif", tmp_path).result["scene"]
    assert scene["width"] == 256
    assert scene["height"] == 256
    assert scene["band_count"] == 13
    assert scene["crs"] == "EPSG:32618"
    west, south, east, north = scene["bounds_wgs84"]
    assert -76 < west < east < -75  # Virginia Eastern Shore
    assert 37 < south < north < 38


def test_sea_is_negative_and_fields_are_green(tmp_path: Path) -> None:
    coast = analyse(DATA / "s2_l1c_coast_256.tif", tmp_path).result["indices"]
    fields = analyse(DATA / "s2_l1c_fields_256.tif", tmp_path).result["indices"]
    assert coast["ndvi"]["p50"] < 0  # most of the coast crop is lagoon and open sea
    assert coast["ndwi"]["p50"] > 0
    assert fields["ndvi"]["mean"] > 0.3


def write_tif(path: Path, data: np.ndarray, nodata: float | None, names: list[str]) -> Path:
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "crs": "EPSG:32618", "transform": Affine(10, 0, 440000, 0, -10, 4175000),
               "nodata": nodata}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path


def synthetic(dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 6000, size=(4, 40, 50)).astype(dtype)


def test_nodata_pixels_are_excluded(tmp_path: Path) -> None:
    data = synthetic("uint16")
    data[:, :10, :] = 0  # a nodata stripe in every band
    data[0, 20:25, :] = 0  # blue nodata only: EVI loses these pixels, NDVI keeps them
    path = write_tif(tmp_path / "nodata.tif", data, 0, ["B02", "B03", "B04", "B08"])
    out = analyse(path, tmp_path, window=16)
    ref = numpy_indices(path)
    assert_matches(out.result, ref)
    assert out.result["valid_fraction"] == pytest.approx(30 / 40)
    assert out.result["indices"]["evi"]["count"] == out.result["indices"]["ndvi"]["count"] - 5 * 50


def test_zero_denominators_are_excluded_per_index(tmp_path: Path) -> None:
    data = synthetic("uint16")
    data[1, 3, :] = 0
    data[3, 3, :] = 0  # green = nir = 0: NDWI's denominator is zero; NDVI's is red, so the pixel is valid
    data[0, 1, :10] = 2500  # EVI: 0.5 + 6 * 0.0625 - 7.5 * 0.25 + 1 = 0 exactly (binary fractions)
    data[2, 1, :10] = 625
    data[3, 1, :10] = 5000
    path = write_tif(tmp_path / "zero.tif", data, None, ["blue", "green", "red", "nir"])
    out = analyse(path, tmp_path)
    assert_matches(out.result, numpy_indices(path))
    total = 40 * 50
    assert out.result["indices"]["ndvi"]["count"] == total
    assert out.result["indices"]["ndwi"]["count"] == total - 50
    assert out.result["indices"]["evi"]["count"] == total - 10
    assert out.result["indices"]["savi"]["count"] == total
    assert out.result["valid_fraction"] == 1.0


def test_red_and_nir_both_zero_is_not_a_valid_pixel(tmp_path: Path) -> None:
    """No nodata declared, red = nir = 0: NDVI is undefined, so the pixel is not valid, for every index (SAVI and
    EVI would be 0 there, which says nothing about the ground) and for valid_fraction."""
    data = synthetic("uint16")
    data[2:, 0, :] = 0
    path = write_tif(tmp_path / "zero.tif", data, None, ["blue", "green", "red", "nir"])
    out = analyse(path, tmp_path)
    assert_matches(out.result, numpy_indices(path))
    total = 40 * 50
    assert {name: v["count"] for name, v in out.result["indices"].items()} == dict.fromkeys(
        ("ndvi", "ndwi", "evi", "savi"), total - 50
    )
    assert out.result["valid_fraction"] == (total - 50) / total


def test_float_input_with_nan_and_nodata(tmp_path: Path) -> None:
    data = synthetic("float32") / 10000.0
    data[1, 5, :] = np.nan
    data[3, 6, :] = np.inf
    data[:, 7, :] = -9999.0
    path = write_tif(tmp_path / "float.tif", data.astype(np.float32), -9999.0, ["blue", "green", "red", "nir"])
    analyzer = Analyzer(torch.device("cpu"))
    out = analyzer.analyse(path, AnalysisRequest("crop-health", [], 1.0), tmp_path)
    ref = numpy_indices(path, scale=1.0)
    assert_matches(out.result, ref)
    assert out.result["valid_fraction"] == pytest.approx(38 / 40)


@pytest.mark.parametrize(
    ("bands", "null"),
    [(["B04", "B08"], {"ndwi", "evi"}), (["B03", "B04", "B08"], {"evi"}), (["B02", "B04", "B08"], {"ndwi"})],
)
def test_missing_green_or_blue_makes_that_index_null(bands: list[str], null: set[str], tmp_path: Path) -> None:
    data = synthetic("uint16")[: len(bands)]
    path = write_tif(tmp_path / "few.tif", data, 0, bands)
    result = analyse(path, tmp_path).result
    assert {name for name, v in result["indices"].items() if v is None} == null
    assert_matches(result, numpy_indices(path))


@pytest.mark.parametrize("spec", INDICES, ids=lambda s: s.name)
def test_compute_leaves_the_bands_as_they_were(spec: IndexSpec) -> None:
    """``compute`` divides the formula's own tensors in place, never the bands."""
    g = torch.Generator().manual_seed(0)
    bands = {r: torch.rand(16, 16, generator=g) for r in ("blue", "green", "red", "nir")}
    bands["red"][0, 0] = bands["nir"][0, 0] = 0.0  # a zero denominator
    valid = {r: torch.rand(16, 16, generator=g) > 0.2 for r in bands}
    copies = {r: b.clone() for r, b in bands.items()}
    valid_copies = {r: v.clone() for r, v in valid.items()}
    values, mask = compute(spec, bands, valid)
    for r in bands:
        assert torch.equal(bands[r], copies[r])
        assert torch.equal(valid[r], valid_copies[r])
    numerator, denominator = spec.formula(copies)
    expected_mask = (denominator != 0) & torch.stack([valid[r] for r in spec.roles]).all(dim=0)
    expected = numerator / torch.where(expected_mask, denominator, 1.0)
    assert torch.equal(mask, expected_mask & torch.isfinite(expected))
    assert torch.equal(values[mask], expected[mask])
