"""Crop-health analysis of multispectral GeoTIFFs with torch, on one device (CUDA when present, else CPU).

    Analyzer(device, models_dir).analyse(image_path, AnalysisRequest(...), workdir) -> AnalysisOutput

Raises :class:`shared.errors.InvalidImage` for unreadable files or unusable bands and
:class:`shared.errors.UnknownAnalysis` for an unknown analysis; both are permanent.
"""

from gpu_worker.analysis.analyzer import Analyzer
from gpu_worker.analysis.device import select_device
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest

__all__ = ["AnalysisOutput", "AnalysisRequest", "Analyzer", "select_device"]
