"""A dynamic batcher for per-pixel models: rows from many callers share one model call, as in Triton's.

``fn`` maps ``[N, F] -> [N, K]`` row by row (``FractionalCover.predict_pixels``, say). Any thread may
:meth:`~DynamicBatcher.submit` a ``[P, F]`` tensor; one background thread concatenates the rows of queued requests,
in arrival order, into calls of at most ``max_rows`` rows. A batch is launched as soon as it is full, or once
``max_wait`` seconds have passed since the oldest request in it arrived. A request larger than ``max_rows`` is split
across consecutive batches and reassembled (its leftover rows keep its arrival time, so they wait at most what is
left of ``max_wait``); each future resolves to exactly its own rows, in order, on the device the caller asked for (by
default the input's). All device work happens in that thread, under ``torch.inference_mode()``, so results are
inference tensors, complete when their future resolves. Done-callbacks run in that thread: keep them short.

* Every request must have the feature width and dtype of the first one (:class:`ValueError` at submit otherwise),
  and ``fn`` must return ``[N, out_features]`` (else the batch fails). Zero-row requests resolve at once to an empty
  ``[0, out_features]`` tensor of the input's dtype. Do not modify a submitted tensor before its future resolves.
* An exception from ``fn`` is set on the future of every request in that batch; the unsent rows of a split request
  are then dropped. A future cancelled before its first rows are taken is skipped.
* :meth:`~DynamicBatcher.close` drains: requests already queued are run, in full batches, without waiting for
  ``max_wait``; later submissions raise :class:`RuntimeError`. If the thread dies, queued futures get that error.

On CUDA, host inputs are staged in one pinned buffer per batch and copied with ``non_blocking=True``; results for
host callers come back the same way, and the next batch is launched before the previous one's results are awaited.
Device inputs must be ready on the current (default) stream when submitted.

Exactness (CPU, MKL 2024.2, this torch build): rows give bit-identical results whatever batch they travel in, as
long as the request and the batch both have at least 12 rows. MKL's small-matrix GEMM path (fewer than 12 rows) rounds
differently, by at most 1.2e-7 (one float32 ulp at 1) in the cover fractions; ``tests/unit/test_batcher.py`` checks
both.

Mixed precision (``autocast=torch.bfloat16`` or ``torch.float16``) runs ``fn`` under ``torch.autocast``; outputs are
cast back to the input's dtype. Measured on CPU with the real cover model on the 65,536 pixels of
``tests/data/s2_l1c_fields_256.tif``, against float32: bfloat16 max abs error 0.0065 in the fractions (mean 0.0006;
18 % of pixels move by one percentage point in the uint8 cover COG), float16 0.00087 (mean 0.00008; 2.3 % move by
one point). On ``s2_l1c_coast_256.tif`` (sea and lagoon) bfloat16 reaches 0.023, float16 0.0031. Leave it off where
results must equal the float32 ones.

:data:`CPU_MAX_ROWS` is measured, ``FractionalCover.predict_pixels`` over 2^20 real pixels on this 2-core CPU
(AVX-512), best of 5, Mpx/s with 2 threads (1 thread): 4096 rows 5.1 (3.4), 8192 6.5 (3.6), 16384 6.6 (3.5), 32768
5.9 (3.4), 65536 4.6 (1.8), 131072 2.5 (1.4), 262144 2.1 (1.3). A second run (2 threads) gave 7.5, 8.2, 8.5, 8.4,
3.6, 2.4, 2.2: levels move with the machine's load, the shape holds (8k-32k best, 2^18 three to four times slower).
From 2^16 rows the 64-float hidden activations fall out of cache. :data:`CUDA_MAX_ROWS` is not measured yet (no GPU
was available): 2^20 rows are 256 MB of activations per hidden layer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

CPU_MAX_ROWS = 1 << 14
CUDA_MAX_ROWS = 1 << 20


def default_max_rows(device: torch.device) -> int:
    """Rows per cover-MLP call: :data:`CUDA_MAX_ROWS` on CUDA, else :data:`CPU_MAX_ROWS`."""
    return CUDA_MAX_ROWS if device.type == "cuda" else CPU_MAX_ROWS


@dataclass(eq=False)
class _Request:
    x: Tensor
    future: Future[Tensor]
    out_device: torch.device
    arrived: float
    taken: int = 0  # rows handed to batches so far
    parts: list[Tensor] = field(default_factory=list)  # results so far, on out_device

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    rows: int


@dataclass
class _Launched:
    slices: list[_Slice]
    output: Tensor  # [rows, K] on the batcher's device
    host: Tensor | None  # the same, copied (maybe still copying) to the host, when a caller wants it there
    done: torch.Event | None  # recorded after the copies, on CUDA


class DynamicBatcher:
    """Batches row-wise calls of ``fn`` across threads; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        *,
        max_rows: int,
        max_wait: float,
        device: torch.device,
        name: str,
        out_features: int,
        autocast: torch.dtype | None = None,
    ) -> None:
        if max_rows < 1 or max_wait < 0 or out_features < 0:
            raise ValueError(f"bad batcher limits: {max_rows=}, {max_wait=}, {out_features=}")
        self.name, self.device, self.max_rows, self.max_wait = name, device, max_rows, max_wait
        self._fn, self._out_features, self._autocast = fn, out_features, autocast
        self._cuda = device.type == "cuda"
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._row: tuple[int, torch.dtype] | None = None  # feature width and dtype, fixed by the first request
        self._closed = False
        self.batches = 0  # model calls so far (read it after close for a stable value)
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, x: Tensor, *, out_device: torch.device | None = None) -> Future[Tensor]:
        """Queue ``[P, F]`` rows (on the CPU or the batcher's device); the future gets ``fn``'s ``[P, K]`` rows."""
        if x.ndim != 2 or x.device.type not in ("cpu", self.device.type):
            raise ValueError(f"{self.name}: expected [P, F] rows on cpu or {self.device}, got {x.shape} on {x.device}")
        future: Future[Tensor] = Future()
        out = x.device if out_device is None else out_device
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            if self._row is None:
                self._row = (x.shape[1], x.dtype)
            elif (x.shape[1], x.dtype) != self._row:
                raise ValueError(f"{self.name}: rows of {self._row}, got {(x.shape[1], x.dtype)}")
            if x.shape[0] == 0:
                future.set_result(torch.empty((0, self._out_features), dtype=x.dtype, device=out))
                return future
            self._queue.append(_Request(x, future, out, time.monotonic()))
            self._queued_rows += x.shape[0]
            self._cond.notify()
        return future

    def close(self) -> None:
        """Run what is queued, then stop the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:  # close() from a future's callback cannot join
            self._thread.join()

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The batcher thread.

    def _run(self) -> None:
        batch: list[_Slice] | None = None
        inflight: _Launched | None = None  # on CUDA: launched, results not yet handed out
        try:
            while True:
                batch = self._next_batch(wait=inflight is None)
                if batch is None and inflight is None:
                    return
                launched = self._launch(batch) if batch is not None else None
                if inflight is not None:
                    self._finish(inflight)  # after the next launch: its kernels overlap this copy-back
                inflight = launched
                if inflight is not None and not self._cuda:
                    self._finish(inflight)
                    inflight = None
        except BaseException as e:  # a bug here: fail every waiting future rather than leave it hanging
            logger.exception("batcher thread failed", extra={"batcher": self.name})
            with self._cond:
                self._closed = True
                stranded = [
                    *self._queue,
                    *(s.request for s in [*(batch or []), *(inflight.slices if inflight else [])]),
                ]
                self._queue.clear()
            for request in stranded:
                _fail(request, e)

    def _next_batch(self, *, wait: bool) -> list[_Slice] | None:
        """The next batch once it is due (full, ``max_wait`` reached, or closing); None when nothing is due and
        ``wait`` is false, or when closed with nothing queued."""
        with self._cond:
            while True:
                if self._queue:
                    due = self._queue[0].arrived + self.max_wait
                    if self._queued_rows >= self.max_rows or self._closed or time.monotonic() >= due:
                        batch = self._take()
                        if batch:
                            return batch
                        continue
                    if wait:
                        self._cond.wait(due - time.monotonic())
                        continue
                    return None
                if self._closed or not wait:
                    return None
                self._cond.wait()

    def _take(self) -> list[_Slice]:
        """Up to ``max_rows`` rows from the head of the queue, skipping cancelled and failed requests."""
        batch: list[_Slice] = []
        rows = 0
        while self._queue and rows < self.max_rows:
            request = self._queue[0]
            started = request.taken > 0 or request.future.set_running_or_notify_cancel()
            if not started or request.future.done():
                self._queue.popleft()
                self._queued_rows -= request.rows - request.taken
                continue
            n = min(request.rows - request.taken, self.max_rows - rows)
            batch.append(_Slice(request, request.taken, n))
            request.taken += n
            rows += n
            self._queued_rows -= n
            if request.taken == request.rows:
                self._queue.popleft()
        return batch

    def _launch(self, batch: list[_Slice]) -> _Launched | None:
        """Gather the rows on the device and run ``fn``; on CUDA, queue the copy back to pinned host memory."""
        try:
            with torch.inference_mode(), self._mixed_precision():
                x = self._gather(batch)
                y = self._fn(x)
                if y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] != self._out_features:
                    raise ValueError(f"{self.name}: fn gave {list(y.shape)} for {x.shape[0]} rows")
                if self._autocast is not None and y.is_floating_point():
                    y = y.to(x.dtype)
                host = None
                if self._cuda and any(s.request.out_device.type == "cpu" for s in batch):
                    host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True).copy_(y, non_blocking=True)
                done = torch.Event(device=self.device) if self._cuda else None
                if done is not None:
                    done.record()
        except Exception as e:
            _fail_batch(batch, e)
            return None
        self.batches += 1
        logger.debug("batch launched", extra={"batcher": self.name, "rows": x.shape[0], "requests": len(batch)})
        return _Launched(batch, y, host, done)

    def _gather(self, batch: list[_Slice]) -> Tensor:
        pieces = [s.request.x[s.start : s.start + s.rows] for s in batch]
        if self._cuda and any(p.device.type == "cpu" for p in pieces):
            host = [p for p in pieces if p.device.type == "cpu"]
            staged = torch.empty((sum(len(p) for p in host), host[0].shape[1]), dtype=host[0].dtype, pin_memory=True)
            torch.cat(host, out=staged)
            moved = iter(torch.split(staged.to(self.device, non_blocking=True), [len(p) for p in host]))
            pieces = [next(moved) if p.device.type == "cpu" else p for p in pieces]
        pieces = [p.to(self.device) for p in pieces]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _finish(self, launched: _Launched) -> None:
        """Wait for the batch, then hand each request its rows (resolving those now complete)."""
        try:
            with torch.inference_mode():
                if launched.done is not None:
                    launched.done.synchronize()
                offset = 0
                for s in launched.slices:
                    request = s.request
                    source = launched.host if launched.host is not None and request.out_device.type == "cpu" else None
                    part = (launched.output if source is None else source)[offset : offset + s.rows]
                    offset += s.rows
                    if request.future.done():
                        continue
                    request.parts.append(part.to(request.out_device))
                    if s.start + s.rows == request.rows:
                        parts = request.parts
                        request.future.set_result(parts[0] if len(parts) == 1 else torch.cat(parts))
                        request.parts = []
        except Exception as e:
            _fail_batch(launched.slices, e)

    def _mixed_precision(self) -> contextlib.AbstractContextManager[object]:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast)


def _fail(request: _Request, error: BaseException) -> None:
    request.parts = []
    with contextlib.suppress(InvalidStateError):  # done already, or cancelled meanwhile
        request.future.set_exception(error)


def _fail_batch(batch: list[_Slice], error: BaseException) -> None:
    for s in batch:
        _fail(s.request, error)
