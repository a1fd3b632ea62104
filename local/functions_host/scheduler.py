"""Running timer functions on their schedules, the way the host's ``TimerListener`` does.

One thread per enabled timer function, so a function never overlaps itself. After an invocation the next occurrence
is computed from the time that invocation started: when one overruns, the occurrences it missed collapse into one
invocation that starts at once, then the schedule resumes. ``run_on_startup`` invokes the function once when the
scheduler starts. An exception is logged and the schedule goes on. Coroutine functions run on the event loop given
(the HTTP server's), so clients they cache are the ones HTTP functions use.

``past_due`` is always False here. The host sets ``IsPastDue`` only for the one invocation it makes at startup when
its schedule monitor (``useMonitor``, state kept in the storage account) shows an occurrence was missed while the app
was down; a late or catch-up invocation in a running host is not past due. This host keeps no such state, so it
neither reports past-due invocations nor replays occurrences missed while it was stopped, and ``schedule_status`` is
empty (as on the host without a monitor).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from azure.functions.timer import TimerRequest  # the worker's concrete func.TimerRequest

from local.functions_host.invoke import EventLoopThread, run_function
from local.functions_host.timers import TimerFunction

logger = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 8.0  # seconds; under the 10 s the local stack waits after SIGTERM before it kills the host
_MAX_SLEEP = 60.0  # re-read the clock at least this often, so a changed system clock is noticed


def utcnow() -> datetime:
    return datetime.now(UTC)


class TimerScheduler:
    """Run each enabled timer function in ``timers`` on its schedule, from ``start`` until ``stop``."""

    def __init__(
        self, timers: Iterable[TimerFunction], loop: EventLoopThread, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.timers = [timer for timer in timers if not timer.disabled]
        self._loop = loop
        self._clock = clock
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for timer in self.timers:
            thread = threading.Thread(target=self._run, args=(timer,), name=f"timer-{timer.function_name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
        """Fire nothing more and wait up to ``timeout`` seconds for running invocations; False if some still run."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = [thread.name.removeprefix("timer-") for thread in self._threads if thread.is_alive()]
        if running:
            logger.warning(
                "timer functions still running after %.1f s: %s",
                timeout,
                ", ".join(running),
                extra={"action": "timer_stop_timeout"},
            )
        return not running

    def _run(self, timer: TimerFunction) -> None:
        due = timer.schedule.next_after(self._clock())
        if timer.run_on_startup and not self._stopping.is_set():
            started = self._clock()
            self._invoke(timer, "RunOnStartup")
            due = timer.schedule.next_after(started)
        while due is not None and self._sleep_until(due):
            started = self._clock()
            self._invoke(timer, f"Timer fired at {started.isoformat()}")
            due = timer.schedule.next_after(started)  # an overrun makes this past already: the catch-up runs at once
        if due is None:
            logger.warning(
                "timer %s: schedule %r has no further occurrence",
                timer.function_name,
                timer.schedule.expression,
                extra={"action": "timer_exhausted", "function": timer.function_name},
            )

    def _sleep_until(self, due: datetime) -> bool:
        """Wait until ``due``; False when stopped first."""
        while (remaining := (due - self._clock()).total_seconds()) > 0:
            if self._stopping.wait(min(remaining, _MAX_SLEEP)):
                return False
        return not self._stopping.is_set()

    def _invoke(self, timer: TimerFunction, reason: str) -> None:
        name = timer.function_name
        invocation_id = str(uuid.uuid4())
        fields = {"function": name, "invocation_id": invocation_id}
        request = TimerRequest(
            past_due=False, schedule_status={}, schedule={"AdjustForDST": timer.schedule.adjust_for_dst}
        )
        logger.info(
            "Executing 'Functions.%s' (Reason='%s', Id=%s)",
            name,
            reason,
            invocation_id,
            extra={"action": "timer_started", **fields},
        )
        started = time.perf_counter()
        try:
            run_function(timer.user_function, {timer.binding_name: request}, self._loop)
        except Exception:
            elapsed = (time.perf_counter() - started) * 1000
            logger.exception(
                "Executed 'Functions.%s' (Failed, Id=%s, %.1f ms)",
                name,
                invocation_id,
                elapsed,
                extra={"action": "timer_failed", "duration_ms": elapsed, **fields},
            )
            return
        elapsed = (time.perf_counter() - started) * 1000
        logger.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, %.1f ms)",
            name,
            invocation_id,
            elapsed,
            extra={"action": "timer_succeeded", "duration_ms": elapsed, **fields},
        )
