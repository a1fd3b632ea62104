"""Landsat cloud masking from the scene's own quality band: the real cloudy Landsat-8 crop (pre-collection BQA)
and synthetic Collection-1 BQA / Collection-2 QA_PIXEL bit patterns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from gpu_worker.analysis import AnalysisRequest, Analyzer

DATA = Path(__file__).parents[1] / "data"
L8 = DATA / "l8_cloudy_200.tif"


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(torch.device("cpu"))


def test_real_cloudy_scene_reports_its_clouds(analyzer: Analyzer, tmp_path: Path) -> None:
    out = analyzer.analyse(L8, AnalysisRequest("crop-health", [], 50000.0), tmp_path)
    with rasterio.open(L8) as src:
        qa = src.read(7).astype(np.int64)
    cloudy = ((qa >> 14) & 3 >= 2) | ((qa >> 12) & 3 == 3)  # pre-collection: cloud conf >= medium, cirrus high
    result = out.result
    assert result["cloud_mask"]["method"] == "landsat-qa"
    assert result["cloud_mask"]["layout"] == "pre-collection BQA"
    assert result["cloud_fraction"] == pytest.approx(cloudy.mean())
    assert result["cloud_fraction"] > 0.2  # a cumulus field: substantial
    assert result["indices_clear"]["ndvi"]["count"] == int((~cloudy).sum())
    with rasterio.open(out.files["cloud_mask_cog"][0]) as cog:
        np.testing.assert_array_equal(cog.read(1), cloudy.astype(np.uint8))


def write(path: Path, qa: np.ndarray, qa_name: str) -> Path:
    h, w = qa.shape
    data = np.stack([np.full((h, w), v, dtype=np.uint16) for v in (9000, 10000, 9500, 20000)] + [qa])
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 5, "dtype": "uint16", "crs": "EPSG:32616",
               "transform": Affine(30, 0, 500000, 0, -30, 3500000), "nodata": 0}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(["B2", "B3", "B4", "B5", qa_name], start=1):
            dst.set_band_description(i, name)
    return path


@pytest.mark.parametrize(
    ("qa_name", "layout", "values"),
    [
        # value -> cloudy?  Collection 2 QA_PIXEL: bit 1 dilated cloud, bit 2 cirrus, bit 3 cloud; 21824 = clear land
        ("QA_PIXEL", "collection-2 QA_PIXEL", {21824: False, 21826: True, 21828: True, 22280: True, 1: False}),
        # Collection 1 BQA: 2720 clear; bit 4 cloud; bits 5-6 = 3 high cloud conf; bits 11-12 = 3 high cirrus conf
        ("BQA", "collection-1 BQA", {2720: False, 2720 | 16: True, 2720 | 96: True, 2720 | 6144: True, 2752: False}),
    ],
)
def test_quality_band_layouts(
    qa_name: str, layout: str, values: dict[int, bool], analyzer: Analyzer, tmp_path: Path
) -> None:
    codes = np.array(list(values), dtype=np.uint16)
    qa = np.resize(codes, (10, 12)).astype(np.uint16)
    out = analyzer.analyse(
        write(tmp_path / "l8.tif", qa, qa_name), AnalysisRequest("crop-health", [], 50000.0), tmp_path
    )
    expected = np.vectorize(values.__getitem__)(qa)
    assert out.result["cloud_mask"]["layout"] == layout
    assert out.result["cloud_fraction"] == pytest.approx(expected.mean())
    with rasterio.open(out.files["cloud_mask_cog"][0]) as cog:
        np.testing.assert_array_equal(cog.read(1), expected.astype(np.uint8))


def test_landsat_without_quality_band_has_no_cloud_mask(analyzer: Analyzer, tmp_path: Path) -> None:
    with rasterio.open(L8) as src:
        profile = src.profile | {"count": 6}
        data = src.read(list(range(1, 7)))
    path = tmp_path / "noqa.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    out = analyzer.analyse(
        path, AnalysisRequest("crop-health", ["B2", "B3", "B4", "B5", "B6", "B7"], 50000.0), tmp_path
    )
    assert out.result["cloud_fraction"] is None
    assert out.result["cloud_mask"] is None
    assert "cloud_mask_cog" not in out.files
