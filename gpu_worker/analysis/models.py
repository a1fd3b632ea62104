"""The pluggable model slot: ``?analysis=model:<name>`` runs a user-supplied model tiled over the scene.

A model is a folder ``MODELS_DIR/<folder>/`` holding ``manifest.json`` and the model file it names::

    {
      "name": "my-crop-model",             # [a-z0-9][a-z0-9._-]*, the <name> in ?analysis=model:<name>
      "version": "1.0.0",
      "file": "model.pt",                  # TorchScript (.pt, .ts) or a torch.export archive (.pt2, exported
                                           # in eval mode with a dynamic batch dimension), next to the manifest
      "input_bands": ["red", "nir"],       # band roles (STAC common names), in the model's channel order
      "scale": 1.0,                        # model input = reflectance x scale (1: reflectance, 10000: S2 DN)
      "patch_size": 64,                    # the model always sees [B, C, patch_size, patch_size]
      "overlap": 8,                        # per-pixel kinds: context pixels per side, dropped from the output
      "output_kind": "per_pixel_classes",  # model returns [B, K, P, P] scores; argmax over K
                                           # "per_patch_classes": [B, K] scores, one class per patch
                                           # "regression": [B, K, P, P] values
      "class_names": ["other", "crop"],    # K classes (at most 255), or the K output names for regression
      "mean": [0.1, 0.3], "std": [0.05, 0.1]   # optional, per input band, applied after scale
    }

Use (engineer "analysis" wires ``model:<name>`` like this)::

    registry = ModelRegistry(models_dir, device)        # once per worker; validates every manifest (ManifestError)
    model = registry.get(name)                          # UnknownAnalysis if absent; loaded once, thread-safe
    indices = model.band_indices(reader.bands)          # InvalidImage naming the missing band roles
    run = model.tiled(read_window, reader.width, reader.height)
    for window, values in run:                          # rasterio Window in scene pixels, row-major
        writer.write(values, window)                    # uint8 [h, w] class ids, NODATA_CLASS where input is
                                                        # nodata; regression: float32 [K, h, w], NaN nodata
    run.histogram()                                     # {class_name: fraction of valid pixels}; or run.means()

``read_window(window) -> [C, h, w]`` returns reflectance (not DN) of ``input_bands`` for any window inside the
scene, NaN where nodata; a numpy array or a tensor. Tiles are read with their ``overlap`` halo (clipped at the scene
edge, then padded by edge replication up to ``patch_size``), predicted in batches of ``batch_size`` and cropped.
A per-patch class covers the patch's valid pixels; the histogram is pixel-weighted.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rasterio.windows import Window

from shared.bands import COMMON_NAMES, BandSet
from shared.errors import InvalidImage, PermanentError, UnknownAnalysis

MANIFEST = "manifest.json"
NODATA_CLASS = 255
OutputKind = Literal["per_pixel_classes", "per_patch_classes", "regression"]
ReadWindow = Callable[[Window], "np.ndarray[Any, Any] | torch.Tensor"]


class ManifestError(ValueError):
    """A manifest is unreadable or invalid; the message names the file and the field. A deployment error."""


class ModelError(PermanentError):
    """A model file does not load, or returns outputs that do not match its manifest."""

    code = "model_error"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)
    version: str = Field(min_length=1)
    file: str = Field(pattern=r"^[^/\\]+\.(pt|ts|pt2)$")
    input_bands: list[str] = Field(min_length=1)
    scale: float = Field(gt=0)
    patch_size: int = Field(ge=1, le=4096)
    overlap: int = Field(0, ge=0)
    output_kind: OutputKind
    class_names: list[str] = Field(min_length=1, max_length=NODATA_CLASS)
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        unknown = [b for b in self.input_bands if b not in COMMON_NAMES]
        if unknown:
            raise ValueError(f"input_bands: unknown roles {unknown}; use {sorted(COMMON_NAMES)}")
        for field, names in (("input_bands", self.input_bands), ("class_names", self.class_names)):
            if len(set(names)) != len(names):
                raise ValueError(f"{field}: names repeat")
        for field, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != len(self.input_bands):
                raise ValueError(f"{field}: {len(values)} values for {len(self.input_bands)} input_bands")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std: values must be > 0")
        if 2 * self.overlap >= self.patch_size:
            raise ValueError("overlap: must be less than half of patch_size")
        if self.output_kind == "per_patch_classes" and self.overlap:
            raise ValueError("overlap: must be 0 for per_patch_classes")
        return self


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable: {e}") from e
    except ValidationError as e:
        raise ManifestError(f"{path}: {'; '.join(_describe(err) for err in e.errors())}") from e


def _describe(error: Any) -> str:
    """``field: message``; cross-field checks already start with the field name."""
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message


def _load_module(path: Path, device: torch.device) -> Callable[[torch.Tensor], Any]:
    try:
        if path.suffix == ".pt2":  # exported from a model in eval mode, with a dynamic batch dimension
            module: Any = torch.export.load(str(path)).module().to(device)
        else:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; the slot still accepts it
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device).eval()  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"cannot load model file {path}: {e}") from e
    return module  # type: ignore[no-any-return]


class LoadedModel:
    """A manifest and its model on the worker's device."""

    def __init__(self, manifest: Manifest, module: Callable[[torch.Tensor], Any], device: torch.device) -> None:
        self.manifest, self.device, self._module = manifest, device, module
        bands = len(manifest.input_bands)
        self._mean = torch.tensor(manifest.mean or [0.0] * bands, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(manifest.std or [1.0] * bands, device=device).view(1, -1, 1, 1)

    def band_indices(self, bands: BandSet) -> list[int]:
        """File indices of ``input_bands``; :class:`InvalidImage` naming the roles the file lacks."""
        missing = [role for role in self.manifest.input_bands if not bands.has(role)]
        if missing:
            raise InvalidImage(
                f"model {self.manifest.name} needs bands {', '.join(missing)}; the file has {', '.join(bands.names)}"
            )
        return [bands.index(role) for role in self.manifest.input_bands]

    def predict_window(self, reflectance: torch.Tensor) -> torch.Tensor:
        """[N, C, P, P] reflectance (NaN = nodata) -> per-pixel class ids [N, P, P] (int64), per-patch class ids
        [N], or regression values [N, K, P, P] (float32). Nodata pixels are fed to the model as the band mean."""
        m = self.manifest
        if reflectance.ndim != 4 or reflectance.shape[1] != len(m.input_bands):
            raise InvalidImage(
                f"model {m.name} takes [N, {len(m.input_bands)}, H, W] ({', '.join(m.input_bands)}), "
                f"got {list(reflectance.shape)}"
            )
        x = (reflectance.to(self.device, torch.float32) * m.scale - self._mean) / self._std
        with torch.inference_mode():
            out = self._module(torch.nan_to_num(x, nan=0.0))
        n, k = reflectance.shape[0], len(m.class_names)
        expected = (n, k) if m.output_kind == "per_patch_classes" else (n, k, *reflectance.shape[2:])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"model {m.name} ({m.output_kind}) returned {got}, expected {list(expected)}")
        return out.float() if m.output_kind == "regression" else out.argmax(dim=1)

    def tiled(self, read_window: ReadWindow, width: int, height: int, batch_size: int = 16) -> TiledRun:
        return TiledRun(self, read_window, width, height, batch_size)


class TiledRun:
    """Iterate for ``(window, values)`` tiles; then :meth:`histogram` (classes) or :meth:`means` (regression)."""

    def __init__(self, model: LoadedModel, read_window: ReadWindow, width: int, height: int, batch_size: int) -> None:
        self.model, self.read_window, self.width, self.height = model, read_window, width, height
        self.batch_size = batch_size
        m = model.manifest
        self._classes = m.output_kind != "regression"
        self._counts = np.zeros(len(m.class_names), dtype=np.int64)
        self._sums = np.zeros(len(m.class_names), dtype=np.float64)
        self.valid_pixels = 0

    def __iter__(self) -> Iterator[tuple[Window, np.ndarray[Any, Any]]]:
        batch: list[tuple[Window, torch.Tensor]] = []
        for window in self._windows():
            batch.append((window, self._read_padded(window)))
            if len(batch) == self.batch_size:
                yield from self._predict(batch)
                batch = []
        if batch:
            yield from self._predict(batch)

    def histogram(self) -> dict[str, float]:
        """Fraction of valid pixels in each class (all zero when no pixel is valid)."""
        if not self._classes:
            raise ValueError(f"model {self.model.manifest.name} is a regression: use means()")
        total = max(self.valid_pixels, 1)
        return {name: float(c) / total for name, c in zip(self.model.manifest.class_names, self._counts, strict=True)}

    def means(self) -> dict[str, float | None]:
        """Mean of each regression output over valid pixels (None when no pixel is valid)."""
        if self._classes:
            raise ValueError(f"model {self.model.manifest.name} predicts classes: use histogram()")
        names = self.model.manifest.class_names
        if not self.valid_pixels:
            return dict.fromkeys(names)
        return {name: float(s) / self.valid_pixels for name, s in zip(names, self._sums, strict=True)}

    def _windows(self) -> Iterator[Window]:
        m = self.model.manifest
        core = m.patch_size - 2 * m.overlap
        for row in range(0, self.height, core):
            for col in range(0, self.width, core):
                yield Window(col, row, min(core, self.width - col), min(core, self.height - row))

    def _read_padded(self, window: Window) -> torch.Tensor:
        """[C, P, P]: the window plus its halo, clipped to the scene and padded by edge replication."""
        p, o = self.model.manifest.patch_size, self.model.manifest.overlap
        col, row = int(window.col_off) - o, int(window.row_off) - o
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + p, self.width), min(row + p, self.height)
        data = self.read_window(Window(c0, r0, c1 - c0, r1 - r0))
        tile = torch.as_tensor(data).to(self.model.device, torch.float32)
        if tile.shape[1:] != (r1 - r0, c1 - c0):
            raise InvalidImage(f"read_window returned {list(tile.shape)} for a {r1 - r0}x{c1 - c0} window")
        pad = (c0 - col, col + p - c1, r0 - row, row + p - r1)
        return F.pad(tile[None], pad, mode="replicate")[0] if any(pad) else tile

    def _predict(self, batch: list[tuple[Window, torch.Tensor]]) -> Iterator[tuple[Window, np.ndarray[Any, Any]]]:
        stack = torch.stack([tile for _, tile in batch])
        out = self.model.predict_window(stack)
        o = self.model.manifest.overlap
        for i, (window, tile) in enumerate(batch):
            h, w = int(window.height), int(window.width)
            valid = tile[:, o : o + h, o : o + w].isfinite().all(dim=0)
            if self.model.manifest.output_kind == "per_patch_classes":
                values = out[i].expand(h, w)
            else:
                values = out[i, ..., o : o + h, o : o + w]
            yield window, self._account(values, valid)

    def _account(self, values: torch.Tensor, valid: torch.Tensor) -> np.ndarray[Any, Any]:
        self.valid_pixels += int(valid.sum())
        if self._classes:
            ids = values.masked_fill(~valid, NODATA_CLASS).to(torch.uint8)
            self._counts += torch.bincount(ids[valid].long(), minlength=len(self._counts)).cpu().numpy()
            return ids.cpu().numpy()
        self._sums += values[:, valid].double().sum(dim=1).cpu().numpy()
        return values.masked_fill(~valid, float("nan")).cpu().numpy()


class ModelRegistry:
    """Every ``MODELS_DIR/*/manifest.json``, validated at construction; each model loaded once, on first use."""

    def __init__(self, models_dir: Path | None, device: torch.device) -> None:
        self.device = device
        self._manifests: dict[str, tuple[Manifest, Path]] = {}
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        if models_dir is not None and not models_dir.is_dir():
            raise ManifestError(f"{models_dir}: MODELS_DIR is not a directory")
        for path in sorted(models_dir.glob(f"*/{MANIFEST}")) if models_dir else []:
            manifest = read_manifest(path)
            if manifest.name in self._manifests:
                raise ManifestError(f"{path}: name: {manifest.name!r} also in {self._manifests[manifest.name][1]}")
            if not (path.parent / manifest.file).is_file():
                raise ManifestError(f"{path}: file: {manifest.file!r} not found next to the manifest")
            self._manifests[manifest.name] = (manifest, path.parent / manifest.file)

    def names(self) -> list[str]:
        return sorted(self._manifests)

    def get(self, name: str) -> LoadedModel:
        """The loaded model; :class:`UnknownAnalysis` if no manifest has this name."""
        if name not in self._manifests:
            known = ", ".join(self.names()) or "none installed"
            raise UnknownAnalysis(f"unknown model {name!r} (models: {known})")
        with self._lock:
            if name not in self._loaded:
                manifest, file = self._manifests[name]
                self._loaded[name] = LoadedModel(manifest, _load_module(file, self.device), self.device)
            return self._loaded[name]


def model_name(analysis: str) -> str | None:
    """``"model:<name>"`` -> ``<name>``; None for any other analysis."""
    match = re.fullmatch(r"model:(.+)", analysis)
    return match.group(1) if match else None
