"""What the worker asks of the analysis, and what it gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.fields import Fields

Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """The default :attr:`AnalysisRequest.progress`: nobody tracks this run."""


@dataclass(frozen=True)
class AnalysisRequest:
    """``analysis`` is ``"crop-health"`` or ``"model:<name>"``; ``bands`` are the file's band names in order
    (empty: use the file's band descriptions); reflectance = DN / ``scale``.

    ``progress(stage, fraction)`` is called as the run goes: each stage as it starts (``decode``, ``cloud_mask``,
    ``indices``, ``cover``, ``outputs``; a stage the scene does not need is skipped) and per window within the long
    ones. It is the worker's checkpoint (:mod:`gpu_worker.progress`): it may raise to stop the run (a cancellation),
    and the analysis lets that through, cleaning up after itself.

    ``fields``: field boundaries (``Fields.from_params(job.params["fields"])``): crop-health then reads only the
    windows covering them and reports statistics per field instead of the whole scene's (docs/analysis.md)."""

    analysis: str
    bands: list[str]
    scale: float
    progress: Progress = field(default=no_progress, compare=False, repr=False)
    fields: Fields | None = None


@dataclass
class AnalysisOutput:
    """``result`` is the result JSON (without the ``outputs`` URLs, which the worker adds after uploading);
    ``files`` maps an output key (``ndvi_cog``, ``quicklook_png``, ...) to (local file, content type)."""

    result: dict[str, Any]
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
