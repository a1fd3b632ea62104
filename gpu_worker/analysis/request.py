"""What the worker asks of the analysis, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AnalysisRequest:
    """``analysis`` is ``"crop-health"`` or ``"model:<name>"``; ``bands`` are the file's band names in order
    (empty: use the file's band descriptions); reflectance = DN / ``scale``."""

    analysis: str
    bands: list[str]
    scale: float


@dataclass
class AnalysisOutput:
    """``result`` is the result JSON (without the ``outputs`` URLs, which the worker adds after uploading);
    ``files`` maps an output key (``ndvi_cog``, ``quicklook_png``, ...) to (local file, content type)."""

    result: dict[str, Any]
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
