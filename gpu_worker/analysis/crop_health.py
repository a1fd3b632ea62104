"""The crop-health analysis: vegetation and water indices over the valid pixels of a scene, window by window.

Memory is bounded by the window size (``window`` x ``window`` pixels of the bands in use, plus fixed-size
histograms), not by the scene: a full 10980 x 10980 Sentinel-2 tile streams through the same code.

``valid_fraction`` is the share of pixels where red and NIR are both valid (not the file's nodata value, finite);
each index's statistics are over the pixels where all the bands it uses are valid and its denominator is not zero.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gpu_worker.analysis.indices import INDICES, compute
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest
from gpu_worker.analysis.stats import StreamingStats

log = logging.getLogger(__name__)

MODEL_VERSION = "crop-health/1"
DEFAULT_WINDOW = 1024
INDEX_ROLES = ("blue", "green", "red", "nir")


class CropHealth:
    def __init__(self, device: torch.device, window: int = DEFAULT_WINDOW) -> None:
        self.device, self.window = device, window

    def run(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        with SceneReader(image_path, request.bands, request.scale, self.device) as scene:
            roles = [r for r in INDEX_ROLES if scene.bands.has(r)]
            file_indices = [scene.bands.index(r) for r in roles]
            specs = [s for s in INDICES if scene.bands.has(*s.roles)]
            stats = {s.name: StreamingStats(*s.histogram_range, self.device) for s in specs}
            valid_pixels = torch.zeros((), dtype=torch.int64, device=self.device)
            for window in scene.windows(self.window):
                block = scene.read(window, file_indices)
                bands = {r: block.values[j] for j, r in enumerate(roles)}
                valid = {r: block.valid[j] for j, r in enumerate(roles)}
                valid_pixels += (valid["red"] & valid["nir"]).sum()
                for spec in specs:
                    values, mask = compute(spec, bands, valid)
                    stats[spec.name].update(values, mask)
            indices: dict[str, Any] = {}
            for spec in INDICES:
                summary = stats[spec.name].summary() if spec.name in stats else None
                indices[spec.name] = summary.as_json() if summary else None
            result = {
                "analysis": "crop-health",
                "scene": scene.describe(),
                "valid_fraction": int(valid_pixels.item()) / (scene.width * scene.height),
                "indices": indices,
                "model_version": MODEL_VERSION,
            }
        log.info("crop-health analysed %s", image_path.name, extra={"action": "analyse"})
        return AnalysisOutput(result=result, files={})
