"""Where a scene's cloud mask comes from, given its bands: one object answering "which pixels of this window are
cloudy?". Sentinel-2 L1C with the ten s2cloudless bands -> :class:`S2CloudMask`; Landsat with its quality band
(QA_PIXEL or BQA) -> :class:`LandsatQaCloudMask`; anything else -> no mask (``cloud_fraction: null``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from rasterio.windows import Window

from gpu_worker.analysis.cloudmask import (
    AVERAGE_OVER,
    DILATION_SIZE,
    MODEL_BANDS,
    THRESHOLD,
    CloudDetector,
    CoarseGrid,
    coarse_factor,
    upsample,
)
from gpu_worker.analysis.placement import Box, covering
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.analysis.request import Progress, no_progress
from shared.bands import SENTINEL2

COARSE_WINDOW = 1024
REACH = AVERAGE_OVER + DILATION_SIZE  # coarse cells whose probabilities a cell's mask depends on, each way


class CloudSource(Protocol):
    def window(self, window: Window) -> torch.Tensor: ...
    def describe(self) -> dict[str, object]: ...


class S2CloudMask:
    """s2cloudless on the ~160 m grid. Built with one pass over the scene's ten detector bands (window by window
    into a :class:`CoarseGrid`, a few MB even for a full tile), then queried per window of the second pass.

    ``region`` (pixel boxes: the fields'): read only the coarse cells within :data:`REACH` cells of them. A cell's
    mask depends on the probabilities of the cells within ``average_over`` (the disk mean) plus ``dilation_size``
    (the dilation) of it, so the mask over the boxes is exactly the whole scene's; cells beyond stay unread.

    ``along``: bands the next pass reads (0-based), decoded in the same read as the detector's and dropped at once.
    It costs next to nothing (a pixel-interleaved tile is inflated whole whatever bands are asked for) and leaves
    the next pass's blocks in GDAL's block cache (256 MB in the worker), so a scene that fits is decoded once. Without
    it a band the detector does not use (green) made the next pass decode every tile again: GDAL's multi-threaded
    read (``GDAL_NUM_THREADS``) caches the blocks of the bands asked for only (1024 x 1024 x 13: 46-60 ms again)."""

    method = "s2cloudless"

    def __init__(
        self,
        scene: SceneReader,
        detector: CloudDetector,
        progress: Progress = no_progress,
        region: Sequence[Box] | None = None,
        along: Sequence[int] = (),
    ) -> None:
        self.factor = f = coarse_factor(scene.pixel_size_m() or 10.0)
        grid = CoarseGrid(scene.height, scene.width, self.factor, scene.device, scene.scale)
        indices = scene.bands.native_names(SENTINEL2, MODEL_BANDS)
        read = indices + sorted(set(along) - set(indices))  # the detector's bands first, in its order
        size = self.factor * max(1, COARSE_WINDOW // self.factor)
        if region is None:
            every = list(scene.windows(size))
        else:
            cells = [Box((b.row0 // f - REACH) * f, (b.col0 // f - REACH) * f, ((b.row1 - 1) // f + REACH + 1) * f,
                         ((b.col1 - 1) // f + REACH + 1) * f) for b in region]  # fmt: skip
            every = covering(cells, scene.width, scene.height, size, (f, f))
        windows = [w for w in every if scene.holds_data(w, indices)]  # sparse ones add nothing
        n = len(indices)
        for i, (window, block) in enumerate(zip(windows, scene.blocks(windows, read), strict=True)):
            progress("cloud_mask", i / (len(windows) + 1))  # the detector's run is the last part
            grid.add(int(window.row_off), int(window.col_off), block.dn[:n], block.valid[:n])
        progress("cloud_mask", len(windows) / (len(windows) + 1))
        reflectance, ok = grid.reflectance()
        self.probability, self.mask = detector.cloud_mask(reflectance, ok)
        self.resolution_m = (scene.pixel_size_m() or 10.0) * self.factor

    def window(self, window: Window) -> torch.Tensor:
        """[h, w] bool: cloudy pixels of ``window`` on the scene grid."""
        return upsample(self.mask, self.factor, int(window.row_off), int(window.col_off), window.height, window.width)

    def describe(self) -> dict[str, object]:
        return {"method": self.method, "resolution_m": self.resolution_m, "threshold": THRESHOLD,
                "average_over": AVERAGE_OVER, "dilation_size": DILATION_SIZE}  # fmt: skip


def s2_cloud_bands_present(scene: SceneReader) -> bool:
    return scene.bands.sensor == "sentinel-2" and scene.bands.has(*(SENTINEL2[name] for name in MODEL_BANDS))


# Landsat quality bits -> cloudy. Bit positions from the USGS Landsat 8 data format control books.
def _qa_pixel(qa: np.ndarray) -> np.ndarray:
    """Collection 2 QA_PIXEL: dilated cloud (bit 1), cirrus (bit 2) or cloud (bit 3)."""
    cloudy: np.ndarray = (qa & 0b1110) != 0
    return cloudy


def _bqa_collection1(qa: np.ndarray) -> np.ndarray:
    """Collection 1 BQA: cloud (bit 4), high cloud confidence (bits 5-6) or high cirrus confidence (bits 11-12)."""
    cloudy: np.ndarray = ((qa >> 4) & 1 == 1) | ((qa >> 5) & 3 == 3) | ((qa >> 11) & 3 == 3)
    return cloudy


def _bqa_pre_collection(qa: np.ndarray) -> np.ndarray:
    """Pre-collection (2013-2016) BQA: medium or high cloud confidence (bits 14-15) or high cirrus confidence
    (bits 12-13)."""
    cloudy: np.ndarray = ((qa >> 14) & 3 >= 2) | ((qa >> 12) & 3 == 3)
    return cloudy


class LandsatQaCloudMask:
    """Clouds from Landsat's own quality band, per pixel. A BQA band's layout is told apart by one scan of it:
    pre-collection products set bits 13-15 (cloud / cirrus confidence) on every determined pixel, Collection 1
    never uses them."""

    method = "landsat-qa"

    def __init__(self, scene: SceneReader, progress: Progress = no_progress) -> None:
        self.scene = scene
        if scene.bands.has("qa_pixel"):
            self.index, self.layout, self._rule = scene.bands.index("qa_pixel"), "collection-2 QA_PIXEL", _qa_pixel
        else:
            self.index = scene.bands.index("qa_bqa")
            seen = 0
            windows = list(scene.windows(COARSE_WINDOW))
            for i, window in enumerate(windows):
                progress("cloud_mask", i / len(windows))
                seen |= int(np.bitwise_or.reduce(scene.read_raw(window, self.index), axis=None))
            pre = bool(seen & 0xE000)
            self.layout = "pre-collection BQA" if pre else "collection-1 BQA"
            self._rule = _bqa_pre_collection if pre else _bqa_collection1

    def window(self, window: Window) -> torch.Tensor:
        qa = self.scene.read_raw(window, self.index).astype(np.int64)
        return torch.from_numpy(self._rule(qa)).to(self.scene.device)

    def describe(self) -> dict[str, object]:
        return {"method": self.method, "layout": self.layout, "resolution_m": self.scene.pixel_size_m()}


def cloud_source(
    scene: SceneReader,
    detector: CloudDetector,
    progress: Progress = no_progress,
    region: Sequence[Box] | None = None,
    along: Sequence[int] = (),
) -> CloudSource | None:
    """The best cloud mask the scene's bands allow, or None; ``progress`` hears of the ``cloud_mask`` stage when the
    mask takes a pass over the scene. ``region``: the mask is needed within these pixel boxes only. ``along``: the
    bands the next pass reads (:class:`S2CloudMask`)."""
    if s2_cloud_bands_present(scene):
        return S2CloudMask(scene, detector, progress, region, along)
    if scene.bands.sensor == "landsat-oli" and (scene.bands.has("qa_pixel") or scene.bands.has("qa_bqa")):
        return LandsatQaCloudMask(scene, progress)
    return None
