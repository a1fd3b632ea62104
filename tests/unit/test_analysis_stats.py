"""Streaming statistics: exact mean / std across windows, histogram percentiles within their documented bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.analysis.stats import FINE_BINS, StreamingStats, Summary, float_keys, key_values


def feed(values: np.ndarray, lo: float, hi: float, chunks: int = 7, exact_limit: int = 0) -> StreamingStats:
    """``exact_limit`` 0: every value goes through the histograms (the path of a large scene)."""
    stats = StreamingStats(lo, hi, torch.device("cpu"), exact_limit=exact_limit)
    for part in np.array_split(values, chunks):
        x = torch.from_numpy(part)
        stats.update(x, torch.isfinite(x))
    return stats


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [("normal", -1.0, 1.0), ("uniform", -1.0, 1.0), ("cauchy", -4.0, 4.0), ("constant", -1.0, 1.0)],
)
def test_against_numpy(name: str, lo: float, hi: float) -> None:
    rng = np.random.default_rng(42)
    values = {
        "normal": rng.normal(0.4, 0.2, 200_000),
        "uniform": rng.uniform(-1, 1, 200_000),
        "cauchy": rng.standard_cauchy(200_000),  # most values outside [-4, 4] land in the coarse histogram
        "constant": np.full(1000, 0.25),
    }[name].astype(np.float32)
    summary = feed(values, lo, hi).summary()
    assert summary is not None
    ref = values.astype(np.float64)
    assert summary.count == ref.size
    assert summary.mean == pytest.approx(ref.mean(), rel=1e-12, abs=1e-12)
    assert summary.std == pytest.approx(ref.std(), rel=1e-9, abs=1e-12)
    bin_width = (hi - lo) / FINE_BINS
    for got, q in zip((summary.p10, summary.p50, summary.p90), (10, 50, 90), strict=True):
        exact = float(np.percentile(ref, q))
        bound = bin_width if lo <= exact <= hi else abs(exact) * 2**-7
        assert abs(got - exact) <= bound, (q, got, exact)


@pytest.mark.parametrize("split", [0, 3, 7])
def test_small_accumulators_give_numpys_exact_percentiles_and_merge_past_the_limit(split: int) -> None:
    rng = np.random.default_rng(7)
    values = rng.normal(0.4, 0.3, 5000).astype(np.float32)
    small = feed(values, -1.0, 1.0, exact_limit=len(values)).summary()
    assert small is not None
    exact = np.percentile(values.astype(np.float64), [10, 50, 90])
    assert [small.p10, small.p50, small.p90] == pytest.approx(exact, rel=1e-12, abs=1e-12)
    # Two halves that fit their limit separately but not together: the merge goes through the histograms.
    a = feed(values[: split * 500], -1.0, 1.0, chunks=2, exact_limit=len(values) - 1)
    b = feed(values[split * 500 :], -1.0, 1.0, chunks=2, exact_limit=len(values) - 1)
    merged = a.merge(b).summary()
    assert merged is not None
    assert merged.count == len(values)
    assert merged.mean == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-12)
    for got, ref in zip((merged.p10, merged.p50, merged.p90), exact, strict=True):
        assert abs(got - ref) <= 2 / FINE_BINS


def test_masked_values_and_nans_are_ignored() -> None:
    stats = StreamingStats(-1.0, 1.0, torch.device("cpu"))
    x = torch.tensor([0.1, float("nan"), 0.3, float("inf"), 5.0], dtype=torch.float64)
    stats.update(x, torch.tensor([True, False, True, False, False]))
    summary = stats.summary()
    assert summary is not None
    assert summary.count == 2
    assert summary.mean == pytest.approx(0.2)
    assert summary.p50 == pytest.approx(0.2, abs=1e-5)


def test_no_values_gives_none() -> None:
    stats = StreamingStats(-1.0, 1.0, torch.device("cpu"))
    stats.update(torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    assert stats.summary() is None


def test_float_keys_preserve_order_and_invert() -> None:
    values = np.array([-np.inf, -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 3e38, np.inf], dtype=np.float32)
    keys = float_keys(torch.from_numpy(values)).numpy()
    assert (np.diff(keys) > 0).all()
    np.testing.assert_array_equal(key_values(keys), values.astype(np.float64))


def _percentiles(summary: Summary | None) -> tuple[int, float, float, float, float]:
    assert summary is not None
    return summary.count, summary.std, summary.p10, summary.p50, summary.p90


@pytest.mark.parametrize("exact_limit", [0, 10**6])
def test_a_merge_with_an_empty_side_shares_the_other_and_gives_its_statistics(exact_limit: int) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_cauchy(50_000).astype(np.float32)  # values outside [-1, 1]: the coarse histogram too
    full = feed(values, -1.0, 1.0, exact_limit=exact_limit)
    empty = StreamingStats(-1.0, 1.0, torch.device("cpu"), exact_limit=exact_limit)
    empty.update(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    for merged in (full.merge(empty), empty.merge(full)):
        assert merged._hist is full._hist  # shared, not copied (None: the values are kept, not binned)
        got, want = merged.summary(), full.summary()
        assert _percentiles(got) == _percentiles(want)
        assert got is not None
        assert want is not None
        assert got.mean == pytest.approx(want.mean, rel=1e-15)  # Chan's update from 0: n * mean / n


def test_histograms_are_never_changed_in_place() -> None:
    """A merge shares its sides' histograms: adding to a side afterwards must leave the merge as it was."""
    rng = np.random.default_rng(5)
    a = feed(rng.normal(0.4, 0.2, 20_000).astype(np.float32), -1.0, 1.0)
    b = StreamingStats(-1.0, 1.0, torch.device("cpu"), exact_limit=0)
    merged = a.merge(b)
    before = merged.summary()
    x = torch.from_numpy(rng.normal(-0.5, 3.0, 20_000).astype(np.float32))
    a.update(x, torch.ones_like(x, dtype=torch.bool))
    assert merged.summary() == before
    assert a.summary() != before


def test_values_outside_the_range_only_in_some_updates() -> None:
    """The coarse histogram starts with the first update that has a value outside ``[lo, hi]``; before and after,
    the result is the same as numpy's within the documented bound."""
    rng = np.random.default_rng(11)
    inside = rng.uniform(-0.9, 0.9, 30_000)
    outside = rng.uniform(2.0, 50.0, 3_000)
    parts = [inside[:10_000], np.concatenate([inside[10_000:20_000], outside]), inside[20_000:]]
    stats = StreamingStats(-1.0, 1.0, torch.device("cpu"), exact_limit=0)
    for part in parts:
        x = torch.from_numpy(part.astype(np.float32))
        stats.update(x, torch.ones_like(x, dtype=torch.bool))
    summary = stats.summary()
    assert summary is not None
    ref = np.concatenate(parts).astype(np.float32).astype(np.float64)
    assert summary.count == ref.size
    for got, q in zip((summary.p10, summary.p50, summary.p90), (10, 50, 90), strict=True):
        exact = float(np.percentile(ref, q))
        bound = 2 / FINE_BINS if -1 <= exact <= 1 else abs(exact) * 2**-7
        assert abs(got - exact) <= bound, (q, got, exact)
