"""Timer triggers of the local Functions host: schedules, discovery from a FunctionApp, scheduling on a real clock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest as WorkerTimerRequest

from local.functions_host.__main__ import IndexedApp
from local.functions_host.invoke import EventLoopThread
from local.functions_host.ncrontab import ConstantSchedule, CronSchedule, ScheduleError, parse_schedule
from local.functions_host.routes import routes_of
from local.functions_host.scheduler import TimerScheduler
from local.functions_host.timers import TimerFunction, is_disabled, resolve_settings, timers_of

EVERY_SECOND = "* * * * * *"
YEARLY = "0 0 0 1 1 *"


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def _cron(expression: str) -> CronSchedule:
    schedule = parse_schedule(expression)
    assert isinstance(schedule, CronSchedule)
    return schedule


def _logged(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "field", "values"),
    [
        ("*/15 * * * * *", "seconds", {0, 15, 30, 45}),
        ("5/20 * * * * *", "seconds", {5, 25, 45}),  # a/n: from a to the maximum
        ("0 5-10/2 * * * *", "minutes", {5, 7, 9}),
        ("0 0 9,17 * * *", "hours", {9, 17}),
        ("0 0 0 1-3,28 * *", "days", {1, 2, 3, 28}),
        ("0 0 0 * Jan,jul *", "months", {1, 7}),
        ("0 0 0 * JANUARY-Mar *", "months", {1, 2, 3}),
        ("0 0 0 * * Mon-Fri", "weekdays", {1, 2, 3, 4, 5}),
        ("0 0 0 * * sun,Sat", "weekdays", {0, 6}),
        ("0 0 0 * * T", "weekdays", {2}),  # NCrontab: the first name the token is a prefix of
        ("0 0 0 * * 6-2", "weekdays", {2, 3, 4, 5, 6}),  # NCrontab swaps a reversed range
        ("0 0 0 * * 0", "weekdays", {0}),
        ("*/5 * * * *", "seconds", {0}),  # five fields: no seconds, second 0
        ("*/5 * * * *", "minutes", set(range(0, 60, 5))),
        ("  0   0  12 * *  * ", "hours", {12}),
    ],
)
def test_parses_ncrontab_fields(expression: str, field: str, values: set[int]) -> None:
    assert getattr(_cron(expression), field) == frozenset(values)


@pytest.mark.parametrize(
    ("expression", "detail"),
    [
        ("* * * *", "4 fields"),
        ("* * * * * * *", "7 fields"),
        ("", "0 fields"),
        ("60 * * * * *", "second '60': 60 is outside 0-59"),
        ("* * 24 * * *", "hour '24'"),
        ("* * * 0 * *", "day '0': 0 is outside 1-31"),
        ("* * * 32 * *", "day '32'"),
        ("* * * * 13 *", "month '13'"),
        ("* * * * * 7", "use 0"),
        ("*/0 * * * * *", "step '0'"),
        ("*/x * * * * *", "step 'x'"),
        ("* * * * Foo *", "'Foo' is not a number or a name"),
        ("* * * * * Funday", "'Funday'"),
        ("1,,2 * * * * *", "'' is not a number"),
        ("? * * * * *", "second '?'"),
        ("* * * L * *", "day 'L'"),
        ("-5 * * * * *", "second '-5'"),
        ("%SCHEDULE%", "neither a TimeSpan"),
        ("24:00:00", "neither a TimeSpan"),
        ("00:60", "neither a TimeSpan"),
        ("00:00:00", "zero or less"),
        ("-00:05:00", "zero or less"),
    ],
)
def test_refuses_invalid_expressions_naming_them(expression: str, detail: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        parse_schedule(expression)
    assert repr(expression) in str(raised.value)
    assert detail in str(raised.value)


@pytest.mark.parametrize(
    ("expression", "interval"),
    [
        ("00:05:00", timedelta(minutes=5)),
        ("01:30", timedelta(hours=1, minutes=30)),
        ("1.02:03:04.5", timedelta(days=1, hours=2, minutes=3, seconds=4.5)),
        ("5", timedelta(days=5)),  # TimeSpan.Parse reads a bare number as days
    ],
)
def test_parses_timespan_schedules(expression: str, interval: timedelta) -> None:
    schedule = parse_schedule(expression)
    assert schedule == ConstantSchedule(expression, interval)
    assert schedule.next_after(_at(2024, 1, 1, 12, 0, 0)) == _at(2024, 1, 1, 12, 0, 0) + interval


# --- next occurrence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # strictly after, to whole seconds
        ("0 * * * * *", _at(2024, 5, 1, 12, 0, 0), _at(2024, 5, 1, 12, 1, 0)),
        (EVERY_SECOND, _at(2024, 5, 1, 12, 0, 0, 500_000), _at(2024, 5, 1, 12, 0, 1)),
        ("*/15 * * * * *", _at(2024, 5, 1, 12, 0, 44), _at(2024, 5, 1, 12, 0, 45)),
        ("0 */5 * * * *", _at(2024, 5, 1, 12, 58, 0), _at(2024, 5, 1, 13, 0, 0)),
        # year end
        (YEARLY, _at(2024, 12, 31, 23, 59, 59), _at(2025, 1, 1)),
        ("59 59 23 31 12 *", _at(2024, 12, 31, 23, 59, 59), _at(2025, 12, 31, 23, 59, 59)),
        # month ends: day 31 skips the months without one
        ("0 0 0 31 * *", _at(2024, 1, 31), _at(2024, 3, 31)),
        ("0 0 0 31 * *", _at(2024, 3, 31), _at(2024, 5, 31)),
        ("0 0 0 30 * *", _at(2024, 1, 30), _at(2024, 3, 30)),
        # Feb 29 only in leap years (2100 is not one)
        ("0 0 0 29 2 *", _at(2023, 3, 1), _at(2024, 2, 29)),
        ("0 0 0 29 2 *", _at(2024, 2, 29), _at(2028, 2, 29)),
        ("0 0 0 29 2 *", _at(2096, 3, 1), _at(2104, 2, 29)),
        ("0 0 0 * 2 *", _at(2023, 2, 28), _at(2024, 2, 1)),  # no Feb 29 in 2023
        # day-of-month AND day-of-week, as NCrontab (Vixie cron would OR them): Friday the 13th
        ("0 0 12 13 * Fri", _at(2024, 1, 1), _at(2024, 9, 13, 12)),
        ("0 0 12 13 * Fri", _at(2024, 9, 13, 12), _at(2024, 12, 13, 12)),
        ("0 0 0 29 2 Mon", _at(2024, 3, 1), _at(2044, 2, 29)),
        # week days alone; five fields
        ("0 30 9 * * Mon-Fri", _at(2024, 3, 1, 9, 30), _at(2024, 3, 4, 9, 30)),  # Friday -> Monday
        ("30 9 * * Sat", _at(2024, 3, 1), _at(2024, 3, 2, 9, 30)),
    ],
)
def test_next_occurrence(expression: str, after: datetime, expected: datetime) -> None:
    assert _cron(expression).next_after(after) == expected


def test_schedule_that_never_fires_has_no_next_occurrence() -> None:
    assert _cron("0 0 0 30 2 *").next_after(_at(2024, 1, 1)) is None
    assert _cron("0 0 0 31 4,6,9,11 *").next_after(_at(2024, 1, 1)) is None


def test_occurrences_step_through_a_leap_day() -> None:
    schedule = _cron("0 0 12 * * *")
    moments = [_at(2024, 2, 27, 12)]
    for _ in range(3):
        following = schedule.next_after(moments[-1])
        assert following is not None
        moments.append(following)
    assert [m.day for m in moments] == [27, 28, 29, 1]


# --- app settings and discovery -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "environ", "resolved"),
    [
        ("%TICK%", {"TICK": "0 */5 * * * *"}, "0 */5 * * * *"),
        ("0 %MIN% %HOUR% * * *", {"MIN": "30", "HOUR": "9"}, "0 30 9 * * *"),
        ("%tick%", {"TICK": "00:01:00"}, "00:01:00"),  # .NET configuration ignores case
        ("0 0 * * * *", {}, "0 0 * * * *"),
    ],
)
def test_resolves_app_setting_references(expression: str, environ: dict[str, str], resolved: str) -> None:
    assert resolve_settings(expression, environ) == resolved


@pytest.mark.parametrize(
    ("expression", "detail"), [("%MISSING%", "'MISSING', which is not set"), ("%TICK", "without its closing")]
)
def test_unresolvable_settings_are_errors(expression: str, detail: str) -> None:
    with pytest.raises(ScheduleError, match=detail):
        resolve_settings(expression, {"TICK": "* * * * * *"})


@pytest.mark.parametrize(
    ("environ", "disabled"),
    [
        ({"AzureWebJobs.tick.Disabled": "true"}, True),
        ({"AzureWebJobs.tick.Disabled": "True"}, True),
        ({"AzureWebJobs.tick.Disabled": "1"}, True),
        ({"AzureWebJobs_tick_Disabled": "true"}, True),  # the Linux spelling
        ({"azurewebjobs.TICK.disabled": "true"}, True),
        ({"AzureWebJobs.tick.Disabled": "false"}, False),
        ({"AzureWebJobs.tick.Disabled": "0"}, False),
        ({"AzureWebJobs.tick.Disabled": "yes"}, False),  # the host takes only true and 1
        ({"AzureWebJobs.other.Disabled": "true"}, False),
        ({}, False),
    ],
)
def test_disabled_setting(environ: dict[str, str], disabled: bool) -> None:
    assert is_disabled("tick", environ) is disabled


def _app() -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.timer_trigger(schedule="%TICK_SCHEDULE%", arg_name="mytimer", run_on_startup=True, use_monitor=False)
    def tick(mytimer: func.TimerRequest) -> None:
        pass

    @app.function_name("reconcile")
    @app.schedule(schedule="00:10:00", arg_name="timer")
    async def reconcile_jobs(timer: func.TimerRequest) -> None:
        pass

    @app.timer_trigger(schedule="0 0 0 * * 7", arg_name="timer")
    def broken(timer: func.TimerRequest) -> None:
        pass

    @app.timer_trigger(schedule="%NOT_SET%", arg_name="timer")
    def unset(timer: func.TimerRequest) -> None:
        pass

    @app.route(route="health")
    def health(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("ok")

    return app


def test_discovers_timer_functions_from_a_function_app(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"TICK_SCHEDULE": "*/10 * * * * *", "AzureWebJobs.reconcile.Disabled": "true"}
    timers = {t.function_name: t for t in timers_of(_app(), environ)}
    assert set(timers) == {"tick", "reconcile"}  # not the HTTP function, not the ones in error
    tick, reconcile = timers["tick"], timers["reconcile"]
    assert (tick.declared, tick.schedule.expression) == ("%TICK_SCHEDULE%", "*/10 * * * * *")
    assert tick.binding_name == "mytimer"
    assert (tick.run_on_startup, tick.use_monitor, tick.disabled) == (True, False, False)
    assert reconcile.schedule == ConstantSchedule("00:10:00", timedelta(minutes=10))
    assert (reconcile.run_on_startup, reconcile.use_monitor, reconcile.disabled) == (False, True, True)
    errors = {getattr(r, "function", None): r.getMessage() for r in _logged(caplog, "timer_invalid")}
    assert set(errors) == {"broken", "unset"}
    assert "The 'broken' function is in error" in errors["broken"]
    assert "'NOT_SET'" in errors["unset"]


def test_routes_and_timers_share_one_indexing_of_the_app() -> None:
    app = IndexedApp(_app())  # FunctionApp.get_functions() refuses a second call
    assert [route.function_name for route in routes_of(app)] == ["health"]
    assert {t.function_name for t in timers_of(app, {"TICK_SCHEDULE": EVERY_SECOND})} == {"tick", "reconcile"}


# --- the scheduler, on the real clock -------------------------------------------------------------------------------


class Calls:
    """What a timer function saw: when each invocation started and ended, its request, the most running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[datetime] = []
        self.ended: list[datetime] = []
        self.requests: list[func.TimerRequest] = []
        self.threads: list[str] = []
        self.running = 0
        self.most_running = 0

    def enter(self, request: func.TimerRequest) -> int:
        with self.lock:
            self.started.append(datetime.now(UTC))
            self.requests.append(request)
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            return len(self.started)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1
            self.ended.append(datetime.now(UTC))

    def count(self, at_least: int) -> Callable[[], bool]:
        return lambda: len(self.ended) >= at_least


def _timer(
    function: Callable[..., object], schedule: str = EVERY_SECOND, run_on_startup: bool = False, name: str = "tick"
) -> TimerFunction:
    return TimerFunction(
        function_name=name,
        declared=schedule,
        schedule=parse_schedule(schedule),
        binding_name="mytimer",
        run_on_startup=run_on_startup,
        use_monitor=False,
        disabled=False,
        user_function=function,
    )


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    event_loop = EventLoopThread()
    yield event_loop
    event_loop.close()


@pytest.fixture
def run_scheduler(loop: EventLoopThread) -> Iterator[Callable[..., TimerScheduler]]:
    started: list[TimerScheduler] = []

    def run(*timers: TimerFunction) -> TimerScheduler:
        scheduler = TimerScheduler(timers, loop)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield run
    for scheduler in started:
        scheduler.stop(5)


@pytest.mark.parametrize("schedule", [EVERY_SECOND, "00:00:01"])
def test_runs_a_function_on_its_schedule(
    run_scheduler: Callable[..., TimerScheduler], caplog: pytest.LogCaptureFixture, schedule: str
) -> None:
    caplog.set_level(logging.INFO, logger="local.functions_host")
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    scheduler = run_scheduler(_timer(tick, schedule))
    assert _wait_for(calls.count(2), timeout=3.5)
    assert scheduler.stop(2)
    gap = (calls.started[1] - calls.started[0]).total_seconds()
    assert 0.8 < gap < 1.3
    if schedule == EVERY_SECOND:
        assert all(moment.microsecond < 300_000 for moment in calls.started)  # on the second, not whenever
    assert all(isinstance(r, WorkerTimerRequest) and r.past_due is False for r in calls.requests)
    first = calls.requests[0]
    assert isinstance(first, WorkerTimerRequest)
    assert (first.schedule, first.schedule_status) == ({"AdjustForDST": schedule == EVERY_SECOND}, {})
    actions = [getattr(r, "action", None) for r in caplog.records if getattr(r, "function", None) == "tick"]
    assert actions[:4] == ["timer_started", "timer_succeeded"] * 2
    assert "Executed 'Functions.tick' (Succeeded" in caplog.text
    count = len(calls.ended)
    time.sleep(1.2)
    assert len(calls.ended) == count  # stopped means stopped


def test_coroutine_functions_run_on_the_shared_event_loop(run_scheduler: Callable[..., TimerScheduler]) -> None:
    calls = Calls()

    async def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    run_scheduler(_timer(tick, YEARLY, run_on_startup=True))
    assert _wait_for(calls.count(1), timeout=2)
    assert calls.threads == ["functions-host-loop"]


def test_run_on_startup_invokes_once_at_start(run_scheduler: Callable[..., TimerScheduler]) -> None:
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    started = datetime.now(UTC)
    run_scheduler(_timer(tick, YEARLY, run_on_startup=True))
    assert _wait_for(calls.count(1), timeout=2)
    assert (calls.started[0] - started).total_seconds() < 0.5
    assert calls.requests[0].past_due is False
    time.sleep(0.5)
    assert len(calls.started) == 1


def test_an_overrun_neither_overlaps_nor_piles_up(run_scheduler: Callable[..., TimerScheduler]) -> None:
    """Like the host: the occurrences an overrun missed collapse into one invocation, at once and not past due."""
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        if calls.enter(mytimer) == 1:
            time.sleep(2.3)  # due at T, runs past T+1 and T+2
        calls.leave()

    run_scheduler(_timer(tick))
    assert _wait_for(calls.count(3), timeout=5)
    assert calls.most_running == 1
    assert (calls.started[1] - calls.ended[0]).total_seconds() < 0.2  # one catch-up for T+1 and T+2, at once
    assert calls.started[2].microsecond < 300_000  # then back on the schedule, at T+3
    assert round((calls.started[2] - calls.started[0]).total_seconds()) == 3
    assert [r.past_due for r in calls.requests[:3]] == [False, False, False]


def test_an_exception_is_logged_and_the_schedule_goes_on(
    run_scheduler: Callable[..., TimerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        number = calls.enter(mytimer)
        calls.leave()
        if number == 1:
            raise RuntimeError("reconcile failed")

    run_scheduler(_timer(tick, run_on_startup=True))
    assert _wait_for(calls.count(2), timeout=2.5)
    failed = _logged(caplog, "timer_failed")
    assert len(failed) == 1
    assert getattr(failed[0], "function", None) == "tick"
    assert failed[0].exc_info is not None
    assert "reconcile failed" in str(failed[0].exc_info[1])


def test_disabled_functions_do_not_run(run_scheduler: Callable[..., TimerScheduler]) -> None:
    calls = Calls()
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.timer_trigger(schedule=EVERY_SECOND, arg_name="mytimer", run_on_startup=True)
    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    timers = timers_of(app, {"AzureWebJobs.tick.Disabled": "true"})
    scheduler = run_scheduler(*timers)
    assert [t.function_name for t in timers] == ["tick"]
    assert scheduler.timers == []
    time.sleep(1.2)
    assert calls.started == []


def test_stop_waits_for_a_running_invocation(run_scheduler: Callable[..., TimerScheduler]) -> None:
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        time.sleep(0.5)
        calls.leave()

    scheduler = run_scheduler(_timer(tick, YEARLY, run_on_startup=True))
    assert _wait_for(lambda: bool(calls.started), timeout=1)
    assert scheduler.stop(3) is True
    assert len(calls.ended) == 1


def test_stop_gives_up_after_its_timeout(
    run_scheduler: Callable[..., TimerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    release = threading.Event()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        release.wait(5)
        calls.leave()

    scheduler = run_scheduler(_timer(tick, YEARLY, run_on_startup=True))
    assert _wait_for(lambda: bool(calls.started), timeout=1)
    assert scheduler.stop(0.2) is False
    assert len(_logged(caplog, "timer_stop_timeout")) == 1
    release.set()
    assert scheduler.stop(3) is True
