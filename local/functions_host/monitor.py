"""The schedule monitor's decisions (``useMonitor``), as the host's timer extension makes them.

Followed from azure-webjobs-sdk-extensions, ``src/WebJobs.Extensions/Extensions/Timers/``:
``Scheduling/ScheduleMonitor.cs`` (``CheckPastDueAsync``), ``Listener/TimerListener.cs`` (``StartAsync``,
``InvokeJobFunction``), ``Scheduling/TimerSchedule.cs`` (``Create``, ``ShouldDisableScheduleMonitor``),
``Scheduling/ScheduleStatus.cs`` and ``TimerInfo.cs``.

- A timer is monitored when its ``useMonitor`` is true (the default) unless it fires more than once a minute: a
  TimeSpan under a minute, or an NCRONTAB whose minute and coarser fields are all ``*`` with more than one
  occurrence in the next minute. The host turns the monitor off for those even when ``useMonitor`` is set
  explicitly (the attribute cannot tell).
- At startup a monitored timer's recorded status is checked. None yet: ``{Last: never, Next: next(now),
  LastUpdated: now}`` is recorded, not past due. Otherwise ``Next`` is recomputed from ``Last`` (else from
  ``LastUpdated``, else from now); when that differs from the recorded ``Next`` the schedule changed, and the status
  becomes ``{Last: never, Next: that, LastUpdated: the time it came from}``, with both moved to now when that
  ``Next`` is already past, so a changed schedule is never past due at once. Past due: now is after ``Next``.
- Past due wins over ``runOnStartup``: one invocation at startup either way, with ``IsPastDue`` only for the first.
- Each invocation (failed ones too) gets the status held before it (``schedule_status``, ``{}`` when unmonitored),
  then the status becomes ``{Last: t, Next: next(t), LastUpdated: t}``, t being when it was fired (moved up to the
  ``Next`` it served if it fired early). Monitored timers record that; the next occurrence is that ``Next``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from local.functions_host.ncrontab import ConstantSchedule, Schedule

NEVER = datetime.min.replace(tzinfo=UTC)  # the host's default(DateTime): "0001-01-01T00:00:00+00:00"
_EVERY = (("minutes", range(60)), ("hours", range(24)), ("days", range(1, 32)), ("months", range(1, 13)))
_KEYS = ("Last", "Next", "LastUpdated")


def isoformat(moment: datetime) -> str:
    """``moment`` in UTC as the host's JSON writes it: ``2024-05-01T12:00:00.25+00:00`` (no trailing zeros)."""
    moment = moment.astimezone(UTC)
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    whole = moment.replace(microsecond=0).isoformat()
    return f"{whole[:-6]}{fraction}{whole[-6:]}"


def parse_moment(text: str) -> datetime:
    """An ISO 8601 time (``Z``, offsets, up to 7 fractional digits as .NET writes them); UTC when it has no offset."""
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class ScheduleStatus:
    last: datetime
    next: datetime | None  # None: the schedule has no further occurrence
    last_updated: datetime

    def as_json(self) -> dict[str, str | None]:
        """``{"Last", "Next", "LastUpdated"}``: the stored status, and ``TimerRequest.schedule_status``."""
        values = (self.last, self.next, self.last_updated)
        return {key: None if value is None else isoformat(value) for key, value in zip(_KEYS, values, strict=True)}

    @classmethod
    def from_json(cls, data: Any) -> ScheduleStatus:
        """Raises ValueError when ``data`` is not such an object."""
        if not isinstance(data, dict) or not all(isinstance(data.get(key), str) for key in ("Last", "LastUpdated")):
            raise ValueError("not an object with Last, Next and LastUpdated times")
        upcoming = data.get("Next")
        if upcoming is not None and not isinstance(upcoming, str):
            raise ValueError("Next is not a time")
        return cls(
            parse_moment(data["Last"]),
            None if upcoming is None else parse_moment(upcoming),
            parse_moment(data["LastUpdated"]),
        )


@dataclass(frozen=True)
class Startup:
    status: ScheduleStatus  # held by the listener: the first invocation's schedule_status; its Next is when it runs
    past_due: bool
    record: ScheduleStatus | None  # to store now: a first status, or one for a changed schedule


def too_frequent_to_monitor(schedule: Schedule, now: datetime) -> bool:
    """``TimerSchedule.ShouldDisableScheduleMonitor``: True for schedules that fire more than once a minute."""
    if isinstance(schedule, ConstantSchedule):
        return schedule.interval < timedelta(minutes=1)
    if schedule.weekdays != frozenset(range(7)) or any(getattr(schedule, f) != frozenset(r) for f, r in _EVERY):
        return False
    end, moment, count = now + timedelta(minutes=1), now, 0
    while (found := schedule.next_after(moment)) is not None and found < end:
        count, moment = count + 1, found
    return count > 1


def unmonitored(schedule: Schedule, now: datetime) -> Startup:
    """The listener's status when nothing is recorded: ``Last`` and ``LastUpdated`` never, not past due."""
    return Startup(ScheduleStatus(NEVER, schedule.next_after(now), NEVER), past_due=False, record=None)


def check_past_due(recorded: ScheduleStatus | None, schedule: Schedule, now: datetime) -> Startup:
    """``ScheduleMonitor.CheckPastDueAsync`` and the status ``TimerListener.StartAsync`` keeps."""
    if recorded is None:
        first = ScheduleStatus(NEVER, schedule.next_after(now), now)
        return Startup(unmonitored(schedule, now).status, past_due=False, record=first)
    if recorded.last != NEVER:
        expected, since = schedule.next_after(recorded.last), recorded.last
    elif recorded.last_updated != NEVER:
        expected, since = schedule.next_after(recorded.last_updated), recorded.last_updated
    else:
        expected, since = schedule.next_after(now), now
    record = None
    if recorded.next != expected:  # the schedule changed since this was recorded
        if expected is not None and now > expected:
            expected, since = schedule.next_after(now), now
        recorded = record = ScheduleStatus(NEVER, expected, since)
    return Startup(recorded, past_due=recorded.next is not None and now > recorded.next, record=record)


def after_invocation(status: ScheduleStatus, schedule: Schedule, fired: datetime, scheduled: bool) -> ScheduleStatus:
    """The status after an invocation fired at ``fired`` (``scheduled``: neither past due nor run on startup)."""
    if scheduled and status.next is not None and status.next > fired:
        fired = status.next  # fired early: do not compute the same Next twice
    return ScheduleStatus(fired, schedule.next_after(fired), fired)
