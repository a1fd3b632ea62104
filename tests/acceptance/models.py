"""A tiny model for the pluggable slot, whose weights the test sets, so that its output is known exactly.

``nir-over-red`` is a 1x1 convolution over (red, nir) with scores ``other = 2 red - nir`` and
``vegetation = nir - 2 red``: class 1 exactly where NIR > 2 x red (NDVI > 1/3), ties to class 0. Every step the
worker takes on the way (DN / scale, x manifest scale, two exact products and one rounding in the convolution) is
monotonic and keeps distinct DNs distinct, so the class map equals :func:`expected_classes` on the integer DNs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODEL_NAME = "nir-over-red"
CLASS_NAMES = ("other", "vegetation")
NODATA_CLASS = 255  # gpu_worker.analysis.models.NODATA_CLASS (the class map's nodata)


class NirOverRed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[2.0, -1.0], [-2.0, 1.0]]).view(2, 2, 1, 1))  # [class, (red, nir)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


def write_models(models_dir: Path, patch_size: int = 32, overlap: int = 4) -> Path:
    """``MODELS_DIR/nir-over-red/{model.pt, manifest.json}``; returns ``models_dir``."""
    folder = models_dir / MODEL_NAME
    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.9+ but is what users still ship
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(NirOverRed().eval(), torch.rand(1, 2, patch_size, patch_size))  # type: ignore[no-untyped-call]
        traced.save(str(folder / "model.pt"))
    manifest = {
        "name": MODEL_NAME,
        "version": "test-1",
        "file": "model.pt",
        "input_bands": ["red", "nir"],
        "scale": 10000.0,
        "patch_size": patch_size,
        "overlap": overlap,
        "output_kind": "per_pixel_classes",
        "class_names": list(CLASS_NAMES),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return models_dir


def expected_classes(red: np.ndarray, nir: np.ndarray, nodata: float | None) -> np.ndarray:
    """The class map the model must produce from integer DNs: 1 where nir > 2 red, 0 elsewhere, 255 on nodata."""
    red, nir = red.astype(np.int64), nir.astype(np.int64)
    classes = (nir > 2 * red).astype(np.uint8)
    if nodata is not None:
        classes[(red == nodata) | (nir == nodata)] = NODATA_CLASS
    return classes
