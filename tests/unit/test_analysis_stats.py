"""Streaming statistics: exact mean / std across windows, histogram percentiles within their documented bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu_worker.analysis.stats import FINE_BINS, StreamingStats, float_keys, key_values


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
