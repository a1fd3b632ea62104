"""``model:<name>``: a model from the pluggable slot (:mod:`gpu_worker.analysis.models`) run tiled over the scene.

Classes (per pixel or per patch) give a ``class_histogram`` (fraction of valid pixels per class) and a
``class_map_cog`` (uint8 class ids, 255 = no data); a regression gives ``means`` and a ``model_output_cog``
(float32, one band per output, NaN = no data). Both COGs are on the input's grid. Progress: ``decode``, then the
model's tiles as ``cover`` (what a model maps is a cover of the scene, classes or values), then ``outputs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from gpu_worker.analysis.models import NODATA_CLASS, ModelRegistry
from gpu_worker.analysis.outputs import COG_CONTENT_TYPE, RasterSink
from gpu_worker.analysis.raster import SceneReader
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest
from gpu_worker.analysis.validity import no_valid_pixels


class ModelAnalysis:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def run(self, name: str, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        model = self.registry.get(name)  # UnknownAnalysis before the image is even opened
        m = model.manifest
        classes = m.output_kind != "regression"
        progress = request.progress
        progress("decode", 0.0)
        with SceneReader(
            request.source or image_path, request.bands, request.scale, self.registry.device, required=()
        ) as scene:
            indices = model.band_indices(scene.bands)
            pixels = scene.width * scene.height
            if not scene.holds_data(Window(0, 0, scene.width, scene.height), indices):  # a sparse file, none written
                raise no_valid_pixels(pixels, pixels, 0, request.scale, bands="the model's input bands")

            def read_window(window: Window) -> torch.Tensor:
                block = scene.read(window, indices)
                return torch.where(block.valid, block.values, float("nan")).float()

            key = "class_map_cog" if classes else "model_output_cog"
            sink = RasterSink(
                workdir / ("class_map.tif" if classes else "model_output.tif"),
                scene.grid(),
                count=1 if classes else len(m.class_names),
                dtype="uint8" if classes else "float32",
                nodata=NODATA_CLASS if classes else float(np.nan),
                overview_resampling="mode" if classes else "average",
                descriptions=("class id",) if classes else tuple(m.class_names),
            )
            with sink:
                run = model.tiled(read_window, scene.width, scene.height)
                done = 0
                for window, values in run:
                    progress("cover", done / pixels)  # a model's map is a cover of the scene
                    sink.write(window, values)
                    done += window.width * window.height
                if run.valid_pixels == 0:
                    raise no_valid_pixels(pixels, 0, 0, request.scale, bands="the model's input bands")
                progress("outputs", 0.0)
                path = sink.finish()
            result: dict[str, Any] = {
                "analysis": request.analysis,
                "scene": scene.describe(),
                "valid_fraction": run.valid_pixels / (scene.width * scene.height),
                "model": {
                    "name": m.name,
                    "version": m.version,
                    "output_kind": m.output_kind,
                    "class_names": list(m.class_names),
                },
                "class_histogram": run.histogram() if classes else None,
                "means": None if classes else run.means(),
                "model_version": f"{m.name}/{m.version}",
            }
        return AnalysisOutput(result=result, files={key: (path, COG_CONTENT_TYPE)})
