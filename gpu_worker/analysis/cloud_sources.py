"""Where a scene's cloud mask comes from, given its bands: one object answering "which pixels of this window are
cloudy?". Sentinel-2 L1C with the ten s2cloudless bands -> :class:`S2CloudMask`; anything else -> no mask.
"""

from __future__ import annotations

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
from gpu_worker.analysis.raster import SceneReader
from shared.bands import SENTINEL2

COARSE_WINDOW = 1024


class S2CloudMask:
    """s2cloudless on the ~160 m grid. Built with one pass over the scene's ten detector bands (window by window
    into a :class:`CoarseGrid`, a few MB even for a full tile), then queried per window of the second pass."""

    method = "s2cloudless"

    def __init__(self, scene: SceneReader, detector: CloudDetector) -> None:
        self.factor = coarse_factor(scene.pixel_size_m() or 10.0)
        grid = CoarseGrid(scene.height, scene.width, self.factor, scene.device)
        indices = scene.bands.native_names(SENTINEL2, MODEL_BANDS)
        size = self.factor * max(1, COARSE_WINDOW // self.factor)
        for window in scene.windows(size):
            block = scene.read(window, indices)
            grid.add(int(window.row_off), int(window.col_off), block.values, block.valid)
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
