"""The crop-health analysis: indices, cloud mask, water / vegetation fractions, fractional cover, COG and PNG
outputs, window by window.

Pass 1 (only when the bands allow a cloud mask) builds the coarse s2cloudless mask (:mod:`cloud_sources`); it
decodes pass 2's bands in the same reads, so that a scene that fits GDAL's block cache is decoded once. Pass 2
reads ``window`` x ``window`` pixels of the bands in use, computes everything per pixel on the device, adds it to
the :class:`SceneSummary` and writes the output rasters; the COGs are then copied while the quicklook is rendered
(:mod:`products`). Progress (``AnalysisRequest.progress``): ``decode`` (the
file opened, bands resolved), ``cloud_mask`` per pass-1 window, ``indices`` and ``cover`` per pass-2 window (both in
the same window loop), ``outputs`` per COG and for the quicklook. Memory is bounded by the window size, not the scene: a
full 10980 x 10980 Sentinel-2 tile streams through the same code (bench/analysis.py --full-tile measures it).
Result keys are defined in :mod:`gpu_worker.analysis.summary`; a scene without one valid pixel raises
:class:`shared.errors.NoValidPixels` before any output is finished (:mod:`gpu_worker.analysis.validity`). Windows the
file leaves empty (sparse blocks, :meth:`SceneReader.holds_data`) are skipped in both passes.

The next window is decoded while the current one is computed (:meth:`SceneReader.blocks`). The cover MLP of a window
is written one window later: on CUDA its clear land pixels go to a :class:`~gpu_worker.analysis.batcher.
DynamicBatcher` shared by every analysis of the process, so the GPU runs the MLP while the next window's indices are
computed, and windows (of one scene, or of scenes analysed at the same time) share batches. Elsewhere the MLP runs at
once, unless ``cover_batching`` asks for the batcher (the tests do, on the CPU: the results are the same).
``cover_precision`` (``ANALYSIS_MIXED_PRECISION``) runs the MLP under ``torch.autocast`` in bfloat16 or float16, either
way: faster (bfloat16 on an AVX-512 BF16 CPU: 9.9 -> 20.4 Mpx/s), within the tolerance the batcher's docstring
measures (bfloat16: fractions within 0.0065 on farmland, 0.023 on sea; one percentage point in the cover COG for 18 %
of pixels). Off by default: the results then equal the float32 ones.

With field boundaries (``AnalysisRequest.fields``) the same pass runs over the windows covering the fields
(:mod:`placement`), with a :class:`SceneSummary` per field fed the pixels inside it, and the outputs are a clip per
field (:mod:`products`); pass 1 reads only the cloud cells the fields' mask depends on.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rasterio.windows import Window

from gpu_worker.analysis import cloudmask
from gpu_worker.analysis.batcher import DynamicBatcher, default_max_rows
from gpu_worker.analysis.cloud_sources import CloudSource, cloud_source
from gpu_worker.analysis.cover import CAVEAT, FRACTIONS, USED, FractionalCover, band_indices
from gpu_worker.analysis.indices import INDICES, compute
from gpu_worker.analysis.placement import FieldPart, Placement
from gpu_worker.analysis.products import MASK_NODATA, FieldClips, SceneProducts
from gpu_worker.analysis.raster import SceneReader, every_band, gdal_errors_as_invalid_image
from gpu_worker.analysis.request import AnalysisOutput, AnalysisRequest, Progress
from gpu_worker.analysis.summary import SceneSummary
from gpu_worker.analysis.targets import Tally, Target, check_valid, field_result
from shared.bands import BandSet

log = logging.getLogger(__name__)

VERSION = "crop-health/2"
DEFAULT_WINDOW = 1024
INDEX_ROLES = ("blue", "green", "red", "nir")
COVER_MAX_WAIT = 0.005  # seconds a cover batch waits for more rows (the next window, another scene) before it runs


@dataclass(frozen=True)
class _CoverWork:
    """One window's cover: its pixels handed to the MLP, the fractions ([P, 3]) still to come."""

    window: Window  # on the scene's grid
    parts: list[FieldPart]
    counted: torch.Tensor
    at: torch.Tensor  # the counted pixels' flat positions in the window, row-major: the order of the fractions
    shares: list[tuple[int, torch.Tensor | None]]  # (summary, positions of its pixels among counted; None: all)
    fractions: Future[torch.Tensor]


_Share = tuple[int, slice, slice, torch.Tensor | None]  # a part: summary, rows, columns, mask (None: all of them)


def _shares(counted: torch.Tensor, parts: list[_Share]) -> list[tuple[int, torch.Tensor | None]]:
    """Each part's counted pixels as positions among the window's counted pixels (the order of the fractions);
    memory in proportion to the parts, not to the window times the fields."""
    if all(mask is None for *_, mask in parts):
        return [(index, None) for index, *_ in parts]
    order = counted.flatten().cumsum(0).view(counted.shape) - 1
    return [(index, None if mask is None else order[r, c][counted[r, c] & mask]) for index, r, c, mask in parts]


def _pass_bands(bands: BandSet) -> list[int]:
    """The 0-based bands pass 2 reads: those of the index roles and of the cover model."""
    roles = [r for r in INDEX_ROLES if bands.has(r)]
    return sorted({bands.index(r) for r in roles} | set(band_indices(bands) or []))


def _bands(values: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """``values[channels]``: a view when the channels are consecutive (they usually are), not a copy."""
    first = channels[0]
    if channels == list(range(first, first + len(channels))):
        return values[first : first + len(channels)]
    return values[channels]


def _within(index: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An index's (values, mask), its mask narrowed to the valid pixels."""
    return index[0], index[1] & valid


class CropHealth:
    """Holds the loaded models (cloud detector, fractional cover); ``run`` is one scene."""

    def __init__(
        self,
        device: torch.device,
        window: int = DEFAULT_WINDOW,
        *,
        threads: int | None = None,
        cover_batching: bool | None = None,
        cover_precision: torch.dtype | None = None,
    ) -> None:
        """``cover_batching``: run the cover MLP through a :class:`DynamicBatcher` (default: on CUDA only);
        ``cover_precision``: the MLP under ``torch.autocast`` in that dtype (default: float32, exact)."""
        self._precision = cover_precision
        self.device, self.window = device, window
        self.detector = cloudmask.CloudDetector(threads=threads)
        self.cover = FractionalCover.load(device)
        self.model_version = f"{VERSION}; {cloudmask.VERSION}; {FractionalCover.VERSION}"
        batching = device.type == "cuda" if cover_batching is None else cover_batching
        self._batcher = (
            DynamicBatcher(
                self._cover_rows,
                max_rows=default_max_rows(device),
                max_wait=COVER_MAX_WAIT,
                device=device,
                name="cover",
                out_features=len(FRACTIONS),
                autocast=cover_precision,
            )
            if batching
            else None
        )

    def _mixed_precision(self) -> contextlib.AbstractContextManager[object]:
        if self._precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._precision)

    def _cover_rows(self, pixels: torch.Tensor) -> torch.Tensor:
        """[P, 5] -> [P, 3]: the batcher's rows through :meth:`FractionalCover.fractions` (channel-first)."""
        return self.cover.fractions(pixels.t()).t()

    def run(self, image_path: Path, request: AnalysisRequest, workdir: Path) -> AnalysisOutput:
        progress = request.progress
        progress("decode", 0.0)
        outlines: list[list[tuple[float, float]]] = []
        with SceneReader(request.source or image_path, request.bands, request.scale, self.device) as scene:
            along = _pass_bands(scene.bands)  # decoded with pass 1's bands: see S2CloudMask
            if request.fields is None:
                target = Target.whole(scene, self.window)
                clouds = cloud_source(scene, self.detector, progress, along=along)
            else:
                placement = Placement(request.fields, scene)
                target = Target.of_fields(scene, placement, self.window)
                clouds = cloud_source(scene, self.detector, progress, region=placement.boxes, along=along)
                outlines = placement.outlines(target.region)
            stats, pixels, products = self._pass(scene, clouds, target, workdir, progress, outlines)
            result: dict[str, Any] = {"analysis": "crop-health", "scene": scene.describe()}
            if request.fields is None:
                result |= stats[0]
            else:
                region = target.region
                result["fields_window"] = [region.col_off, region.row_off, region.width, region.height]
                keys = products.keys() if isinstance(products, FieldClips) else []
                result["fields"] = [
                    field_result(f, n, s, key) for f, n, s, key in zip(request.fields, pixels, stats, keys, strict=True)
                ]
        result["cloud_mask"] = clouds.describe() if clouds else None
        has_cover = any(s["cover"] is not None for s in stats)
        result["cover_note"] = CAVEAT if has_cover else None
        result["model_version"] = self.model_version
        files = dict(products.files)  # the COGs, then the quicklook
        log.info("crop-health analysed %s", image_path.name, extra={"action": "analyse"})
        return AnalysisOutput(result=result, files=files)

    def _pass(
        self,
        scene: SceneReader,
        clouds: CloudSource | None,
        target: Target,
        workdir: Path,
        progress: Progress,
        outlines: list[list[tuple[float, float]]],
    ) -> tuple[list[dict[str, Any]], list[int], SceneProducts | FieldClips]:
        """Statistics per summary (the scene's, or each field's), pixels per summary, the finished products (the
        quicklook with ``outlines`` drawn on it among them)."""
        specs = [s for s in INDICES if scene.bands.has(*s.roles)]  # NDVI first: red and NIR are always there
        cover_indices = band_indices(scene.bands)
        roles = [r for r in INDEX_ROLES if scene.bands.has(r)]
        wide_roles = sorted({r for s in specs if s.float64 for r in s.roles})  # float64 indices' bands
        read = _pass_bands(scene.bands)
        position = {file_index: j for j, file_index in enumerate(read)}
        summaries = [SceneSummary(specs, clouds is not None, self.device) for _ in range(target.count)]
        # A window whose red and NIR blocks are all left out of the file (sparse) has no valid pixel: skipped, its
        # outputs stay nodata (unwritten tiles read as nodata), and the outputs are sparse too (outputs.py).
        red_nir = [scene.bands.index("red"), scene.bands.index("nir")]
        kept = [scene.holds_data(w, red_nir) for w in target.windows]
        windows = [w for w, keep in zip(target.windows, kept, strict=True) if keep]
        sparse = len(windows) < len(target.windows) or target.partial
        products: SceneProducts | FieldClips
        if target.placement is None:
            products = SceneProducts(target.grid(scene), workdir, clouds=clouds is not None,
                                     cover=cover_indices is not None, sparse=sparse)  # fmt: skip
        else:
            products = FieldClips(target.placement, scene.grid(), workdir, target.region)
        pending: _CoverWork | None = None  # the previous window's cover, written after this window's indices
        tally = Tally([0] * target.count, torch.zeros((), dtype=torch.int64, device=self.device))

        def quicklook() -> Path:
            with gdal_errors_as_invalid_image("cannot render the quicklook"):
                return products.quicklook(workdir / "quicklook.png", outlines)

        try:
            for window in (w for w, keep in zip(target.windows, kept, strict=True) if not keep):
                tally.count(target.parts(window), window, skipped=True)
            for i, (window, block) in enumerate(zip(windows, scene.blocks(windows, read), strict=True)):
                progress("indices", i / len(windows))
                at = {r: position[scene.bands.index(r)] for r in roles}
                bands = {r: block.values[at[r]] for r in roles}
                exact = {r: block.exact(at[r]) for r in wide_roles}
                valid = {r: block.valid[at[r]] for r in roles}
                parts = target.parts(window)
                union = tally.count(parts, window, skipped=False)
                union_t = None if union is None else torch.from_numpy(union).to(self.device)
                measured = valid["red"] & valid["nir"]
                tally.present += (measured if union_t is None else measured & union_t).sum()
                ndvi, base = compute(specs[0], bands, valid)  # a valid pixel: NDVI defined (validity.py)
                base = base if union_t is None else base & union_t
                cloud = clouds.window(window) if clouds else torch.zeros_like(base)
                index_values = {"ndvi": (ndvi, base)} | {
                    s.name: _within(compute(s, exact if s.float64 else bands, valid), base) for s in specs[1:]
                }
                land, shares = self._add_parts(parts, summaries, base, cloud, index_values)
                ndvi_out = torch.where(base, ndvi, float("nan")).float().cpu().numpy()
                mask = None
                if clouds is not None:
                    mask = torch.where(base, cloud.to(torch.uint8), MASK_NODATA).to(torch.uint8).cpu().numpy()
                products.write_indices(window, parts, ndvi_out, mask)
                if cover_indices is not None:
                    progress("cover", i / len(windows))
                    work = self._submit_cover(window, parts, block.values, block.valid,
                                              [position[c] for c in cover_indices], land, shares)  # fmt: skip
                    if pending is not None:
                        self._write_cover(pending, summaries, products)
                    pending = work
            if pending is not None:
                self._write_cover(pending, summaries, products)
            check_valid(target, tally, summaries, scene.scale)
            products.finish(progress, quicklook)
        except BaseException:
            products.discard()
            raise
        has_green, has_cover = scene.bands.has("green"), cover_indices is not None
        stats = [s.result(n, has_green, has_cover) for s, n in zip(summaries, tally.pixels, strict=True)]
        return stats, tally.pixels, products

    def _add_parts(
        self,
        parts: list[FieldPart],
        summaries: list[SceneSummary],
        base: torch.Tensor,
        cloud: torch.Tensor,
        index_values: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[_Share]]:
        """Add each part's pixels to its summary. Returns the window's land mask (in any part) and each part with
        its mask on the device, which the cover step needs."""
        land = torch.zeros_like(base)
        shares: list[_Share] = []
        for part in parts:
            r, c = part.rows, part.cols
            if part.mask is None:
                whole_values = {k: (v[r, c], ok[r, c]) for k, (v, ok) in index_values.items()}
                land[r, c] |= summaries[part.index].add(base[r, c], cloud[r, c], whole_values)
                shares.append((part.index, r, c, None))
                continue
            m = torch.from_numpy(part.mask).to(self.device)
            part_values = {k: (v[r, c], ok[r, c] & m) for k, (v, ok) in index_values.items()}
            land[r, c] |= summaries[part.index].add(base[r, c] & m, cloud[r, c], part_values)
            shares.append((part.index, r, c, m))
        return land, shares

    def _submit_cover(
        self,
        window: Window,
        field_parts: list[FieldPart],
        values: torch.Tensor,
        valid: torch.Tensor,
        channels: list[int],
        land: torch.Tensor,
        parts: list[_Share],
    ) -> _CoverWork:
        counted = land & every_band(_bands(valid, channels))
        # Only clear land pixels go through the MLP, channel-first. Gathered by position (index_select), which
        # ran 4x faster than a boolean mask here; the order is the same (row-major).
        at = counted.flatten().nonzero().squeeze(1)
        pixels = _bands(values, channels[USED]).flatten(1).index_select(1, at)
        shares = _shares(counted, parts)
        if self._batcher is not None:
            return _CoverWork(window, field_parts, counted, at, shares, self._batcher.submit(pixels.t()))
        done: Future[torch.Tensor] = Future()
        with torch.inference_mode(), self._mixed_precision():
            done.set_result(self.cover.fractions(pixels).t().float())
        return _CoverWork(window, field_parts, counted, at, shares, done)

    @staticmethod
    def _write_cover(work: _CoverWork, summaries: list[SceneSummary], products: SceneProducts | FieldClips) -> None:
        fractions = work.fractions.result().t()  # [3, P]
        for index, positions in work.shares:  # each part's share of the window's counted pixels
            if positions is None:
                summaries[index].add_cover(fractions, work.at.numel())
            else:
                summaries[index].add_cover(fractions[:, positions], positions.numel())
        counted = work.counted
        percent = torch.full((len(FRACTIONS), counted.numel()), MASK_NODATA, dtype=torch.uint8, device=counted.device)
        percent.index_copy_(1, work.at, fractions.mul(100).round_().to(torch.uint8))
        products.write_cover(work.window, work.parts, percent.view(len(FRACTIONS), *counted.shape).cpu().numpy())
