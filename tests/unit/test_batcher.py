"""The dynamic batcher: per-request results equal unbatched calls of the real cover model; splitting, launch, errors
and close. No timed assertions: launches are observed through the calls ``fn`` receives, and ``result(timeout=...)``
only guards against a hang."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from gpu_worker.analysis.batcher import CPU_MAX_ROWS, DynamicBatcher, default_max_rows
from gpu_worker.analysis.cover import USED, FractionalCover

Tensor = torch.Tensor
CPU = torch.device("cpu")
FIELDS = Path(__file__).resolve().parents[1] / "data" / "s2_l1c_fields_256.tif"
S2_COVER_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
HANG = 30  # seconds: a guard against a hung test, never a measurement
ULP = 2.0**-22  # MKL's small-GEMM path (< 12 rows) differs by at most one float32 ulp at 1 (1.2e-7): two for margin


@pytest.fixture(scope="module")
def model() -> FractionalCover:
    return FractionalCover.load(CPU)


@pytest.fixture(scope="module")
def pixels() -> Tensor:
    """The 65,536 real pixels of the fields crop: [P, 5] used-band reflectance, as the cover MLP takes it."""
    with rasterio.open(FIELDS) as src:
        names = list(src.descriptions)
        stack = src.read([names.index(b) + 1 for b in S2_COVER_BANDS]).astype(np.float32) / 10000
    return torch.from_numpy(stack).reshape(len(S2_COVER_BANDS), -1).T[:, USED].contiguous()


class Recorder:
    """Wraps ``fn``: records the rows of every call; the first call waits for :meth:`release` when ``gated``."""

    def __init__(self, fn: Callable[[Tensor], Tensor], *, gated: bool = False) -> None:
        self.fn, self.sizes = fn, list[int]()
        self.started, self._open = threading.Event(), threading.Event()
        if not gated:
            self._open.set()

    def __call__(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        self.started.set()
        assert self._open.wait(HANG)
        return self.fn(x)

    def release(self) -> None:
        self._open.set()


def plug(batcher: DynamicBatcher, recorder: Recorder, features: int) -> Future[Tensor]:
    """A first request that holds the batcher thread inside ``fn`` until ``recorder.release()``."""
    future = batcher.submit(torch.full((1, features), 0.1))
    assert recorder.started.wait(HANG)
    return future


def double(x: Tensor) -> Tensor:
    return x * 2


@pytest.fixture
def gated() -> Iterator[tuple[DynamicBatcher, Recorder]]:
    recorder = Recorder(double, gated=True)
    with DynamicBatcher(recorder, max_rows=4, max_wait=0, device=CPU, name="t", out_features=2) as batcher:
        yield batcher, recorder
        recorder.release()


def test_concurrent_submissions_match_unbatched_calls(model: FractionalCover, pixels: Tensor) -> None:
    sizes = torch.randint(1, 6000, (4, 10), generator=torch.Generator().manual_seed(7)).tolist()
    sizes[0][:5] = [1, 5, 11, 12, 4097]
    starts = torch.randint(0, len(pixels) - 6000, (4, 10), generator=torch.Generator().manual_seed(8)).tolist()
    requests = [[pixels[a : a + n] for a, n in zip(s, z, strict=True)] for s, z in zip(starts, sizes, strict=True)]
    recorder = Recorder(model.predict_pixels)
    with DynamicBatcher(recorder, max_rows=4096, max_wait=0.002, device=CPU, name="cover", out_features=3) as batcher:

        def submit_all(xs: list[Tensor]) -> list[Future[Tensor]]:
            return [batcher.submit(x) for x in xs]

        with ThreadPoolExecutor(4) as pool:
            futures = [f for fs in pool.map(submit_all, requests) for f in fs]
        results = [f.result(HANG) for f in futures]
    assert max(recorder.sizes) == 4096
    assert sum(recorder.sizes) == sum(map(sum, sizes))
    with torch.inference_mode():
        for x, got in zip([x for xs in requests for x in xs], results, strict=True):
            torch.testing.assert_close(got, model.predict_pixels(x), rtol=0, atol=ULP)


def test_exactly_equal_when_requests_and_batches_have_twelve_rows_or_more(
    model: FractionalCover, pixels: Tensor
) -> None:
    """Rows split across batches and packed beside other requests come out bit for bit as an unbatched call."""
    recorder = Recorder(model.predict_pixels, gated=True)
    sizes = [12, 300, 999, 2500, 13, 40]  # 3,864 rows: batches of 1000, 1000, 1000, 864
    xs = [pixels[100 * i : 100 * i + n] for i, n in enumerate(sizes)]
    with DynamicBatcher(recorder, max_rows=1000, max_wait=0, device=CPU, name="cover", out_features=3) as batcher:
        plugged = plug(batcher, recorder, 5)
        futures = [batcher.submit(x) for x in xs]
        recorder.release()
        results = [f.result(HANG) for f in futures]
    assert plugged.result(HANG).shape == (1, 3)
    assert recorder.sizes == [1, 1000, 1000, 1000, 864]
    with torch.inference_mode():
        for x, got in zip(xs, results, strict=True):
            assert torch.equal(got, model.predict_pixels(x))


def test_a_large_request_is_split_and_reassembled_in_order() -> None:
    recorder = Recorder(double)
    x = torch.arange(20.0).reshape(10, 2)
    with DynamicBatcher(recorder, max_rows=3, max_wait=0, device=CPU, name="t", out_features=2) as batcher:
        assert torch.equal(batcher.submit(x).result(HANG), x * 2)
    assert recorder.sizes == [3, 3, 3, 1]
    assert batcher.batches == 4


def test_a_full_batch_is_launched_without_waiting_and_a_partial_one_waits() -> None:
    recorder = Recorder(double)
    with DynamicBatcher(recorder, max_rows=8, max_wait=3600, device=CPU, name="t", out_features=2) as batcher:
        first = batcher.submit(torch.ones(3, 2))
        second = batcher.submit(torch.ones(5, 2))  # 8 rows: full
        assert recorder.started.wait(HANG)
        assert torch.equal(first.result(HANG), torch.full((3, 2), 2.0))
        assert torch.equal(second.result(HANG), torch.full((5, 2), 2.0))
    assert recorder.sizes == [8]  # the first 3 rows waited for the next 5


def test_a_partial_batch_is_launched_after_max_wait() -> None:
    recorder = Recorder(double)
    with DynamicBatcher(recorder, max_rows=1000, max_wait=0.001, device=CPU, name="t", out_features=2) as batcher:
        assert torch.equal(batcher.submit(torch.ones(3, 2)).result(HANG), torch.full((3, 2), 2.0))
        assert recorder.sizes == [3]


def test_an_error_in_fn_reaches_every_future_of_its_batch_only(gated: tuple[DynamicBatcher, Recorder]) -> None:
    batcher, recorder = gated
    plugged = plug(batcher, recorder, 2)
    failing = [batcher.submit(torch.full((2, 2), float(i))) for i in range(2)]  # one batch of 4 rows
    later = batcher.submit(torch.ones(1, 2))

    def fail_on_zeros(x: Tensor) -> Tensor:
        if (x == 0).any():
            raise ArithmeticError("zeros")
        return x * 2

    recorder.fn = fail_on_zeros
    recorder.release()
    for future in failing:
        with pytest.raises(ArithmeticError, match="zeros"):
            future.result(HANG)
    assert torch.equal(later.result(HANG), torch.full((1, 2), 2.0))
    assert plugged.result(HANG).shape == (1, 2)
    assert recorder.sizes == [1, 4, 1]


def test_a_split_request_fails_when_one_of_its_batches_fails() -> None:
    def fail_second(x: Tensor) -> Tensor:
        if len(recorder.sizes) == 2:
            raise ArithmeticError("second batch")
        return x * 2

    recorder = Recorder(fail_second)
    with DynamicBatcher(recorder, max_rows=4, max_wait=0, device=CPU, name="t", out_features=2) as batcher:
        with pytest.raises(ArithmeticError, match="second batch"):
            batcher.submit(torch.ones(10, 2)).result(HANG)
        assert torch.equal(batcher.submit(torch.ones(1, 2)).result(HANG), torch.full((1, 2), 2.0))
    assert recorder.sizes == [4, 4, 1]  # the request's last 2 rows were dropped


def test_an_output_of_the_wrong_shape_fails_the_batch() -> None:
    batcher = DynamicBatcher(double, max_rows=4, max_wait=0, device=CPU, name="t", out_features=3)
    with batcher, pytest.raises(ValueError, match=r"fn gave \[2, 2\] for 2 rows"):
        batcher.submit(torch.ones(2, 2)).result(HANG)


def test_close_runs_what_is_queued_then_refuses() -> None:
    recorder = Recorder(double)
    batcher = DynamicBatcher(recorder, max_rows=100, max_wait=3600, device=CPU, name="t", out_features=2)
    futures = [batcher.submit(torch.ones(n, 2)) for n in (3, 150)]
    batcher.close()
    assert [f.result(0).shape for f in futures] == [(3, 2), (150, 2)]
    assert recorder.sizes == [100, 53]  # drained without waiting for max_wait
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(torch.ones(1, 2))
    batcher.close()  # idempotent


def test_a_cancelled_request_is_skipped(gated: tuple[DynamicBatcher, Recorder]) -> None:
    batcher, recorder = gated
    plug(batcher, recorder, 2)
    cancelled = batcher.submit(torch.ones(3, 2))
    kept = batcher.submit(torch.ones(2, 2))
    assert cancelled.cancel()
    recorder.release()
    assert kept.result(HANG).shape == (2, 2)
    with pytest.raises(CancelledError):
        cancelled.result(0)
    assert recorder.sizes == [1, 2]


def test_zero_rows_resolve_at_once_without_calling_fn() -> None:
    recorder = Recorder(double)
    with DynamicBatcher(recorder, max_rows=4, max_wait=3600, device=CPU, name="t", out_features=3) as batcher:
        future = batcher.submit(torch.empty(0, 2, dtype=torch.float64))
        assert future.done()
        result = future.result(0)
    assert (result.shape, result.dtype, result.device) == ((0, 3), torch.float64, CPU)
    assert recorder.sizes == []


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.ones(2, 3), r"rows of \(2, torch.float32\)"),
        (torch.ones(2, 2).double(), "float64"),
        (torch.ones(2), "expected"),
    ],
)
def test_requests_must_match_the_first_in_shape_and_dtype(x: Tensor, match: str) -> None:
    with DynamicBatcher(double, max_rows=4, max_wait=0, device=CPU, name="t", out_features=2) as batcher:
        batcher.submit(torch.ones(1, 2)).result(HANG)
        with pytest.raises(ValueError, match=match):
            batcher.submit(x)


def test_bfloat16_autocast_stays_within_the_documented_tolerance(model: FractionalCover, pixels: Tensor) -> None:
    with DynamicBatcher(
        model.predict_pixels, max_rows=CPU_MAX_ROWS, max_wait=0, device=CPU, name="cover", out_features=3,
        autocast=torch.bfloat16,
    ) as batcher:  # fmt: skip
        mixed = batcher.submit(pixels).result(HANG)
    with torch.inference_mode():
        exact = model.predict_pixels(pixels)
    assert mixed.dtype == torch.float32
    error = (mixed - exact).abs().max().item()
    assert 0 < error <= 0.0075  # measured 0.0065 (docstring)


class Crash(BaseException):
    pass


def test_a_crashed_thread_fails_the_waiting_futures_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    def crash(x: Tensor) -> Tensor:
        raise Crash

    batcher = DynamicBatcher(crash, max_rows=4, max_wait=0, device=CPU, name="crashy", out_features=2)
    with caplog.at_level(logging.ERROR, "gpu_worker.analysis.batcher"):
        with pytest.raises(Crash):
            batcher.submit(torch.ones(2, 2)).result(HANG)
        batcher.close()
    assert [getattr(r, "batcher", None) for r in caplog.records] == ["crashy"]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(torch.ones(1, 2))


def test_default_max_rows() -> None:
    assert default_max_rows(CPU) == CPU_MAX_ROWS == 1 << 14
    assert default_max_rows(torch.device("cuda")) > CPU_MAX_ROWS
