"""The drain: SIGTERM/SIGINT (or the preemption watcher) stop receiving; in-flight work gets a grace period.

First request: ``requested`` is set; the consumer stops receiving after the current receive call (a message that
call returns is still run, within the grace), finishes every job in hand (:mod:`gpu_worker.pipeline`: the one
being analysed, those prepared, those being finished) and closes its clients. A second request, or the grace period
running out, sets ``forced``: the job being analysed is interrupted with :class:`~gpu_worker.settlement.Interrupted`
(raised in the main thread by a signal handler, only inside :meth:`Shutdown.interruptible`, so the settlement that
follows is never cut short), and a job prepared but not started meets the same error as it enters
:meth:`Shutdown.interruptible`: each attempt is released, uncharged, and the job's next generation sent at once for
another worker; a download or upload in progress stops at its next check (the attempt's guard raises
``Interrupted`` once ``forced`` is set, :mod:`gpu_worker.attempt`) and its job is released too. Settlements under way
complete. ``drained`` is set once the consumer has settled
every message in hand.

The same path interrupts one job without a shutdown: :meth:`Shutdown.interrupt` (the attempt's time limit, see
:mod:`gpu_worker.attempt`) has the handler raise the given exception inside :meth:`Shutdown.interruptible`.

Signal handlers only run in the main thread, so an analysis runs there (the pipeline's I/O threads are never
interrupted; its other computing threads, with ``WORKER_ANALYSES`` above 1, stop at their analysis' next checkpoint,
:mod:`gpu_worker.pipeline`); other threads (grace timer, preemption watcher, an attempt's time limit) wake it with
``pthread_kill(main, SIGUSR1)``, which also interrupts a blocking system call.

A signal handler runs between any two bytecodes of the main thread: inside another handler, inside
:meth:`Shutdown.request`'s critical section, inside ``Event.wait``'s own lock. So it takes no lock at all: it writes
the signal number to a pipe, and a small thread turns what it reads into :meth:`Shutdown.request` calls (raising
:class:`Interrupted` is the only thing the handler does itself, on the ``SIGUSR1`` that a forced shutdown sends).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType

from gpu_worker.settlement import Interrupted

logger = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WAKE_SIGNAL = signal.SIGUSR1

_Handler = Callable[[int, FrameType | None], object] | int | None


class Shutdown:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.drained = threading.Event()  # set once the consumer has settled every message in hand and stopped
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._interruptible = False
        self._interrupt: BaseException | None = None  # raised in the main thread by the next SIGUSR1
        self._installed = False
        self._signal_pipe = -1  # write end; the dispatcher thread reads the other

    def request(self, why: str) -> None:
        """Begin the drain; a second request forces it. Safe from any thread, never from a signal handler."""
        with self._lock:
            first = not self.requested.is_set()
            if first:
                self.requested.set()
                self._timer = threading.Timer(self.grace, self.force, args=(f"grace period of {self.grace:g} s over",))
                self._timer.daemon = True
                self._timer.start()
        if first:
            logger.warning("shutdown requested (%s): draining", why, extra={"action": "drain"})
        else:
            self.force(f"{why} again")

    def force(self, why: str) -> None:
        if self.forced.is_set() or self.drained.is_set():
            return
        self.forced.set()
        logger.warning("shutdown forced (%s): abandoning work in hand", why, extra={"action": "drain_forced"})
        if self._installed and threading.current_thread() is not threading.main_thread():
            main = threading.main_thread().ident
            if main is not None:
                signal.pthread_kill(main, WAKE_SIGNAL)

    def interrupt(self, error: BaseException) -> None:
        """Raise ``error`` in the main thread if it is inside :meth:`interruptible` (from any other thread)."""
        self._interrupt = error
        main = threading.main_thread().ident
        if self._installed and main is not None and threading.current_thread() is not threading.main_thread():
            signal.pthread_kill(main, WAKE_SIGNAL)

    def finished(self) -> None:
        self.drained.set()
        if self._timer is not None:
            self._timer.cancel()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """The block (the handler's work, never the settlement) may be interrupted by a forced shutdown."""
        if self.forced.is_set():
            raise Interrupted("shutdown forced before the job started")
        self._interrupt = None
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
            self._interrupt = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Lock-free (see the module docstring): hand the signal to the dispatcher; raise if forced mid-job."""
        if signum != WAKE_SIGNAL:
            with suppress(BlockingIOError):  # a full pipe: plenty of requests are pending, a force among them
                os.write(self._signal_pipe, bytes([signum]))
        if self._interruptible and self._interrupt is not None:
            self._interruptible = False
            raise self._interrupt
        if self.forced.is_set() and self._interruptible:
            self._interruptible = False
            raise Interrupted("shutdown forced while processing")

    def install(self) -> Callable[[], None]:
        """Install the signal handlers (main thread only); return a function that restores the previous ones."""
        read_end, self._signal_pipe = os.pipe()
        os.set_blocking(self._signal_pipe, False)
        dispatcher = threading.Thread(target=self._dispatch, args=(read_end,), name="shutdown-signals", daemon=True)
        dispatcher.start()
        previous: dict[int, _Handler] = {}
        for signum in (*DRAIN_SIGNALS, WAKE_SIGNAL):
            previous[signum] = signal.signal(signum, self._on_signal)
        self._installed = True

        def restore() -> None:
            self._installed = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._signal_pipe)  # the dispatcher reads end-of-file and stops
            dispatcher.join()

        return restore

    def _dispatch(self, read_end: int) -> None:
        with open(read_end, "rb", buffering=0) as pipe:
            while signums := pipe.read(64):
                for signum in signums:
                    self.request(signal.Signals(signum).name)
