"""Timer schedules as the Functions host parses them: NCRONTAB expressions, or a TimeSpan for a constant interval.

The host's timer extension (``TimerSchedule.Create`` in azure-webjobs-sdk-extensions) tries NCrontab first, with six
fields ``{second} {minute} {hour} {day} {month} {day-of-week}`` (five fields are accepted too, second 0), then
``TimeSpan.TryParse`` (``hh:mm[:ss[.fffffff]]``, ``d.hh:mm:ss``, or ``d`` days; Azure honours it on App Service plans
only). Anything else is refused with an error that names the expression.

NCrontab's fields: ``*``, values, ranges ``a-b`` (a reversed range is swapped), lists ``a,b``, steps ``*/n``, ``a-b/n``
and ``a/n`` (a to the field's maximum), months and week days by name or any prefix of one (``Jan``, ``Mon``, ``Thu``),
week days 0-6 with 0 = Sunday (NCrontab refuses 7, so this parser does too). Unlike Vixie cron, when both day fields
are restricted a day must match both: NCrontab finds the next day of the month, then checks its week day. Stricter
than NCrontab: a step of 0 is an error here (NCrontab quietly reads it as 1).

Occurrences are computed in the time zone of the moment given (the scheduler uses UTC, the host's default; its
``WEBSITE_TIME_ZONE`` is not honoured), to whole seconds, strictly after that moment, as NCrontab does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import ClassVar

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_NUMBER = re.compile(r"[0-9]+")
_TIMESPAN = re.compile(
    r"\s*(?P<sign>-)?(?:(?P<d>[0-9]+)\.)?(?P<h>[0-9]+):(?P<m>[0-9]+)(?::(?P<s>[0-9]+)(?:\.(?P<f>[0-9]{1,7}))?)?\s*"
)
_TIMESPAN_DAYS = re.compile(r"\s*(?P<sign>-)?(?P<d>[0-9]+)\s*")
_SIX = "not 6 ({second} {minute} {hour} {day} {month} {day-of-week}) or 5 (without seconds)"
_HORIZON_YEARS = 400  # the Gregorian calendar repeats every 400 years: nothing in that span means never


class ScheduleError(ValueError):
    """A schedule expression the Functions host would refuse."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()

    def value(self, token: str) -> int:
        if _NUMBER.fullmatch(token):
            number = int(token)
            if not self.low <= number <= self.high:
                hint = " (NCrontab has no 7 for Sunday: use 0)" if self.names == _WEEKDAYS and number == 7 else ""
                raise ValueError(f"{number} is outside {self.low}-{self.high}{hint}")
            return number
        for index, name in enumerate(self.names):  # NCrontab: the first name that the token is a prefix of
            if token and name.lower().startswith(token.lower()):
                return self.low + index
        raise ValueError(f"{token!r} is not a number" + (f" or a name ({', '.join(self.names)})" if self.names else ""))

    def parse(self, text: str) -> frozenset[int]:
        values: set[int] = set()
        for part in text.split(","):
            base, slash, step_text = part.partition("/")
            step = int(step_text) if _NUMBER.fullmatch(step_text) else 0
            if slash and step < 1:
                raise ValueError(f"step {step_text!r} is not a whole number of at least 1")
            if base == "*":
                low, high = self.low, self.high
            elif "-" in base[1:]:
                first, _, last = base.partition("-")
                low, high = sorted((self.value(first), self.value(last)))
            else:
                low = self.value(base)
                high = self.high if slash else low
            values.update(range(low, high + 1, step or 1))
        return frozenset(values)


_FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 6, _WEEKDAYS),
)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    adjust_for_dst: ClassVar[bool] = True  # what the host reports in TimerRequest.schedule["AdjustForDST"]

    def _day_matches(self, day: date) -> bool:
        return day.day in self.days and day.isoweekday() % 7 in self.weekdays

    def next_after(self, moment: datetime) -> datetime | None:
        """The first occurrence after ``moment`` (whole seconds, same time zone); None if the schedule never fires."""
        t = moment.replace(microsecond=0) + timedelta(seconds=1)
        last_year = min(moment.year + _HORIZON_YEARS, 9998)
        while t.year <= last_year:
            if t.month not in self.months:
                t = t.replace(year=t.year + t.month // 12, month=t.month % 12 + 1, day=1, hour=0, minute=0, second=0)
            elif not self._day_matches(t.date()):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0, second=0)
            elif t.minute not in self.minutes:
                t = (t + timedelta(minutes=1)).replace(second=0)
            elif t.second not in self.seconds:
                t += timedelta(seconds=1)
            else:
                return t
        return None


@dataclass(frozen=True)
class ConstantSchedule:
    """A TimeSpan schedule: every ``interval`` after the previous invocation (or the start)."""

    expression: str
    interval: timedelta

    adjust_for_dst: ClassVar[bool] = False

    def next_after(self, moment: datetime) -> datetime | None:
        return moment + self.interval


Schedule = CronSchedule | ConstantSchedule


def parse_cron(expression: str) -> CronSchedule:
    """An NCRONTAB expression of six fields (or five, without seconds)."""
    tokens = expression.split()
    if len(tokens) not in (5, 6):
        raise ScheduleError(f"{expression!r} is not a valid NCRONTAB expression: it has {len(tokens)} fields, {_SIX}")
    if len(tokens) == 5:
        tokens.insert(0, "0")
    sets = []
    for field, text in zip(_FIELDS, tokens, strict=True):
        try:
            sets.append(field.parse(text))
        except ValueError as e:
            raise ScheduleError(f"{expression!r} is not a valid NCRONTAB expression: {field.name} {text!r}: {e}") from e
    return CronSchedule(expression, *sets)


def parse_timespan(expression: str) -> timedelta | None:
    """``TimeSpan.TryParse``'s invariant formats; None when ``expression`` is not one (or is out of range)."""
    found = _TIMESPAN.fullmatch(expression) or _TIMESPAN_DAYS.fullmatch(expression)
    if found is None:
        return None
    parts = found.groupdict()
    hours, minutes, seconds = (int(parts.get(k) or 0) for k in ("h", "m", "s"))
    if hours > 23 or minutes > 59 or seconds > 59:
        return None
    fraction = int((parts.get("f") or "0").ljust(7, "0")) / 10_000_000
    try:
        span = timedelta(days=int(parts["d"] or 0), hours=hours, minutes=minutes, seconds=seconds + fraction)
    except OverflowError:
        return None
    return -span if parts["sign"] else span


def parse_schedule(expression: str) -> Schedule:
    """NCRONTAB when ``expression`` has 5 or 6 fields, else a TimeSpan interval, as the host tries them."""
    if len(expression.split()) in (5, 6):
        return parse_cron(expression)
    interval = parse_timespan(expression)
    if interval is None:
        fields = len(expression.split())
        raise ScheduleError(f"{expression!r} is neither a TimeSpan (hh:mm:ss) nor NCRONTAB ({fields} fields, {_SIX})")
    if interval <= timedelta(0):
        raise ScheduleError(f"{expression!r} is a TimeSpan of zero or less: a timer's interval must be positive")
    return ConstantSchedule(expression, interval)
