"""The entry point the worker calls: one :class:`Analyzer` per process, dispatching on the requested analysis."""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_worker.analysis.crop_health import CropHealth
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest
from shared.errors import UnknownAnalysis

MODEL_PREFIX = "model:"


class Analyzer:
    """Loads what the analyses need once; ``analyse`` raises InvalidImage / UnknownAnalysis (permanent errors)
    and never touches Azure."""

    def __init__(self, device: torch.device, models_dir: Path | None = None) -> None:
        self.device = device
        self.models_dir = models_dir
        self._crop_health = CropHealth(device)

    def analyse(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        if request.analysis == "crop-health":
            return self._crop_health.run(image_path, request, workdir)
        if request.analysis.startswith(MODEL_PREFIX):
            raise UnknownAnalysis(f"no model named {request.analysis[len(MODEL_PREFIX) :]!r} is installed")
        raise UnknownAnalysis(f"unknown analysis {request.analysis!r}: use crop-health or model:<name>")
