"""Running timer functions on their schedules, the way the host's ``TimerListener`` does.

One thread per enabled timer function, so a function never overlaps itself. After an invocation the next occurrence
is computed from the time that invocation started: when one overruns, the occurrences it missed collapse into one
invocation that starts at once, then the schedule resumes. ``run_on_startup`` invokes the function once when the
scheduler starts. An exception is logged and the schedule goes on. Coroutine functions run on the event loop given
(the HTTP server's), so clients they cache are the ones HTTP functions use.

The schedule monitor (``monitor``) runs for timers whose ``use_monitor`` holds when the scheduler is given
``statuses`` (the host's ``--state-dir``): ``start`` reads and checks each one's status before it returns, a timer
whose recorded ``Next`` passed while the host was down is invoked at once with ``past_due`` True (instead of its
``run_on_startup`` invocation, not as well), each invocation gets ``schedule_status`` and its new status is written
after it. Without ``statuses`` there is no monitor: ``past_due`` is always False, occurrences missed while the host
was stopped are not replayed, and ``schedule_status`` is empty (as on the host without a monitor). A late or
catch-up invocation in a running host is never past due.
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
from local.functions_host.monitor import (
    ScheduleStatus,
    Startup,
    after_invocation,
    check_past_due,
    isoformat,
    unmonitored,
)
from local.functions_host.status_files import StatusFiles
from local.functions_host.timers import TimerFunction

logger = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 8.0  # seconds; under the 10 s the local stack waits after SIGTERM before it kills the host
_MAX_SLEEP = 60.0  # re-read the clock at least this often, so a changed system clock is noticed


def utcnow() -> datetime:
    return datetime.now(UTC)


class TimerScheduler:
    """Run each enabled timer function in ``timers`` on its schedule, from ``start`` until ``stop``."""

    def __init__(
        self,
        timers: Iterable[TimerFunction],
        loop: EventLoopThread,
        clock: Callable[[], datetime] = utcnow,
        statuses: StatusFiles | None = None,
    ) -> None:
        self.timers = [timer for timer in timers if not timer.disabled]
        self._loop = loop
        self._clock = clock
        self._statuses = statuses
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for timer in self.timers:
            startup = self._startup(timer)
            thread = threading.Thread(
                target=self._run, args=(timer, startup), name=f"timer-{timer.function_name}", daemon=True
            )
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

    def _monitor(self, timer: TimerFunction) -> StatusFiles | None:
        return self._statuses if timer.use_monitor else None

    def _startup(self, timer: TimerFunction) -> Startup:
        """``TimerListener.StartAsync``: the status to start from, past due or not, recorded when monitored."""
        now, monitor = self._clock(), self._monitor(timer)
        if monitor is None:
            return unmonitored(timer.schedule, now)
        startup = check_past_due(monitor.read(timer.function_name), timer.schedule, now)
        if startup.record is not None:
            monitor.write(timer.function_name, startup.record)
        status = startup.status.as_json()
        logger.debug(
            "Function '%s' initial status: Last='%s', Next='%s', LastUpdated='%s'",
            timer.function_name,
            status["Last"],
            status["Next"],
            status["LastUpdated"],
            extra={"action": "timer_status", "function": timer.function_name, "past_due": startup.past_due},
        )
        return startup

    def _run(self, timer: TimerFunction, startup: Startup) -> None:
        status = startup.status
        first = "IsPastDue" if startup.past_due else "RunOnStartup" if timer.run_on_startup else None
        if first is not None and not self._stopping.is_set():
            status = self._invoke(timer, status, first)
        while status.next is not None and self._sleep_until(status.next):
            status = self._invoke(timer, status, None)  # an overrun makes Next past already: the catch-up runs at once
        if status.next is None:
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

    def _invoke(self, timer: TimerFunction, status: ScheduleStatus, unscheduled: str | None) -> ScheduleStatus:
        """Invoke ``timer`` (``unscheduled``: "IsPastDue", "RunOnStartup" or None); the status after it."""
        fired, monitor = self._clock(), self._monitor(timer)
        request = TimerRequest(
            past_due=unscheduled == "IsPastDue",
            schedule_status=status.as_json() if monitor is not None else {},
            schedule={"AdjustForDST": timer.schedule.adjust_for_dst},
        )
        if unscheduled == "IsPastDue" and status.next is not None:
            logger.info(
                "Function '%s' is past due on startup (OriginalSchedule=%s). Executing now.",
                timer.function_name,
                isoformat(status.next),
                extra={"action": "timer_past_due", "function": timer.function_name},
            )
        self._call(timer, request, unscheduled or f"Timer fired at {fired.isoformat()}")
        status = after_invocation(status, timer.schedule, fired, scheduled=unscheduled is None)
        if monitor is not None:
            monitor.write(timer.function_name, status)
        return status

    def _call(self, timer: TimerFunction, request: TimerRequest, reason: str) -> None:
        name = timer.function_name
        invocation_id = str(uuid.uuid4())
        fields = {"function": name, "invocation_id": invocation_id}
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
