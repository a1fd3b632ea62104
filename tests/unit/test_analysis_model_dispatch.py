"""``model:<name>`` through the Analyzer: a tiny TorchScript model whose weights the test sets, run tiled over a
real GeoTIFF; the class map COG and histogram equal numpy's answer exactly."""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.env
import torch
from torch import nn

from gpu_worker.analysis import AnalysisRequest, Analyzer
from gpu_worker.analysis.analyzer import GDAL_CACHE_BYTES
from gpu_worker.analysis.models import ManifestError
from shared.errors import InvalidImage, UnknownAnalysis
from tests.unit.test_models import NirOverRed  # 1x1 conv: class 1 (vegetation) where nir > 2 red

RGBN = Path(__file__).parents[1] / "data" / "s2_rgbn_fields_128.tif"


class Difference(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:2] - x[:, 0:1]


def install(models_dir: Path, name: str, module: nn.Module, **manifest: Any) -> None:
    folder = models_dir / name
    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, still what users ship
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module.eval(), torch.rand(1, 2, 48, 48))  # type: ignore[no-untyped-call]
        traced.save(str(folder / "model.pt"))
    base = {"name": name, "version": "3", "file": "model.pt", "input_bands": ["red", "nir"], "scale": 1.0,
            "patch_size": 48, "output_kind": "per_pixel_classes", "class_names": ["other", "vegetation"]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(base | manifest))


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> Analyzer:
    models = tmp_path_factory.mktemp("models")
    install(models, "veg", NirOverRed())
    install(models, "diff", Difference(), output_kind="regression", class_names=["nir_minus_red"])
    install(models, "swir", Difference(), input_bands=["swir16", "nir"])
    return Analyzer(torch.device("cpu"), models_dir=models)


def red_nir() -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(RGBN) as src:
        data = src.read([3, 4]).astype(np.float32) / np.float32(10000)
    return data[0], data[1]


def test_class_model_gives_exact_map_and_histogram(analyzer: Analyzer, tmp_path: Path) -> None:
    out = analyzer.analyse(RGBN, AnalysisRequest("model:veg", [], 10000.0), tmp_path)
    red, nir = red_nir()
    expected = (nir > 2 * red).astype(np.uint8)  # score(vegetation) > score(other)
    with rasterio.open(out.files["class_map_cog"][0]) as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        with rasterio.open(RGBN) as src:
            assert (cog.crs, cog.transform) == (src.crs, src.transform)
        np.testing.assert_array_equal(cog.read(1), expected)
    r = out.result
    assert r["analysis"] == "model:veg"
    assert r["class_histogram"] == pytest.approx({"vegetation": expected.mean(), "other": 1 - expected.mean()})
    assert r["model"] == {"name": "veg", "version": "3", "output_kind": "per_pixel_classes",
                          "class_names": ["other", "vegetation"]}  # fmt: skip
    assert r["model_version"] == "veg/3"
    assert r["valid_fraction"] == 1.0
    assert 0.2 < expected.mean() < 0.9  # a real mix of classes on the fields crop


def test_regression_model_gives_means_and_a_float_cog(analyzer: Analyzer, tmp_path: Path) -> None:
    out = analyzer.analyse(RGBN, AnalysisRequest("model:diff", [], 10000.0), tmp_path)
    red, nir = red_nir()
    assert out.result["means"]["nir_minus_red"] == pytest.approx(float((nir - red).astype(np.float64).mean()))
    assert out.result["class_histogram"] is None
    with rasterio.open(out.files["model_output_cog"][0]) as cog:
        np.testing.assert_allclose(cog.read(1), nir - red, rtol=1e-6)


@pytest.mark.parametrize(
    ("analysis", "error", "message"),
    [
        ("model:nope", UnknownAnalysis, "unknown model 'nope'"),
        ("model:swir", InvalidImage, "needs bands swir16"),
    ],
)
def test_model_failures(
    analysis: str, error: type[Exception], message: str, analyzer: Analyzer, tmp_path: Path
) -> None:
    with pytest.raises(error, match=message):
        analyzer.analyse(RGBN, AnalysisRequest(analysis, [], 10000.0), tmp_path)


def test_invalid_manifest_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        Analyzer(torch.device("cpu"), models_dir=tmp_path)


def test_the_gdal_block_cache_stays_fixed_while_analyses_end_in_other_threads(
    analyzer: Analyzer, tmp_path: Path
) -> None:
    """One cache per process, set once: an analysis ending in one computing thread does not put GDAL's default (5 %
    of RAM) back under another still running (a per-analysis ``rasterio.Env(GDAL_CACHEMAX=...)`` did)."""
    scene = Path(__file__).parents[1] / "data" / "s2_l1c_fields_256.tif"
    request = AnalysisRequest("crop-health", [], 10000.0)
    for n in range(2):
        (tmp_path / str(n)).mkdir()
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(analyzer.analyse, scene, request, tmp_path / str(n)) for n in range(2)]
        assert [future.result().result["analysis"] for future in done] == ["crop-health"] * 2
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_BYTES
