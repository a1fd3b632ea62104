"""The drain trigger: real signals delivered to this (main) thread, and wake-ups from other threads."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from gpu_worker.settlement import Interrupted, TimedOut
from gpu_worker.shutdown import Shutdown

WAIT = 10.0  # seconds: only a bound on a hang, never a speed claim


def _work(drain: Shutdown, start: Callable[[], object]) -> None:
    """A long job: ``start`` triggers the interruption, the sleep stands for GPU work (the GIL is free)."""
    with drain.interruptible():
        start()
        time.sleep(30)  # the signal handler raises long before this returns


def test_first_signal_requests_a_drain_and_nothing_is_interrupted(shutdown: Shutdown) -> None:
    with shutdown.interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
    assert shutdown.requested.wait(WAIT)  # set by the dispatcher thread, a moment after the handler returned
    assert not shutdown.forced.is_set()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_interrupts_the_work_in_hand(shutdown: Shutdown, second: int) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted):
        _work(shutdown, lambda: os.kill(os.getpid(), second))
    assert shutdown.forced.is_set()


def test_outside_the_interruptible_block_a_forced_shutdown_raises_nothing(shutdown: Shutdown) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. while settling: settlement must never be cut short
    assert shutdown.forced.wait(WAIT)
    with pytest.raises(Interrupted, match="before the job started"), shutdown.interruptible():
        pass


def test_the_grace_period_running_out_wakes_the_main_thread() -> None:
    drain = Shutdown(grace=0.2)
    restore = drain.install()
    try:
        with pytest.raises(Interrupted):  # by SIGUSR1 from the grace timer's thread
            _work(drain, lambda: drain.request("test"))
    finally:
        drain.finished()
        restore()


def test_a_request_from_another_thread_twice_forces(shutdown: Shutdown) -> None:
    def twice_from_a_thread() -> None:
        for _ in range(2):
            thread = threading.Thread(target=shutdown.request, args=("preemption notice",))
            thread.start()
            thread.join()

    with pytest.raises(Interrupted):
        _work(shutdown, twice_from_a_thread)


def test_finished_stops_the_grace_timer() -> None:
    drain = Shutdown(grace=0.1)
    drain.request("test")
    drain.finished()
    assert not drain.forced.wait(0.5)
    assert drain.drained.is_set()


def test_restore_puts_the_previous_handlers_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    restore = Shutdown(grace=1).install()
    assert signal.getsignal(signal.SIGTERM) is not before
    restore()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.timeout(60)
def test_a_signal_arriving_while_the_main_thread_is_inside_a_request_does_not_deadlock(shutdown: Shutdown) -> None:
    # A second SIGTERM can land between any two bytecodes of the main thread, e.g. inside the first request's
    # critical section (or inside ``Event.wait``'s lock): the handler must take no lock the main thread may hold.
    with shutdown._lock:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert shutdown.requested.wait(WAIT)
    assert shutdown.forced.wait(WAIT)


# Shutdown.interrupt: one job interrupted (its time limit) without a shutdown


class Stop(Exception):
    pass


def _interrupt_from_a_thread(drain: Shutdown, error: BaseException) -> None:
    thread = threading.Thread(target=drain.interrupt, args=(error,))
    thread.start()
    thread.join()


def test_interrupt_raises_the_given_error_inside_the_interruptible_block(shutdown: Shutdown) -> None:
    error = TimedOut("past the time limit")
    with pytest.raises(TimedOut) as info:
        _work(shutdown, lambda: _interrupt_from_a_thread(shutdown, error))
    assert info.value is error
    assert not shutdown.requested.is_set()  # no drain: the worker carries on with the next message
    assert not shutdown.forced.is_set()


def test_interrupt_outside_the_interruptible_block_raises_nothing(shutdown: Shutdown) -> None:
    _interrupt_from_a_thread(shutdown, Stop("too late: the job is being settled"))
    time.sleep(0.2)  # the signal handler has run by now, and raised nothing
    assert not shutdown.requested.is_set()
    with shutdown.interruptible():  # the stale interrupt does not hit the next job either...
        os.kill(os.getpid(), signal.SIGTERM)  # ...not even when a signal arrives during it
        assert shutdown.requested.wait(WAIT)
    assert not shutdown.forced.is_set()


def test_interrupt_without_its_handlers_installed_signals_nothing() -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        drain = Shutdown(grace=300)
        with drain.interruptible():
            _interrupt_from_a_thread(drain, Stop("no handler installed"))
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []
