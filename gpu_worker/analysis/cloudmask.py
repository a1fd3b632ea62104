"""Sentinel-2 L1C cloud mask: Sentinel Hub's s2cloudless LightGBM detector, post-processed in torch.

The booster (``s2cloudless/``, CC-BY-SA-4.0, see its README) is loaded with ``lightgbm`` alone; the s2cloudless
package is never imported. Its ``S2PixelCloudDetector`` post-processing is reimplemented here on the device:

1. per-pixel cloud probability from the 10 bands in :data:`MODEL_BANDS` (reflectance = DN / 10000);
2. mean over a disk of radius ``average_over`` (OpenCV ``filter2D`` with ``BORDER_REFLECT``), then ``> threshold``;
3. dilation by a disk of radius ``dilation_size`` (OpenCV ``dilate``: pixels outside the image do not count).

Sentinel Hub runs it at 160 m with threshold 0.4, average_over 4, dilation_size 2, and so do we: the scene is
averaged over ``factor`` x ``factor`` blocks (16 x 16 on the 10 m grid, valid pixels only) by :class:`CoarseGrid`,
the detector and the post-processing run on that grid, and the mask is repeated back onto the scene's grid. This is
what the model was designed for, and it is 256 times cheaper than running 170 trees on every 10 m pixel.
From processing baseline 04.00 (2022) L1C DNs carry a +1000 offset; harmonise such data before submitting.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import torch
import torch.nn.functional as F

from gpu_worker.analysis.raster import as_float, every_band

MODEL_FILE = Path(__file__).parent / "s2cloudless" / "pixel_s2_cloud_detector_lightGBM_v0.1.txt"
MODEL_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
VERSION = "s2cloudless-1.7.3 lightGBM-v0.1"
THRESHOLD = 0.4
AVERAGE_OVER = 4
DILATION_SIZE = 2
RESOLUTION_M = 160.0


def disk(radius: int) -> torch.Tensor:
    """The filled disk ``s2cloudless.utils.cv2_disk`` draws with ``cv2.circle``: x² + y² <= r², as float64."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).to(torch.float64)


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices for OpenCV's BORDER_REFLECT (fedcba|abcdef|fedcba), valid for any pad."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def postprocess(
    prob: torch.Tensor,
    threshold: float = THRESHOLD,
    average_over: int = AVERAGE_OVER,
    dilation_size: int = DILATION_SIZE,
) -> torch.Tensor:
    """[H, W] cloud probability -> [H, W] bool cloud mask, exactly as ``S2PixelCloudDetector.get_mask_from_prob``."""
    x = prob.to(torch.float64)
    if average_over > 0:
        h, w = x.shape
        rows = _reflect_index(h, average_over, x.device)
        cols = _reflect_index(w, average_over, x.device)
        padded = x[rows][:, cols]
        kernel = disk(average_over).to(x.device)
        kernel = kernel / kernel.sum()
        x = F.conv2d(padded[None, None], kernel[None, None])[0, 0]
    cloudy = x > threshold
    if dilation_size > 0:
        kernel = disk(dilation_size).to(x.device)
        hits = F.conv2d(cloudy.to(torch.float64)[None, None], kernel[None, None], padding=dilation_size)[0, 0]
        cloudy = hits > 0
    return cloudy


class CloudDetector:
    """The s2cloudless booster, loaded once. LightGBM predicts on the CPU (see bench/analysis.py), one prediction at
    a time: the worker may analyse several scenes at once (``WORKER_ANALYSES``), and LightGBM's own predictor setup on
    a shared booster races (microsoft/LightGBM#6142); a prediction uses every thread it is given anyway."""

    def __init__(self, model_file: Path = MODEL_FILE, *, threads: int | None = None) -> None:
        """``threads``: OpenMP threads per prediction (None: LightGBM's default, all cores)."""
        self.booster = lightgbm.Booster(model_file=str(model_file))
        self._options: dict[str, Any] = {} if threads is None else {"num_threads": threads}
        self._lock = threading.Lock()

    def probability(self, reflectance: np.ndarray) -> np.ndarray:
        """[P, 10] reflectance in :data:`MODEL_BANDS` order -> [P] cloud probability (float32)."""
        if reflectance.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        features = reflectance.astype(np.float32)
        with self._lock:
            predicted = self.booster.predict(features, **self._options)
        return np.asarray(predicted, dtype=np.float32)

    def cloud_mask(self, reflectance: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[10, H, W] reflectance and [H, W] validity -> (probability [H, W] float32, mask [H, W] bool).

        Cells without data get probability 0 (they are excluded from every fraction anyway)."""
        _, h, w = reflectance.shape
        pixels = reflectance.permute(1, 2, 0)[valid].cpu().numpy()
        prob = torch.zeros((h, w), dtype=torch.float32, device=reflectance.device)
        prob[valid] = torch.from_numpy(self.probability(pixels)).to(reflectance.device)
        return prob, postprocess(prob)


class CoarseGrid:
    """Valid-pixel block means of the detector's bands on a grid ``factor`` times coarser than the scene.

    :meth:`add` takes the values as stored (:attr:`gpu_worker.analysis.raster.Block.dn`) and ``scale`` turns the
    means into reflectance. The running sums are float64, which holds any sum of integer DNs exactly (below 2**53), so
    integer data gives the exact block means whatever the summation order (float64 reductions also ran 4.5x faster
    than int32/int64 ones here). A window's block sums are taken in float32 where that is exact too: integers of at
    most 16 bits in blocks of at most 256 pixels (Sentinel-2's 16 x 16), whose partial sums all stay below 2**24;
    that halves the memory the reduction reads (a window of ten bands: 40 MB instead of 80) and ran 4x faster."""

    def __init__(self, height: int, width: int, factor: int, device: torch.device, scale: float = 1.0) -> None:
        self.factor, self.scale = factor, scale
        self.shape = (math.ceil(height / factor), math.ceil(width / factor))
        self._sums = torch.zeros((len(MODEL_BANDS), *self.shape), dtype=torch.float64, device=device)
        self._counts = torch.zeros(self.shape, dtype=torch.float64, device=device)

    def _sum_dtype(self, values: torch.Tensor) -> torch.dtype:
        """float32 when every block sum of ``values`` and its partial sums are integers below 2**24, else float64."""
        if values.is_floating_point() or values.is_complex() or values.element_size() > 2:
            return torch.float64
        return torch.float32 if self.factor**2 * 2 ** (8 * values.element_size()) <= 2**24 else torch.float64

    def add(self, row: int, col: int, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Add a window whose top-left corner (``row``, ``col``) lies on the coarse grid."""
        f = self.factor
        if row % f or col % f:
            raise ValueError(f"window at ({row}, {col}) is not aligned to the {f}-pixel grid")
        ok = every_band(valid)
        x = as_float(values, self._sum_dtype(values))
        if not bool(ok.all()):  # nodata somewhere: skip the select where there is none (most windows)
            x.masked_fill_(~ok, 0.0)
        c, h, w = x.shape
        hc, wc = math.ceil(h / f), math.ceil(w / f)
        n = ok.to(torch.float64)
        if (hc * f, wc * f) != (h, w):  # a window at the scene's right or bottom edge
            x = F.pad(x, (0, wc * f - w, 0, hc * f - h))
            n = F.pad(n, (0, wc * f - w, 0, hc * f - h))
        r0, c0 = row // f, col // f
        self._sums[:, r0 : r0 + hc, c0 : c0 + wc] += x.reshape(c, hc, f, wc, f).sum(dim=(2, 4)).to(torch.float64)
        self._counts[r0 : r0 + hc, c0 : c0 + wc] += n.reshape(hc, f, wc, f).sum(dim=(1, 3))

    def reflectance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([10, Hc, Wc] mean reflectance, [Hc, Wc] cells with at least one valid pixel)."""
        return self._sums / self._counts.clamp(min=1.0) / self.scale, self._counts > 0


def coarse_factor(pixel_size_m: float | None) -> int:
    """Block size that brings the scene to about :data:`RESOLUTION_M` (1 when it is already that coarse)."""
    if not pixel_size_m or pixel_size_m <= 0:
        return 1
    return max(1, round(RESOLUTION_M / pixel_size_m))


def upsample(mask: torch.Tensor, factor: int, row: int, col: int, height: int, width: int) -> torch.Tensor:
    """The scene-grid window (``row``, ``col``, ``height``, ``width``) of a coarse mask (nearest neighbour)."""
    r0, c0 = row // factor, col // factor
    r1, c1 = (row + height - 1) // factor + 1, (col + width - 1) // factor + 1
    cells = mask[r0:r1, c0:c1]
    h, w = cells.shape  # each cell repeated factor x factor times (2x faster than repeat_interleave twice)
    part = cells[:, None, :, None].expand(h, factor, w, factor).reshape(h * factor, w * factor)
    dr, dc = row - r0 * factor, col - c0 * factor
    window = part[dr : dr + height, dc : dc + width]
    # reshape copies, except where it can view the mask (factor 1, or one coarse row or column): never hand that out
    return window.clone() if part.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr() else window
