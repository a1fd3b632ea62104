"""Fractional cover: the committed weights against the held-out field data, and the module's contract."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from gpu_worker.analysis import train_cover
from gpu_worker.analysis.cover import CAVEAT, WEIGHTS, FractionalCover, band_indices, cover_caveat
from shared.bands import resolve
from tests.fixtures.backends import unavailable

ROOT = Path(__file__).resolve().parents[2]
METRICS = json.loads((WEIGHTS.parent / "cover_metrics.json").read_text())
FIELDS = ROOT / "tests" / "data" / "s2_l1c_fields_256.tif"
S2_COVER_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")


@pytest.fixture(scope="module")
def dataset() -> train_cover.Dataset:
    try:
        path = train_cover.fetch_training_data(ROOT / train_cover.DEFAULT_CACHE)
    except (subprocess.CalledProcessError, OSError) as e:
        unavailable(f"cannot download {train_cover.PACKAGE}: {e}")
    return train_cover.load_dataset(path)


@pytest.fixture(scope="module")
def model() -> FractionalCover:
    return FractionalCover.load(torch.device("cpu"))


@pytest.fixture(scope="module")
def fields() -> torch.Tensor:
    """The real Sentinel-2 L1C crop, as [1, 6, H, W] reflectance in FractionalCover.BANDS order."""
    with rasterio.open(FIELDS) as src:
        names = [src.descriptions[i] for i in range(src.count)]
        stack = src.read([names.index(b) + 1 for b in S2_COVER_BANDS]).astype(np.float32) / 10000
    return torch.from_numpy(stack)[None]


def test_dataset_is_the_pinned_field_data(dataset: train_cover.Dataset) -> None:
    assert dataset.sha256 == METRICS["data"]["sha256"] == train_cover.DATA_SHA256
    assert dataset.reflectance.shape == (3937, 5)
    np.testing.assert_allclose(dataset.cover.sum(axis=1), 1.0, atol=1e-6)


def test_held_out_split_is_the_recorded_one(dataset: train_cover.Dataset) -> None:
    train_rows, test_rows = train_cover.split(dataset, train_cover.Config(seed=METRICS["split"]["seed"]))
    digest = hashlib.sha256(np.sort(test_rows).astype("<i8").tobytes()).hexdigest()
    assert digest == METRICS["split"]["held_out_sha256"]
    assert len(test_rows) == METRICS["split"]["held_out_rows"]
    assert not set(dataset.survey[train_rows]) & set(dataset.survey[test_rows]), "a field survey on both sides"


def test_committed_weights_meet_the_published_error_on_held_out_data(
    dataset: train_cover.Dataset, model: FractionalCover
) -> None:
    _, test_rows = train_cover.split(dataset, train_cover.Config(seed=METRICS["split"]["seed"]))
    scores = train_cover.rmse(model, dataset, test_rows)
    assert scores == pytest.approx(METRICS["held_out_rmse"], abs=1e-4)
    assert all(value <= 0.15 for value in scores.values()), scores


@pytest.mark.slow
def test_retraining_reproduces_the_recorded_error(dataset: train_cover.Dataset) -> None:
    config = train_cover.Config(seed=METRICS["split"]["seed"])
    train_rows, test_rows = train_cover.split(dataset, config)
    scores = train_cover.rmse(train_cover.train(dataset, train_rows, config), dataset, test_rows)
    assert scores == pytest.approx(METRICS["held_out_rmse"], abs=0.005)


def test_training_is_deterministic_for_a_seed(dataset: train_cover.Dataset) -> None:
    rows = np.arange(400)
    first, second, other = (
        train_cover.train(dataset, rows, train_cover.Config(seed=seed, epochs=2)).state_dict() for seed in (7, 7, 8)
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["mlp.0.weight"], other["mlp.0.weight"])


def test_load_gives_an_eval_model_on_the_device(model: FractionalCover) -> None:
    assert not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert METRICS["model"] == model.VERSION


def test_fractions_sum_to_one_on_a_real_scene(model: FractionalCover, fields: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(fields)
    assert out.shape == (1, 3, 256, 256)
    assert torch.isfinite(out).all()
    assert ((out >= 0) & (out <= 1)).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 256, 256))


def test_forward_is_predict_pixels_laid_out_per_pixel(model: FractionalCover, fields: torch.Tensor) -> None:
    crop = fields[:, :, 10:14, 20:25]
    with torch.no_grad():
        image = model(crop)
        pixels = model.predict_pixels(crop[0, 1:].permute(1, 2, 0).reshape(-1, 5))
    torch.testing.assert_close(image[0].permute(1, 2, 0).reshape(-1, 3), pixels)


@pytest.mark.parametrize("band", range(6))
def test_nan_in_any_band_gives_nan_fractions_there_only(
    model: FractionalCover, fields: torch.Tensor, band: int
) -> None:
    crop = fields[:, :, :8, :8].clone()
    crop[0, band, 2, 3] = float("nan")
    with torch.no_grad():
        out = model(crop)
    nan = out.isnan()
    assert nan[0, :, 2, 3].all()
    assert nan.sum() == 3


@pytest.mark.parametrize("shape", [(6, 4, 4), (1, 5, 4, 4), (1, 13, 4, 4)])
def test_wrong_input_shape_is_refused(model: FractionalCover, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected \[N, 6, H, W\]"):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
         [1, 2, 3, 7, 11, 12]),
        (["B02", "B03", "B04", "B8A", "B11", "B12"], [0, 1, 2, 3, 4, 5]),
        (["B1", "B2", "B3", "B4", "B5", "B6", "B7"], [1, 2, 3, 4, 5, 6]),
        (["swir22", "swir16", "nir", "red", "green", "blue"], [5, 4, 3, 2, 1, 0]),
        (["B02", "B03", "B04", "B08"], None),
        (["B03", "B04", "B08", "B11", "B12"], None),
    ],
)  # fmt: skip
def test_band_indices(names: list[str], expected: list[int] | None) -> None:
    assert band_indices(resolve(names)) == expected


def test_dense_vegetation_is_mostly_green_and_sparse_is_not(model: FractionalCover, fields: torch.Tensor) -> None:
    red, nir = fields[0, 2], fields[0, 3]
    ndvi = (nir - red) / (nir + red)
    with torch.no_grad():
        green = model(fields)[0, 1]
    assert green[ndvi > 0.6].mean() > 0.7
    assert green[(ndvi > 0) & (ndvi < 0.2)].mean() < 0.2


@pytest.mark.parametrize(
    ("names", "caveat"),
    [(list(S2_COVER_BANDS), True), (["blue", "green", "red", "nir", "swir16", "swir22"], True),
     (["SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"], False)],
)  # fmt: skip
def test_caveat_unless_surface_reflectance(names: list[str], caveat: bool) -> None:
    assert (cover_caveat(resolve(names)) == CAVEAT) is caveat
