"""What the worker asks of the analysis, and what it gets back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.fields import Fields
from shared.ranged import RangeOpener

Progress = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """The default :attr:`AnalysisRequest.progress`: nobody tracks this run."""


@dataclass(frozen=True)
class Input:
    """An input by reference (:class:`shared.inputs.Reference`), which the analysis opens by ``path``: a
    ``/vsicurl`` GDAL path (a blob of the account's storage), or, with ``opener``, the name rasterio's opener serves
    (an outside ``image_url``, read in Python behind the SSRF guard: :mod:`shared.http_range`). ``size``: the file's
    size, as pinned with its ETag. A local file is given by its :class:`~pathlib.Path` alone."""

    path: Path
    size: int
    opener: RangeOpener | None = None


@dataclass(frozen=True)
class AnalysisRequest:
    """``analysis`` is ``"crop-health"`` or ``"model:<name>"``; ``bands`` are the file's band names in order
    (empty: use the file's band descriptions); reflectance = DN / ``scale``.

    ``progress(stage, fraction)`` is called as the run goes: each stage as it starts (``decode``, ``cloud_mask``,
    ``indices``, ``cover``, ``outputs``; a stage the scene does not need is skipped) and per window within the long
    ones. It is the worker's checkpoint (:mod:`gpu_worker.progress`): it may raise to stop the run (a cancellation),
    and the analysis lets that through, cleaning up after itself.

    ``fields``: field boundaries (``Fields.from_params(job.params["fields"])``): crop-health then reads only the
    windows covering them and reports statistics per field instead of the whole scene's (docs/analysis.md).

    ``source``: how to open the image when it is an input by reference (:class:`Input`), instead of the local file
    the analysis is given."""

    analysis: str
    bands: list[str]
    scale: float
    progress: Progress = field(default=no_progress, compare=False, repr=False)
    fields: Fields | None = None
    source: Input | None = field(default=None, compare=False)


@dataclass
class AnalysisOutput:
    """``result`` is the result JSON (without the ``outputs`` URLs, which the worker adds after uploading);
    ``files`` maps an output key (``ndvi_cog``, ``quicklook_png``, ...) to (local file, content type)."""

    result: dict[str, Any]
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
