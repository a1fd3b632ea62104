"""The entry point the worker calls: one :class:`Analyzer` per process, dispatching on the requested analysis."""

from __future__ import annotations

from pathlib import Path

import rasterio
import rasterio.env
import torch

from gpu_worker.analysis.crop_health import CropHealth
from gpu_worker.analysis.model_analysis import ModelAnalysis
from gpu_worker.analysis.models import ModelRegistry, model_name
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest
from shared.errors import UnknownAnalysis

# GDAL's block cache defaults to 5 % of RAM; a fixed size keeps the worker's memory independent of the machine.
# rasterio hands an int to GDALSetCacheMax64, which takes *bytes* (256 alone would be a 256-byte cache). The cache is
# one per process, so it is set once, not per analysis: a rasterio.Env that sets it puts the default back as it
# exits, under any analysis still running in another thread (WORKER_ANALYSES above 1).
GDAL_CACHE_BYTES = 256 * 1024 * 1024


class Analyzer:
    """Loads what the analyses need once (cloud detector, cover model, every model manifest in ``models_dir``:
    an invalid manifest raises :class:`gpu_worker.analysis.models.ManifestError` here, at worker start).
    ``analyse`` raises InvalidImage / UnknownAnalysis (permanent errors) and never touches Azure."""

    def __init__(
        self,
        device: torch.device,
        models_dir: Path | None = None,
        *,
        threads: int | None = None,
        batching: bool | None = None,
        precision: torch.dtype | None = None,
    ) -> None:
        """``threads``: CPU threads for torch, LightGBM and GDAL's block decoding (``Settings.analysis_threads``);
        None leaves each library's default (all cores), which is right for one process alone on a machine.
        ``batching``: the cover MLP through the process's dynamic batcher, shared by the scenes analysed at once
        (``ANALYSIS_BATCHING``; None: on CUDA only). ``precision``: the cover MLP in bfloat16 or float16 under
        autocast (``ANALYSIS_MIXED_PRECISION``; None: float32, exact)."""
        self.device = device
        self.models_dir = models_dir
        self.threads = threads
        if threads is not None:
            torch.set_num_threads(threads)
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)
        self._crop_health = CropHealth(device, threads=threads, cover_batching=batching, cover_precision=precision)
        self._models = ModelAnalysis(ModelRegistry(models_dir, device))

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        gdal_threads = self.threads if self.threads is not None else "ALL_CPUS"
        # A config option: rasterio sets it for this thread (process-wide in the main thread, where an Env's exit also
        # unsets it for threads that have no setting of their own: the COG copies set theirs, products.py).
        with rasterio.Env(GDAL_NUM_THREADS=gdal_threads):
            return self._dispatch(image_path, request, workdir)

    def _dispatch(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        if request.analysis == "crop-health":
            return self._crop_health.run(image_path, request, workdir)
        name = model_name(request.analysis)
        if name is not None and request.fields is not None:
            raise UnknownAnalysis(f"per-field statistics are a crop-health analysis, not {request.analysis!r}")
        if name is not None:
            return self._models.run(name, image_path, request, workdir)
        raise UnknownAnalysis(f"unknown analysis {request.analysis!r}: use crop-health or model:<name>")
