"""Timer triggers of the local Functions host: schedules, discovery from a FunctionApp, scheduling on a real clock."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest as WorkerTimerRequest

from local.functions_host.__main__ import IndexedApp
from local.functions_host.bindings import is_disabled
from local.functions_host.invoke import EventLoopThread
from local.functions_host.monitor import (
    NEVER,
    ScheduleStatus,
    after_invocation,
    check_past_due,
    isoformat,
    too_frequent_to_monitor,
)
from local.functions_host.ncrontab import ConstantSchedule, CronSchedule, ScheduleError, parse_schedule
from local.functions_host.routes import routes_of
from local.functions_host.scheduler import TimerScheduler
from local.functions_host.status_files import StatusFiles
from local.functions_host.timers import TimerFunction, resolve_settings, timers_of

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


@pytest.mark.parametrize(
    ("schedule", "use_monitor", "monitored"),
    [
        ("0 */5 * * * *", None, True),  # the host's default
        ("0 */5 * * * *", False, False),
        ("*/10 * * * * *", True, False),  # more than once a minute: off, even when asked for (the host cannot tell)
        ("0 * * * * *", True, True),
        ("00:00:30", True, False),
        ("00:01:00", None, True),
    ],
)
def test_use_monitor_follows_the_binding_and_the_hosts_frequency_rule(
    schedule: str, use_monitor: bool | None, monitored: bool
) -> None:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.timer_trigger(schedule=schedule, arg_name="timer", use_monitor=use_monitor)
    def tick(timer: func.TimerRequest) -> None:
        pass

    [timer] = timers_of(app, {})
    assert timer.use_monitor is monitored


# --- the schedule monitor's decisions --------------------------------------------------------------------------------

NOW = _at(2024, 5, 1, 12, 0, 0, 250_000)


@pytest.mark.parametrize(
    ("expression", "too_frequent"),
    [
        (EVERY_SECOND, True),
        ("*/30 * * * * *", True),
        ("0,1 * * * * *", True),
        ("0-59 * * * * *", True),  # a full range is "*" to NCrontab
        ("0 * * * * *", False),  # exactly once a minute
        ("* * * * *", False),  # five fields: second 0
        ("* 0 * * * *", False),  # every second of minute 0: the host only counts when minute and above are "*"
        ("*/10 * * * 1 *", False),
        ("00:00:59", True),
        ("00:01:00", False),
    ],
)
def test_too_frequent_to_monitor(expression: str, too_frequent: bool) -> None:
    assert too_frequent_to_monitor(parse_schedule(expression), NOW) is too_frequent


def test_a_first_start_records_the_next_occurrence_and_is_not_past_due() -> None:
    startup = check_past_due(None, _cron(YEARLY), NOW)
    assert startup.past_due is False
    assert startup.record == ScheduleStatus(NEVER, _at(2025, 1, 1), NOW)
    assert startup.status == ScheduleStatus(NEVER, _at(2025, 1, 1), NEVER)  # what the host's listener holds


@pytest.mark.parametrize(
    ("recorded", "past_due"),
    [
        (ScheduleStatus(_at(2024, 1, 1), _at(2025, 1, 1), _at(2024, 1, 1)), False),
        (ScheduleStatus(_at(2023, 1, 1), _at(2024, 1, 1), _at(2023, 1, 1)), True),  # down over 2024-01-01
        (ScheduleStatus(NEVER, _at(2024, 1, 1), _at(2023, 6, 1)), True),  # never fired: Next came from LastUpdated
        (ScheduleStatus(NEVER, _at(2025, 1, 1), _at(2024, 4, 1)), False),
    ],
)
def test_past_due_when_the_recorded_next_has_passed(recorded: ScheduleStatus, past_due: bool) -> None:
    startup = check_past_due(recorded, _cron(YEARLY), NOW)
    assert (startup.past_due, startup.status, startup.record) == (past_due, recorded, None)


def test_a_changed_schedule_recomputes_next_and_is_past_due_only_once_that_passes() -> None:
    half_past = _cron("0 30 * * * *")  # was yearly: Next no longer follows from Last
    recorded = ScheduleStatus(_at(2024, 5, 1, 11, 45), _at(2025, 1, 1), _at(2024, 5, 1, 11, 45))
    startup = check_past_due(recorded, half_past, NOW)
    expected = ScheduleStatus(NEVER, _at(2024, 5, 1, 12, 30), _at(2024, 5, 1, 11, 45))
    assert (startup.past_due, startup.status, startup.record) == (False, expected, expected)
    later = check_past_due(expected, half_past, _at(2024, 5, 1, 13))  # down over 12:30
    assert (later.past_due, later.status, later.record) == (True, expected, None)


def test_a_changed_schedule_whose_next_has_passed_starts_from_now() -> None:
    recorded = ScheduleStatus(_at(2024, 1, 1), _at(2025, 1, 1), _at(2024, 1, 1))
    startup = check_past_due(recorded, _cron("0 0 12 * * *"), NOW)  # from Last: 2024-01-01 12:00, long past
    expected = ScheduleStatus(NEVER, _at(2024, 5, 2, 12), NOW)
    assert (startup.past_due, startup.status, startup.record) == (False, expected, expected)


def test_a_status_without_times_starts_from_now() -> None:
    startup = check_past_due(ScheduleStatus(NEVER, _at(2020, 1, 1), NEVER), _cron(YEARLY), NOW)
    assert (startup.past_due, startup.record) == (False, ScheduleStatus(NEVER, _at(2025, 1, 1), NOW))


@pytest.mark.parametrize(
    ("fired", "scheduled", "last"),
    [
        (_at(2024, 5, 1, 12, 0, 1), True, _at(2024, 5, 1, 12, 0, 1)),
        (_at(2024, 5, 1, 11, 59, 59, 900_000), True, _at(2024, 5, 1, 12)),  # early: as if on time
        (_at(2024, 5, 1, 11, 59, 59, 900_000), False, _at(2024, 5, 1, 11, 59, 59, 900_000)),  # past due, on startup
    ],
)
def test_the_status_after_an_invocation(fired: datetime, scheduled: bool, last: datetime) -> None:
    status = ScheduleStatus(_at(2024, 5, 1, 11), _at(2024, 5, 1, 12), _at(2024, 5, 1, 11))
    hourly = _cron("0 0 * * * *")
    assert after_invocation(status, hourly, fired, scheduled) == ScheduleStatus(last, hourly.next_after(last), last)


def test_status_json_is_the_hosts() -> None:
    status = ScheduleStatus(NEVER, _at(2024, 5, 1, 12), NOW)
    as_json = {"Last": "0001-01-01T00:00:00+00:00", "Next": "2024-05-01T12:00:00+00:00"}
    assert status.as_json() == {**as_json, "LastUpdated": "2024-05-01T12:00:00.25+00:00"}
    assert ScheduleStatus.from_json(status.as_json()) == status
    written_by_dotnet = {**as_json, "Next": "2024-05-01T14:00:00+02:00", "LastUpdated": "2024-05-01T12:00:00.2500000Z"}
    assert ScheduleStatus.from_json(written_by_dotnet) == status
    assert isoformat(_at(2024, 5, 1, 12, 0, 0, 120)) == "2024-05-01T12:00:00.00012+00:00"


@pytest.mark.parametrize(
    "data", [[], {}, {"Last": "x", "Next": None, "LastUpdated": "y"}, {"Last": 1, "LastUpdated": "2024-01-01"}]
)
def test_malformed_status_json_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match=r"not an object|isoformat"):
        ScheduleStatus.from_json(data)


def test_status_files_round_trip_and_leave_no_temporary_files(tmp_path: Path) -> None:
    files = StatusFiles(tmp_path)
    assert files.read("tick") is None
    status = ScheduleStatus(_at(2024, 1, 1), _at(2025, 1, 1), NOW)
    files.write("tick", status)
    files.write("tick", status)
    assert files.read("tick") == status
    assert json.loads((tmp_path / "timers" / "tick.json").read_text()) == status.as_json()
    assert [p.name for p in (tmp_path / "timers").iterdir()] == ["tick.json"]


def test_an_unreadable_status_is_logged_and_taken_as_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = StatusFiles(tmp_path)
    files.directory.mkdir()
    files.path("tick").write_text('{"Last": ')
    assert files.read("tick") is None
    assert [getattr(r, "function", None) for r in _logged(caplog, "timer_status_unreadable")] == ["tick"]


def test_a_failed_status_write_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")
    StatusFiles(tmp_path / "state").write("tick", ScheduleStatus(NEVER, None, NOW))
    assert len(_logged(caplog, "timer_status_write_failed")) == 1


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
    function: Callable[..., object],
    schedule: str = EVERY_SECOND,
    run_on_startup: bool = False,
    name: str = "tick",
    use_monitor: bool = False,
) -> TimerFunction:
    return TimerFunction(
        function_name=name,
        declared=schedule,
        schedule=parse_schedule(schedule),
        binding_name="mytimer",
        run_on_startup=run_on_startup,
        use_monitor=use_monitor,
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

    def run(*timers: TimerFunction, statuses: StatusFiles | None = None) -> TimerScheduler:
        scheduler = TimerScheduler(timers, loop, statuses=statuses)
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


# --- the schedule monitor, on the real clock -------------------------------------------------------------------------


def _status_of(request: func.TimerRequest) -> dict[str, str | None]:
    assert isinstance(request, WorkerTimerRequest)
    return request.schedule_status


def _record(
    files: StatusFiles, name: str, last: datetime, next_: datetime | None, updated: datetime
) -> dict[str, str | None]:
    status = ScheduleStatus(last, next_, updated)
    files.write(name, status)
    return status.as_json()


def test_past_due_at_startup_runs_at_once_and_instead_of_run_on_startup(
    tmp_path: Path, run_scheduler: Callable[..., TimerScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="local.functions_host")
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    files = StatusFiles(tmp_path)
    recorded = _record(files, "tick", _at(2020, 1, 1), _at(2021, 1, 1), _at(2020, 1, 1))  # down since
    started = datetime.now(UTC)
    run_scheduler(_timer(tick, YEARLY, run_on_startup=True, use_monitor=True), statuses=files)
    assert _wait_for(calls.count(1), timeout=2)
    assert (calls.started[0] - started).total_seconds() < 0.5
    request = calls.requests[0]
    assert (request.past_due, _status_of(request)) == (True, recorded)  # the status it missed
    time.sleep(0.3)
    assert len(calls.started) == 1  # past due, not run on startup as well
    after = files.read("tick")
    assert after is not None
    assert abs((after.last - calls.started[0]).total_seconds()) < 0.1
    assert (after.next, after.last_updated) == (_cron(YEARLY).next_after(after.last), after.last)
    assert [getattr(r, "function", None) for r in _logged(caplog, "timer_past_due")] == ["tick"]


def test_not_past_due_when_the_recorded_next_is_ahead(
    tmp_path: Path, run_scheduler: Callable[..., TimerScheduler]
) -> None:
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    files = StatusFiles(tmp_path)
    now = datetime.now(UTC)
    this_year, next_year = _at(now.year, 1, 1), _at(now.year + 1, 1, 1)
    recorded = _record(files, "tick", this_year, next_year, this_year)
    run_scheduler(_timer(tick, YEARLY, use_monitor=True), statuses=files)
    time.sleep(0.5)
    assert calls.started == []
    assert json.loads(files.path("tick").read_text()) == recorded


def test_a_monitored_timer_records_its_status_after_each_run(
    tmp_path: Path, run_scheduler: Callable[..., TimerScheduler]
) -> None:
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    files = StatusFiles(tmp_path)
    before = datetime.now(UTC)
    scheduler = run_scheduler(_timer(tick, use_monitor=True), statuses=files)
    first = files.read("tick")  # recorded by start(), before any invocation
    assert first is not None
    assert first.last == NEVER
    assert 0 <= (first.last_updated - before).total_seconds() < 0.5
    assert _wait_for(calls.count(2), timeout=3.5)
    assert scheduler.stop(2)
    never = "0001-01-01T00:00:00+00:00"
    status_seen = [_status_of(r) for r in calls.requests]
    assert (status_seen[0]["Last"], status_seen[0]["LastUpdated"]) == (never, never)  # as the host's listener holds
    assert status_seen[0]["Next"] == first.as_json()["Next"]
    seen_second = ScheduleStatus.from_json(status_seen[1])  # written after the first run
    assert abs((seen_second.last - calls.started[0]).total_seconds()) < 0.1
    assert seen_second.next == _cron(EVERY_SECOND).next_after(seen_second.last)
    last = files.read("tick")
    assert last is not None
    assert abs((last.last - calls.started[-1]).total_seconds()) < 0.1
    assert [r.past_due for r in calls.requests] == [False] * len(calls.requests)


def test_without_a_state_directory_there_is_no_monitor(
    tmp_path: Path, run_scheduler: Callable[..., TimerScheduler], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    calls = Calls()

    def tick(mytimer: func.TimerRequest) -> None:
        calls.enter(mytimer)
        calls.leave()

    run_scheduler(_timer(tick, YEARLY, run_on_startup=True, use_monitor=True))
    assert _wait_for(calls.count(1), timeout=2)
    assert (calls.requests[0].past_due, _status_of(calls.requests[0])) == (False, {})
    assert list(tmp_path.iterdir()) == []
