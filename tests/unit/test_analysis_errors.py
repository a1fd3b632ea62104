"""Failure paths of the analysis: each is a permanent error with a message that says what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gpu_worker.analysis import AnalysisRequest, Analyzer, select_device
from shared.errors import InvalidImage, UnknownAnalysis

DATA = Path(__file__).parents[1] / "data"
FIELDS = DATA / "s2_l1c_fields_256.tif"


def truncated(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.tif"
    path.write_bytes(FIELDS.read_bytes()[: FIELDS.stat().st_size // 2])
    return path


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.tif"
    path.write_text("this is not a GeoTIFF\n")
    return path


def empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    return path


def missing_file(tmp_path: Path) -> Path:
    return tmp_path / "missing.tif"


@pytest.mark.parametrize("make", [truncated, text_file, empty_file, missing_file])
def test_unreadable_file_is_invalid_image(make: object, tmp_path: Path) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(InvalidImage):
        Analyzer(torch.device("cpu")).analyse(path, AnalysisRequest("crop-health", [], 10000.0), tmp_path)


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        (["B02", "B03", "B04", "B03"], "appears twice"),
        (["B02", "B03", "B04", "B05"], "no nir band"),
        (["B02", "B03", "B05", "B08"], "no red band"),
        (["B02", "B03", "B04"], "3 band names given for a file with 4 bands"),
        (["B02", "B03", "B04", "XX"], "unknown band name"),
        (["B02", "B03", "B04", "B5"], "mix Sentinel-2"),
    ],
)
def test_unusable_bands_are_invalid_image(bands: list[str], message: str, tmp_path: Path) -> None:
    path = tmp_path / "rgbn.tif"
    shutil.copy(DATA / "s2_rgbn_fields_128.tif", path)
    with pytest.raises(InvalidImage, match=message):
        Analyzer(torch.device("cpu")).analyse(path, AnalysisRequest("crop-health", bands, 10000.0), tmp_path)


@pytest.mark.parametrize("analysis", ["ndvi-only", "", "model:", "model:crop-type"])
def test_unknown_analysis(analysis: str, tmp_path: Path) -> None:
    with pytest.raises(UnknownAnalysis):
        Analyzer(torch.device("cpu")).analyse(FIELDS, AnalysisRequest(analysis, [], 10000.0), tmp_path)


@pytest.mark.parametrize(("spec", "expected"), [("cpu", "cpu"), (" CPU ", "cpu")])
def test_select_device(spec: str, expected: str) -> None:
    assert select_device(spec) == torch.device(expected)


def test_select_device_auto() -> None:
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert select_device("auto") == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:99", "tpu"])
def test_select_device_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="device"):
        select_device(spec)
