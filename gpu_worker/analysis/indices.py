"""Vegetation and water indices on reflectance tensors, with their validity masks.

Each index is computed where every band it uses is valid; a pixel whose denominator is zero, or whose value is not
finite, is excluded from that index only. The crop-health analysis counts an index only over valid pixels, those
with a defined NDVI (:mod:`gpu_worker.analysis.validity`).

The bands come as float32 (:class:`gpu_worker.analysis.raster.Block`), and NDVI, NDWI and SAVI are computed in
float32: their denominators are sums of non-negative reflectances, so float32 keeps them within 1e-6 of a float64
reference. EVI's denominator subtracts ``7.5 blue`` and can cancel to nearly zero, where float32 rounding would
change which pixels count and blow up their values; it is computed in float64 (``IndexSpec.float64``) from the
stored values (:meth:`gpu_worker.analysis.raster.Block.exact`), not from the rounded float32 reflectance.

* NDVI = (nir - red) / (nir + red)
* NDWI (McFeeters 1996) = (green - nir) / (green + nir)
* EVI = 2.5 (nir - red) / (nir + 6 red - 7.5 blue + 1)
* SAVI (L = 0.5) = 1.5 (nir - red) / (nir + red + 0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class IndexSpec:
    name: str
    roles: tuple[str, ...]
    formula: Callable[[Mapping[str, Tensor]], tuple[Tensor, Tensor]]  # -> (numerator, denominator): new tensors
    histogram_range: tuple[float, float]  # where the fine percentile histogram goes (see stats.py)
    float64: bool = False  # computed in float64: the denominator can cancel (see the module docstring)


def _ndvi(b: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    return b["nir"] - b["red"], b["nir"] + b["red"]


def _ndwi(b: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    return b["green"] - b["nir"], b["green"] + b["nir"]


def _evi(b: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    return 2.5 * (b["nir"] - b["red"]), b["nir"] + 6.0 * b["red"] - 7.5 * b["blue"] + 1.0


def _savi(b: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    return 1.5 * (b["nir"] - b["red"]), b["nir"] + b["red"] + 0.5


INDICES: tuple[IndexSpec, ...] = (
    IndexSpec("ndvi", ("red", "nir"), _ndvi, (-1.0, 1.0)),
    IndexSpec("ndwi", ("green", "nir"), _ndwi, (-1.0, 1.0)),
    IndexSpec("evi", ("blue", "red", "nir"), _evi, (-4.0, 4.0), float64=True),
    IndexSpec("savi", ("red", "nir"), _savi, (-1.5, 1.5)),
)


def compute(spec: IndexSpec, bands: Mapping[str, Tensor], valid: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(values, mask): index values (the bands' dtype: float64 ones for a ``float64`` spec) and where they count.
    All tensors share one shape."""
    numerator, denominator = spec.formula(bands)
    mask = denominator != 0
    for role in spec.roles:
        mask &= valid[role]
    values = numerator.div_(denominator.masked_fill_(~mask, 1.0))  # in place: the formula's tensors are its own
    return values, mask.logical_and_(torch.isfinite(values))
