"""Streaming statistics of a per-pixel quantity, window by window, in bounded memory, on the device.

Mean and standard deviation (population, like numpy's default) are merged exactly across windows in float64 with
Chan's parallel formula. Percentiles are exact (``numpy.percentile`` of the values themselves) while an accumulator
holds at most ``EXACT_LIMIT`` values: they are kept as they come, and a small scene never pays for histograms (the
fine histogram alone is 2 MB to clear and add per update: 27 % of a 128 x 128 job before). Past that the values
go into histograms, never sorted as a whole scene:

* a fine linear histogram of ``FINE_BINS`` bins over a fixed range ``[lo, hi]`` chosen per index (NDVI: [-1, 1]);
* a coarse histogram over the top 16 bits of the order-preserving float32 bit pattern for values outside the
  range (EVI can be anything when its denominator is near zero).

Histograms are never changed in place (binning more values makes new ones): a merge shares them, so merging with an
empty accumulator (the cloudy one of a cloud-free scene) copies nothing and their non-empty bins are found once.

A percentile is found by rank, interpolated linearly inside its bin (assuming values spread evenly in the bin),
then linearly between neighbouring ranks like ``numpy.percentile``'s default, and clamped to the exact min / max.
Error bound against the exact value: at most one bin width, i.e. ``(hi - lo) / FINE_BINS`` inside the range
(7.6e-6 for NDVI) and 2**-7 of the value's magnitude outside it; on real scenes it is typically ~1e-7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FINE_BINS = 1 << 18
EXACT_LIMIT = 1 << 18  # values per accumulator kept for exact percentiles (2 MB in float64)
COARSE_SHIFT = 16
COARSE_BINS = 1 << (32 - COARSE_SHIFT)
PERCENTILES = (10, 50, 90)


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of float32 values to int64 keys in [0, 2**32)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


def key_values(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys` (on the host), as float64."""
    k = keys.astype(np.uint64)
    bits = np.where(k >= 0x80000000, k - 0x80000000, 0xFFFFFFFF - k).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # NaN bit patterns: their bins are always empty
        return bits.view(np.float32).astype(np.float64)


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    std: float
    p10: float
    p50: float
    p90: float

    def as_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "p10": self.p10, "p50": self.p50, "p90": self.p90,
                "count": self.count}  # fmt: skip


class StreamingStats:
    """Accumulates masked values window by window (one device synchronisation per update, the masked count, and one
    more when the values are binned: how many fell outside the fine histogram's range)."""

    def __init__(self, lo: float, hi: float, device: torch.device, exact_limit: int = EXACT_LIMIT) -> None:
        self.lo, self.hi = lo, hi
        self._scale = FINE_BINS / (hi - lo)
        self._device, self._exact_limit = device, exact_limit
        f64 = torch.float64
        self._n = torch.zeros((), dtype=f64, device=device)
        self._mean = torch.zeros((), dtype=f64, device=device)
        self._m2 = torch.zeros((), dtype=f64, device=device)
        self._min = torch.full((), float("inf"), dtype=f64, device=device)
        self._max = torch.full((), float("-inf"), dtype=f64, device=device)
        self._kept: list[torch.Tensor] = []  # the values themselves, while there are at most exact_limit
        self._kept_count = 0
        self._hist: _Histograms | None = None  # once past exact_limit

    def update(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Add ``values[mask]`` (float32 or float64, any shape; masked-out entries may be NaN or inf)."""
        v = values.masked_select(mask).to(torch.float64)  # values[mask], 1.6x faster
        if v.numel() == 0:
            return
        n_b = torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device)
        mean_b = v.mean()
        deviation = v - mean_b
        lo, hi = torch.aminmax(v)
        self._merge(n_b, mean_b, deviation.mul_(deviation).sum(), lo, hi)  # the square in place: one array less
        self._add_values(v)

    def _add_values(self, v: torch.Tensor) -> None:
        if self._hist is None and self._kept_count + v.numel() <= self._exact_limit:
            self._kept.append(v)
            self._kept_count += v.numel()
            return
        for kept in self._kept:
            self._bin(kept)
        self._kept, self._kept_count = [], 0
        self._bin(v)

    def _bin(self, v: torch.Tensor) -> None:
        inside = (v >= self.lo).logical_and_(v <= self.hi)
        fine = v.sub(self.lo).mul_(self._scale).clamp_(0, FINE_BINS - 1).to(torch.int64)
        fine_counts = torch.bincount(fine.masked_fill_(~inside, FINE_BINS), minlength=FINE_BINS + 1)
        coarse_counts = None
        if int(fine_counts[FINE_BINS]):  # the values outside [lo, hi] (NaN among them) land in the last fine bin
            coarse = float_keys(v[~inside].to(torch.float32)) >> COARSE_SHIFT
            coarse_counts = torch.bincount(coarse, minlength=COARSE_BINS + 1)
        counts = _Histograms(self.lo, self.hi, fine_counts, coarse_counts)
        self._hist = counts if self._hist is None else self._hist + counts

    def merge(self, other: StreamingStats) -> StreamingStats:
        """A new accumulator holding both ``self``'s and ``other``'s values (same range)."""
        if (other.lo, other.hi) != (self.lo, self.hi):
            raise ValueError("cannot merge statistics with different histogram ranges")
        out = StreamingStats(self.lo, self.hi, self._device, min(self._exact_limit, other._exact_limit))
        parts = (self, other)
        for part in parts:
            out._merge(part._n, part._mean, part._m2, part._min, part._max)
        kept = self._kept_count + other._kept_count
        if self._hist is None and other._hist is None and kept <= out._exact_limit:
            out._kept, out._kept_count = [*self._kept, *other._kept], kept
            return out
        for part in parts:  # histograms are never changed in place: one side's alone is shared, not copied
            if part._hist is not None:
                out._hist = part._hist if out._hist is None else out._hist + part._hist
        for part in parts:
            for values in part._kept:
                out._bin(values)
        return out

    def _merge(
        self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> None:
        """Chan et al.'s parallel update of count, mean and sum of squared deviations."""
        n = self._n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * n_b / n.clamp(min=1.0)
        self._m2 = self._m2 + m2_b + delta * delta * self._n * n_b / n.clamp(min=1.0)
        self._n = n
        self._min = torch.minimum(self._min, lo)
        self._max = torch.maximum(self._max, hi)

    def summary(self) -> Summary | None:
        """The statistics, or None when no value was ever added."""
        count = int(self._n.item())
        if count == 0:
            return None
        mean = float(self._mean.item())
        std = float(np.sqrt(max(float(self._m2.item()) / count, 0.0)))
        if self._hist is None:
            exact = np.percentile(torch.cat(self._kept).cpu().numpy(), PERCENTILES)
            p = [float(v) for v in exact]
        else:
            counts, lower, upper = self._hist.bins()
            lo_v, hi_v = float(self._min.item()), float(self._max.item())
            p = [min(max(_percentile(counts, lower, upper, count, q), lo_v), hi_v) for q in PERCENTILES]
        return Summary(count=count, mean=mean, std=std, p10=p[0], p50=p[1], p90=p[2])


class _Histograms:
    """The fine histogram and the coarse one (None while no value fell outside ``[lo, hi]``) of an accumulator. Never
    changed once made (more values make new ones), so accumulators share them (:meth:`StreamingStats.merge`), and the
    non-empty bins are found once however many share them."""

    def __init__(self, lo: float, hi: float, fine: torch.Tensor, coarse: torch.Tensor | None) -> None:
        self.lo, self.hi, self.fine, self.coarse = lo, hi, fine, coarse
        self._bins: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __add__(self, other: _Histograms) -> _Histograms:
        coarse = (
            other.coarse if self.coarse is None else self.coarse if other.coarse is None else self.coarse + other.coarse
        )
        return _Histograms(self.lo, self.hi, self.fine + other.fine, coarse)

    def bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All non-empty bins in value order: counts, lower and upper value bounds."""
        if self._bins is None:
            self._bins = self._find_bins()
        return self._bins

    def _find_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fine = self.fine[:FINE_BINS].cpu().numpy()
        coarse = np.zeros(0, dtype=np.int64) if self.coarse is None else self.coarse[:COARSE_BINS].cpu().numpy()
        # Bounds of the non-empty bins only: the same values as every bin's bounds, kept where the count is not 0.
        f, c = np.flatnonzero(fine), np.flatnonzero(coarse)
        width = (self.hi - self.lo) / FINE_BINS
        fine_lower = self.lo + f * width
        keys = c.astype(np.uint64) << np.uint64(COARSE_SHIFT)
        coarse_lower = key_values(keys)
        coarse_upper = key_values(keys + np.uint64((1 << COARSE_SHIFT) - 1))
        below = coarse_upper < self.hi  # a coarse bin holds only out-of-range values: those below lo come first
        counts = np.concatenate([coarse[c][below], fine[f], coarse[c][~below]])
        lower = np.concatenate([coarse_lower[below], fine_lower, np.maximum(coarse_lower[~below], self.hi)])
        upper = np.concatenate([np.minimum(coarse_upper[below], self.lo), fine_lower + width, coarse_upper[~below]])
        return counts, lower, upper


def _percentile(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int, q: float) -> float:
    """numpy's linear percentile, with each order statistic estimated inside its bin."""
    cum = np.cumsum(counts)
    h = (n - 1) * q / 100.0
    r0 = int(np.floor(h))
    r1 = min(r0 + 1, n - 1)

    def order_statistic(rank: int) -> float:
        b = int(np.searchsorted(cum, rank, side="right"))
        before = cum[b] - counts[b]
        t = (rank - before + 0.5) / counts[b]
        return float(lower[b] + t * (upper[b] - lower[b]))

    v0 = order_statistic(r0)
    return v0 + (h - r0) * (order_statistic(r1) - v0)
