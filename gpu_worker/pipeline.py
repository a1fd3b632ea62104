"""The worker's pipeline: the I/O of the jobs before and after the ones being analysed overlaps their analysis.

Threads, a bounded number of messages in flight (``WORKER_JOBS_IN_FLIGHT``: received and not yet settled) and of
analyses at once (``WORKER_ANALYSES``)::

    preparing thread   receive -> prepare (decode, claim, download) ──► ready ──┐
    computing threads  compute (the analysis): the main thread and       ◄──────┘ ──► finishing (or settling)
                       analyses - 1 more, one item each at a time
    finishing thread   finish (upload, store the result) -> settle, then free the message's slot
    settling thread    finish an item that has an error (nothing to upload: settle it), then free its slot

The preparing thread takes a slot before each receive and the finishing (or settling) thread gives it back once the
message is settled, so at most ``in_flight`` messages are in hand; with 1 the worker is strictly sequential (the
next message is received only once the last one is settled). With ``analyses`` 1 (the default on the CPU) the
analysis stays in the thread that calls :meth:`Pipeline.run`, the main thread, which :mod:`gpu_worker.shutdown`
interrupts with a signal. With more (the default on CUDA: jobs analysed at once share the GPU's batches,
:mod:`gpu_worker.analysis.batcher`), the other computing threads are interrupted at the analysis' next checkpoint
instead (each progress report checks its attempt, :mod:`gpu_worker.attempt`). An item that fails (or has nothing to
run) while it is prepared goes straight to be settled: the stages record what they raised in the item
(:attr:`Item.error`), and one that escapes a stage (a bug) is recorded there too. An item with an error goes to the
settling thread, not the finishing one, so that its settlement (a release, at a forced shutdown) never waits behind
another item's upload. :meth:`Pipeline.withdraw` settles an item that waits for a computing thread at once (its job
was cancelled, or lost, meanwhile).

The trade-off of ``in_flight`` above 1: a message prepared ahead is locked to this worker, and its job claimed,
while another job is analysed, so an idle worker elsewhere cannot take it; a worker that dies takes that many
messages with it (their locks and leases run out, and they are run again elsewhere). ``analyses`` is at most
``in_flight`` (more could never be busy).

Stopping (``stopping()`` true: a drain, or a fatal error): the preparing thread receives no more; what it is
preparing, and what is ready, is still computed (a forced shutdown makes that computation end at once, see
:mod:`gpu_worker.consumer`) and finished; :meth:`Pipeline.run` returns once every message received has been
finished. ``max_items``: the preparing thread stops after that many messages.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from gpu_worker.settlement import Interrupted

logger = logging.getLogger(__name__)

TICK = 0.2  # seconds: how soon the preparing thread, waiting for a slot, notices that it is to stop


class Item(Protocol):
    error: BaseException | None  # what ended it early, if anything


T = TypeVar("T", bound=Item)


class Stages(Protocol[T]):
    """What happens to an item at each stage. None but ``receive`` is expected to raise: each records what it raised
    in the item."""

    def receive(self) -> T | None:
        """The next item, or ``None`` (nothing came, or stopping); in the preparing thread."""
        ...

    def prepare(self, item: T) -> bool:
        """In the preparing thread; ``True``: compute it, ``False``: finish it at once."""
        ...

    def compute(self, item: T) -> None:
        """In a computing thread (the main thread, which runs the pipeline, or another), one item at a time each."""
        ...

    def finish(self, item: T) -> None:
        """In the finishing thread (the settling thread for an item with an error): finish the item and settle it."""
        ...


class Pipeline(Generic[T]):
    def __init__(self, stages: Stages[T], *, in_flight: int, stopping: Callable[[], bool], analyses: int = 1) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        if not 1 <= analyses <= in_flight:
            raise ValueError(f"analyses must be between 1 and in_flight ({in_flight}), not {analyses}")
        self._stages = stages
        self._analyses = analyses
        self._stopping = stopping
        self._slots = threading.Semaphore(in_flight)
        self._ready: queue.SimpleQueue[T | None] = queue.SimpleQueue()  # None (one per computing thread): no more
        self._finishing: queue.SimpleQueue[T | None] = queue.SimpleQueue()  # None: nothing more will come
        self._settling: queue.SimpleQueue[T | None] = queue.SimpleQueue()  # items with an error; None: as above
        self._waiting: dict[int, T] = {}  # the items in ready (by id), not yet taken by a computing thread
        self._waiting_lock = threading.Lock()
        self._stop = threading.Event()  # set when a stage failed outside its item (a bug): receive no more
        self._abandoned = threading.Event()  # an error escaped the main thread's computing loop
        self._failure: BaseException | None = None
        self.received = 0

    def run(self, max_items: int | None = None) -> int:
        """Run until stopping (or ``max_items`` received); return the number of items received, every one of them
        finished by then. Re-raises an error that escaped ``receive`` or ``finish`` (a bug), once all are finished."""
        preparing = threading.Thread(target=self._prepare_all, args=(max_items,), name="pipeline-prepare", daemon=True)
        finishing = threading.Thread(
            target=self._finish_all, args=(self._finishing,), name="pipeline-finish", daemon=True
        )
        settling = threading.Thread(
            target=self._finish_all, args=(self._settling,), name="pipeline-settle", daemon=True
        )
        computing = [
            threading.Thread(target=self._compute_more, name=f"pipeline-compute-{n}", daemon=True)
            for n in range(1, self._analyses)
        ]
        for thread in (finishing, settling, *computing, preparing):
            thread.start()
        try:
            self._compute_all()
        except BaseException:  # a bug: the other computing threads take no more either
            self._abandoned.set()
            raise
        finally:  # whatever ended the loop, every item received is finished
            self._stop.set()
            preparing.join()
            for thread in computing:
                thread.join()
            self._skip_the_rest()
            self._finishing.put(None)
            self._settling.put(None)
            finishing.join()
            settling.join()
        if self._failure is not None:
            raise self._failure
        return self.received

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._stopping()

    def _prepare_all(self, max_items: int | None) -> None:
        try:
            while not self._stopped() and (max_items is None or self.received < max_items):
                if not self._slots.acquire(timeout=TICK):
                    continue
                try:
                    item = self._stages.receive()
                except BaseException:
                    self._slots.release()
                    raise
                if item is None:
                    self._slots.release()
                    continue
                self.received += 1
                if self._run_stage(self._stages.prepare, item):
                    with self._waiting_lock:
                        self._waiting[id(item)] = item
                    self._ready.put(item)
                else:
                    self._done_with(item)
        except BaseException as e:  # a bug in receive: receive no more; what is in flight still finishes
            self._failed(e)
        finally:
            for _ in range(self._analyses):
                self._ready.put(None)

    def _compute_all(self) -> None:
        """A computing thread: take the ready items, in order, until the preparing thread is done. Once an error
        has escaped the main thread's loop (a bug), the rest are left to :meth:`_skip_the_rest`."""
        while (item := self._ready.get()) is not None:
            if not self._abandoned.is_set() and self._take(item):
                self._compute(item)

    def _compute_more(self) -> None:
        """A computing thread besides the main one; an error escaping it is a bug, which stops the pipeline."""
        try:
            self._compute_all()
        except BaseException as e:
            self._failed(e)

    def withdraw(self, item: T, error: BaseException) -> bool:
        """If ``item`` waits for a computing thread (prepared, not yet computed), take it out of the line with ``error``
        and have it settled now (from any thread); ``False`` if it is not waiting (being computed, or past that)."""
        with self._waiting_lock:
            if self._waiting.pop(id(item), None) is None:
                return False
            if item.error is None:
                item.error = error
        self._settling.put(item)
        return True

    def _take(self, item: T) -> bool:
        """A computing thread takes ``item`` from the line, unless it was withdrawn meanwhile."""
        with self._waiting_lock:
            return self._waiting.pop(id(item), None) is not None

    def _compute(self, item: T) -> None:
        self._run_stage(self._stages.compute, item)
        self._done_with(item)

    def _done_with(self, item: T) -> None:
        """To the finishing thread, or the settling thread if it has an error (no upload: nothing to wait for)."""
        (self._finishing if item.error is None else self._settling).put(item)

    def _finish_all(self, line: queue.SimpleQueue[T | None]) -> None:
        while (item := line.get()) is not None:
            try:
                self._stages.finish(item)
            except BaseException as e:  # a bug in the settlement: the message is left to the broker
                self._failed(e)
            finally:
                self._slots.release()

    def _skip_the_rest(self) -> None:
        """Items still waiting when the main thread's loop ended early (only an error escaping it does that, a bug: the
        signal's ``Interrupted`` is raised inside the compute stage only), the one it had just taken off the line
        included, and those the other computing threads left once it had: finished uncomputed, as interrupted.
        Nothing is wrong with them, so they are released like a drain's, without charging an attempt
        (:func:`gpu_worker.settlement.decide`)."""
        with self._waiting_lock:
            left, self._waiting = list(self._waiting.values()), {}
        for item in left:
            if item.error is None:
                item.error = Interrupted("the pipeline stopped before computing it")
            self._settling.put(item)

    def _run_stage(self, stage: Callable[[T], bool | None], item: T) -> bool:
        """``stage(item)``; what escapes it (a bug) becomes the item's error."""
        try:
            return stage(item) is not False
        except BaseException as e:
            logger.error("pipeline stage %s raised", getattr(stage, "__name__", stage), exc_info=e,
                         extra={"action": "stage_failed"})  # fmt: skip
            if item.error is None:
                item.error = e
            return False

    def _failed(self, error: BaseException) -> None:
        logger.error("pipeline thread failed; receiving stops", exc_info=error, extra={"action": "pipeline_failed"})
        if self._failure is None:
            self._failure = error
        self._stop.set()
