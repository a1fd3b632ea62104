"""The model slot with tiny models whose weights the tests set, on a real Sentinel-2 crop; answers from numpy."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from torch import nn

from gpu_worker.analysis.models import (
    NODATA_CLASS,
    LoadedModel,
    ManifestError,
    ModelError,
    ModelRegistry,
    model_name,
)
from shared.bands import resolve
from shared.errors import InvalidImage, UnknownAnalysis

FIELDS = Path(__file__).resolve().parents[1] / "data" / "s2_rgbn_fields_128.tif"
CPU = torch.device("cpu")


class NirOverRed(nn.Module):
    """Per-pixel classes via a 1x1 conv: score(vegetation) = nir - 2 red = -score(other), i.e. NDVI > 1/3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[2.0, -1.0], [-2.0, 1.0]]).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class PatchMeanDifference(nn.Module):
    """Per-patch classes: vegetation when the patch's mean nir - 2 red is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, 1] - 2 * x[:, 0]).mean(dim=(1, 2))
        return torch.stack([-d, d], dim=1)


class BoxMean(nn.Module):
    """Regression with spatial context: 3x3 mean of nir (zero padding inside a tile)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x[:, 1:2], 3, stride=1, padding=1, count_include_pad=True)


def save(module: nn.Module, folder: Path, fmt: str, patch: int, **manifest: Any) -> Path:
    folder.mkdir(parents=True)
    example = torch.rand(2, 2, patch, patch)
    if fmt == "pt2":
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(module.eval(), (example,), dynamic_shapes={"x": {0: batch}}),
                          folder / "model.pt2")  # fmt: skip
    else:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.9+ but is what users still ship
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.trace(module.eval(), example).save(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
    base = {"name": folder.name, "version": "1", "file": f"model.{fmt}", "input_bands": ["red", "nir"],
            "scale": 1.0, "patch_size": patch, "output_kind": "per_pixel_classes",
            "class_names": ["other", "vegetation"]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(base | manifest))
    return folder


@pytest.fixture(scope="module")
def red_nir() -> np.ndarray:
    """[2, 128, 128] float32 reflectance (red, nir) of the real crop, with a nodata block and a nodata pixel."""
    with rasterio.open(FIELDS) as src:
        data: np.ndarray = src.read([3, 4]).astype(np.float32) / 10000
    data[:, 100:110, 0:20] = np.nan
    data[1, 5, 7] = np.nan
    return data


def reader(scene: np.ndarray) -> Any:
    reads: list[Window] = []

    def read_window(w: Window) -> np.ndarray:
        reads.append(w)
        return scene[:, w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width]

    read_window.reads = reads  # type: ignore[attr-defined]
    return read_window


def run_all(model: LoadedModel, scene: np.ndarray, batch_size: int = 4) -> tuple[np.ndarray, Any]:
    """Assemble the tiles into a scene-sized map; every pixel written exactly once."""
    run = model.tiled(reader(scene), scene.shape[2], scene.shape[1], batch_size=batch_size)
    written = np.zeros(scene.shape[1:], dtype=int)
    out: np.ndarray | None = None
    for window, values in run:
        if out is None:
            out = np.zeros(values.shape[:-2] + scene.shape[1:], dtype=values.dtype)
        rows, cols = window.toslices()
        out[..., rows, cols] = values
        written[rows, cols] += 1
    assert (written == 1).all()
    assert out is not None
    return out, run


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
@pytest.mark.parametrize(("patch", "overlap"), [(32, 0), (40, 6), (200, 0)])
def test_per_pixel_class_map_and_histogram_are_exact(
    tmp_path: Path, red_nir: np.ndarray, fmt: str, patch: int, overlap: int
) -> None:
    save(NirOverRed(), tmp_path / "nir-over-red", fmt, patch, overlap=overlap, scale=10000.0)
    model = ModelRegistry(tmp_path, CPU).get("nir-over-red")
    class_map, run = run_all(model, red_nir)

    x = red_nir * np.float32(10000)  # what the model sees
    valid = np.isfinite(red_nir).all(axis=0)
    expected = np.where(valid, (x[1] > 2 * x[0]).astype(np.uint8), NODATA_CLASS).astype(np.uint8)
    assert class_map.dtype == np.uint8
    np.testing.assert_array_equal(class_map, expected)
    total = int(valid.sum())
    histogram = {"other": int((expected == 0).sum()) / total, "vegetation": int((expected == 1).sum()) / total}
    assert run.histogram() == histogram
    assert run.valid_pixels == total
    assert 0.2 < histogram["vegetation"] < 0.8  # the crop really holds both classes


@pytest.mark.parametrize("patch", [16, 48])
def test_per_patch_classes_cover_each_patch(tmp_path: Path, red_nir: np.ndarray, patch: int) -> None:
    save(PatchMeanDifference(), tmp_path / "patchy", "pt", patch, output_kind="per_patch_classes")
    class_map, run = run_all(load_model(tmp_path, "patchy"), red_nir)

    filled = np.where(np.isfinite(red_nir), red_nir, 0.0)  # nodata is fed to the model as 0 (the mean)
    size = -(-128 // patch) * patch
    padded = np.pad(filled, ((0, 0), (0, size - 128), (0, size - 128)), mode="edge")
    diff = (padded[1] - 2 * padded[0]).reshape(size // patch, patch, size // patch, patch).mean(axis=(1, 3))
    assert np.abs(diff).min() > 1e-4  # no patch on the fence
    expected = np.kron((diff > 0).astype(np.uint8), np.ones((patch, patch), dtype=np.uint8))[:128, :128]
    valid = np.isfinite(red_nir).all(axis=0)
    expected[~valid] = NODATA_CLASS
    np.testing.assert_array_equal(class_map, expected)
    assert run.histogram()["vegetation"] == pytest.approx(float((expected == 1).sum()) / valid.sum(), abs=1e-12)


def load_model(models_dir: Path, name: str) -> LoadedModel:
    return ModelRegistry(models_dir, CPU).get(name)


def test_overlap_removes_tile_seams(tmp_path: Path, red_nir: np.ndarray) -> None:
    scene = np.nan_to_num(red_nir, nan=0.05)
    save(BoxMean(), tmp_path / "seamless", "pt", 24, overlap=1, output_kind="regression", class_names=["nir3x3"])
    save(BoxMean(), tmp_path / "seams", "pt", 24, output_kind="regression", class_names=["nir3x3"])
    reference = nn.functional.avg_pool2d(
        nn.functional.pad(torch.from_numpy(scene[None, 1:2]), (1, 1, 1, 1), mode="replicate"), 3, stride=1
    )[0].numpy()

    seamless, run = run_all(load_model(tmp_path, "seamless"), scene)
    seams, _ = run_all(load_model(tmp_path, "seams"), scene)
    np.testing.assert_allclose(seamless, reference, rtol=1e-6, atol=1e-7)
    assert not np.allclose(seams, reference, rtol=1e-6, atol=1e-7)
    assert run.means() == {"nir3x3": pytest.approx(float(reference.mean()), rel=1e-5)}


def test_regression_marks_nodata_nan(tmp_path: Path, red_nir: np.ndarray) -> None:
    save(BoxMean(), tmp_path / "box", "pt", 32, output_kind="regression", class_names=["nir3x3"])
    values, run = run_all(load_model(tmp_path, "box"), red_nir)
    assert values.shape == (1, 128, 128)
    np.testing.assert_array_equal(np.isnan(values[0]), ~np.isfinite(red_nir).all(axis=0))
    with pytest.raises(ValueError, match="use means"):
        run.histogram()


def test_predict_window_kinds(tmp_path: Path, red_nir: np.ndarray) -> None:
    save(NirOverRed(), tmp_path / "a", "pt", 8)
    save(PatchMeanDifference(), tmp_path / "b", "pt", 8, output_kind="per_patch_classes")
    registry = ModelRegistry(tmp_path, CPU)
    window = torch.from_numpy(red_nir[None, :, :8, :8].copy()).nan_to_num(0.0)
    assert registry.get("a").predict_window(window).shape == (1, 8, 8)
    assert registry.get("b").predict_window(window.expand(3, -1, -1, -1)).shape == (3,)


def test_band_indices_come_from_roles(tmp_path: Path) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8)
    model = load_model(tmp_path, "m")
    assert model.band_indices(resolve(["B02", "B03", "B04", "B08"])) == [2, 3]
    with pytest.raises(InvalidImage, match="needs bands nir; the file has B02, B03, B04"):
        model.band_indices(resolve(["B02", "B03", "B04"]))


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 1, 8, 8), (2, 8, 8)])
def test_wrong_band_count_is_a_clear_error(tmp_path: Path, shape: tuple[int, ...]) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8)
    with pytest.raises(InvalidImage, match=r"model m takes \[N, 2, H, W\] \(red, nir\)"):
        load_model(tmp_path, "m").predict_window(torch.zeros(shape))


def test_output_not_matching_the_manifest_is_a_model_error(tmp_path: Path) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8, class_names=["a", "b", "c"])
    with pytest.raises(ModelError, match=r"returned \[1, 2, 8, 8\], expected \[1, 3, 8, 8\]"):
        load_model(tmp_path, "m").predict_window(torch.zeros(1, 2, 8, 8))


def test_corrupt_model_file_is_a_model_error(tmp_path: Path) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8)
    (tmp_path / "m" / "model.pt").write_bytes(b"not a model")
    registry = ModelRegistry(tmp_path, CPU)
    with pytest.raises(ModelError, match="cannot load model file"):
        registry.get("m")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": None}, "name: Field required"),
        ({"name": "Bad Name"}, "name: String should match pattern"),
        ({"input_bands": ["red", "B08"]}, "input_bands: unknown roles ['B08']"),
        ({"input_bands": ["red", "red"]}, "input_bands: names repeat"),
        ({"output_kind": "segmentation"}, "output_kind: Input should be 'per_pixel_classes'"),
        ({"class_names": []}, "class_names: List should have at least 1 item"),
        ({"class_names": [str(i) for i in range(256)]}, "class_names: List should have at most 255 items"),
        ({"scale": 0}, "scale: Input should be greater than 0"),
        ({"overlap": 4}, "overlap: must be less than half of patch_size"),
        ({"output_kind": "per_patch_classes", "overlap": 1}, "overlap: must be 0 for per_patch_classes"),
        ({"mean": [0.1]}, "mean: 1 values for 2 input_bands"),
        ({"std": [1.0, 0.0]}, "std: values must be > 0"),
        ({"file": "../model.pt"}, "file: String should match pattern"),
        ({"labels": ["x"]}, "labels: Extra inputs are not permitted"),
    ],
)
def test_bad_manifest_names_the_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    folder = save(NirOverRed(), tmp_path / "m", "pt", 8)
    manifest = json.loads((folder / "manifest.json").read_text()) | change
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    with pytest.raises(ManifestError, match=str(folder / "manifest.json")) as info:
        ModelRegistry(tmp_path, CPU)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: (f / "manifest.json").write_text("{not json"), "unreadable"),
        (lambda f: (f / "model.pt").unlink(), "file: 'model.pt' not found next to the manifest"),
        (lambda f: save(NirOverRed(), f.parent / "copy", "pt", 8, name="m"), "name: 'm' also in"),
    ],
)
def test_broken_models_dir_is_refused(tmp_path: Path, setup: Any, message: str) -> None:
    setup(save(NirOverRed(), tmp_path / "m", "pt", 8))
    with pytest.raises(ManifestError, match=message):
        ModelRegistry(tmp_path, CPU)


def test_missing_models_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="MODELS_DIR is not a directory"):
        ModelRegistry(tmp_path / "absent", CPU)


@pytest.mark.parametrize("models_dir", [None, "empty"])
def test_unknown_model(tmp_path: Path, models_dir: str | None) -> None:
    registry = ModelRegistry(tmp_path if models_dir else None, CPU)
    assert registry.names() == []
    with pytest.raises(UnknownAnalysis, match="unknown model 'crops' \\(models: none installed\\)"):
        registry.get("crops")


def test_unknown_model_lists_the_installed_ones(tmp_path: Path) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8)
    with pytest.raises(UnknownAnalysis, match=r"\(models: m\)") as info:
        ModelRegistry(tmp_path, CPU).get("n")
    assert info.value.code == "unknown_analysis"


def test_each_model_loads_once_across_threads(tmp_path: Path) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 8)
    registry = ModelRegistry(tmp_path, CPU)
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(registry.get("m"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8
    assert all(model is got[0] for model in got)


def test_tiles_are_read_with_their_halo_clipped_to_the_scene(tmp_path: Path, red_nir: np.ndarray) -> None:
    save(NirOverRed(), tmp_path / "m", "pt", 40, overlap=6)
    read_window = reader(red_nir)
    list(load_model(tmp_path, "m").tiled(read_window, 128, 128))
    first, last = read_window.reads[0], read_window.reads[-1]
    assert (first.col_off, first.row_off, first.width, first.height) == (0, 0, 34, 34)
    assert (last.col_off, last.row_off, last.width, last.height) == (106, 106, 22, 22)


@pytest.mark.parametrize(
    ("analysis", "name"), [("model:crops-v2", "crops-v2"), ("crop-health", None), ("model:", None)]
)
def test_model_name(analysis: str, name: str | None) -> None:
    assert model_name(analysis) == name
