"""Scene-level results accumulated window by window: index statistics, cloud / water / vegetation fractions and
mean fractional cover. Every count stays on the device until :meth:`SceneSummary.result`.

Definitions (all over valid pixels: red and NIR not nodata and finite, NDVI defined; see :mod:`validity`):

* ``cloud_fraction`` / ``clear_fraction``: cloudy / clear share (null without a cloud mask);
* ``water_fraction``: NDWI (McFeeters) > 0 among clear pixels with a valid NDWI (null without green);
* land = clear and not water; ``vegetation_fraction``: NDVI > 0.3 among land pixels with a valid NDVI;
* ``cover``: mean bare / green / non-green fraction over land pixels where the cover model has all its bands.

``indices`` are over all valid pixels (cloudy or not); ``indices_clear`` over clear pixels only.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_worker.analysis.cover import FRACTIONS
from gpu_worker.analysis.indices import INDICES, IndexSpec
from gpu_worker.analysis.stats import StreamingStats

VEGETATION_NDVI = 0.3
WATER_NDWI = 0.0
COUNTERS = ("valid", "cloudy", "ndwi_clear", "water", "ndvi_land", "vegetation", "cover")


class SceneSummary:
    def __init__(self, specs: list[IndexSpec], has_cloud_mask: bool, device: torch.device) -> None:
        self.specs, self.has_cloud_mask = specs, has_cloud_mask
        # Each pixel is added once, to the clear or the cloudy accumulator; ``indices`` merges the two at the end.
        self.clear = {s.name: StreamingStats(*s.histogram_range, device) for s in specs}
        self.cloudy = {s.name: StreamingStats(*s.histogram_range, device) for s in specs}
        self.counts = {name: torch.zeros((), dtype=torch.int64, device=device) for name in COUNTERS}
        self.cover_sums = torch.zeros(len(FRACTIONS), dtype=torch.float64, device=device)

    def add(
        self,
        base: torch.Tensor,
        cloud: torch.Tensor,
        index_values: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Add one window; returns its land mask (clear, not water), which the cover step needs (read it only: it
        may be ``base`` itself).

        ``base``: the valid pixels (NDVI defined); ``cloud``: cloudy (all False without a mask); ``index_values``:
        name -> (values, mask) from :func:`gpu_worker.analysis.indices.compute`."""
        c = self.counts
        c["valid"] += base.sum()
        # A window without a cloud (most, and every one without a mask) has nothing to mask out or to add as cloudy.
        cloudy = bool(cloud.any())
        clear = base & ~cloud if cloudy else base
        if cloudy:
            c["cloudy"] += (base & cloud).sum()
        for name, (values, mask) in index_values.items():
            self.clear[name].update(values, mask & ~cloud if cloudy else mask)
            if self.has_cloud_mask and cloudy:
                self.cloudy[name].update(values, mask & cloud)
        land = clear
        if "ndwi" in index_values:
            ndwi, ndwi_ok = index_values["ndwi"]
            water = clear & ndwi_ok & (ndwi > WATER_NDWI)
            c["ndwi_clear"] += (clear & ndwi_ok).sum()
            c["water"] += water.sum()
            land = clear & ~water
        ndvi, ndvi_ok = index_values["ndvi"]
        c["ndvi_land"] += (land & ndvi_ok).sum()
        c["vegetation"] += (land & ndvi_ok & (ndvi > VEGETATION_NDVI)).sum()
        return land

    def valid_pixels(self) -> int:
        """Valid pixels added so far (a device synchronisation)."""
        return int(self.counts["valid"].item())

    def add_cover(self, fractions: torch.Tensor, count: torch.Tensor | int) -> None:
        """[3, P] cover fractions of the ``count`` pixels where they count (land, all cover bands valid)."""
        self.counts["cover"] += count
        self.cover_sums += fractions.to(torch.float64).sum(dim=1)

    def result(self, pixels: int, has_green: bool, has_cover: bool) -> dict[str, Any]:
        n = {name: int(value.item()) for name, value in self.counts.items()}

        def share(part: str, whole: str) -> float | None:
            return n[part] / n[whole] if n[whole] else None

        cloud = share("cloudy", "valid") if self.has_cloud_mask else None
        cover = None
        if has_cover and n["cover"]:
            means = (self.cover_sums / n["cover"]).tolist()
            cover = {name: means[i] for i, name in enumerate(FRACTIONS)}
        return {
            "valid_fraction": n["valid"] / pixels if pixels else None,  # a field without one pixel centre
            "cloud_fraction": cloud,
            "clear_fraction": None if cloud is None else 1.0 - cloud,
            "water_fraction": share("water", "ndwi_clear") if has_green else None,
            "vegetation_fraction": share("vegetation", "ndvi_land"),
            "cover": cover,
            "indices": _summaries({name: s.merge(self.cloudy[name]) for name, s in self.clear.items()}),
            "indices_clear": _summaries(self.clear) if self.has_cloud_mask else None,
        }


def _summaries(stats: dict[str, StreamingStats]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in INDICES:
        summary = stats[spec.name].summary() if spec.name in stats else None
        out[spec.name] = summary.as_json() if summary else None
    return out
