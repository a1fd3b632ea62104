"""The timer-triggered functions of a v2 ``FunctionApp``, read from each function's ``timerTrigger`` binding.

``@app.timer_trigger(schedule=..., arg_name=..., run_on_startup=..., use_monitor=...)`` writes
``{"type": "timerTrigger", "name": arg_name, "schedule": ..., "runOnStartup": ..., "useMonitor": ...}``, the last two
only when given (the host's defaults: false and true). As on the host, ``use_monitor`` is turned off for schedules
that fire more than once a minute (``monitor.too_frequent_to_monitor``), ``%NAME%`` references in the schedule are
replaced by app settings (here: the environment), and ``AzureWebJobs.<function>.Disabled`` (or the Linux spelling
``AzureWebJobs_<function>_Disabled``) set to ``true`` or ``1`` disables a function. App setting names are matched
case-insensitively, as .NET configuration matches them. A function whose schedule is invalid or names a missing
setting is logged as in error and left out; the others still run, as on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from local.functions_host.bindings import (
    UnresolvedSetting,
    is_disabled,
    resolve_app_settings,
    trigger_binding,
)
from local.functions_host.monitor import too_frequent_to_monitor
from local.functions_host.ncrontab import Schedule, ScheduleError, parse_schedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimerFunction:
    function_name: str
    declared: str  # the schedule as the binding has it, before %NAME% references are resolved
    schedule: Schedule
    binding_name: str
    run_on_startup: bool
    use_monitor: bool  # after the host's frequency rule
    disabled: bool
    user_function: Callable[..., Any]


def resolve_settings(expression: str, environ: Mapping[str, str]) -> str:
    """``expression`` with each ``%NAME%`` replaced by the app setting ``NAME``."""
    try:
        return resolve_app_settings(expression, environ)
    except UnresolvedSetting as e:
        if e.name is None:
            raise ScheduleError(f"schedule {expression!r} has a '%' without its closing '%'") from None
        raise ScheduleError(f"schedule {expression!r} names app setting {e.name!r}, which is not set") from None


def timers_of(app: Any, environ: Mapping[str, str], now: datetime | None = None) -> list[TimerFunction]:
    """The timer-triggered functions of a v2 ``FunctionApp`` (other triggers are ignored)."""
    now = now or datetime.now(UTC)
    timers = []
    for function in app.get_functions():
        trigger = trigger_binding(function, "timerTrigger")
        if trigger is None:
            continue
        name = function.get_function_name()
        declared = str(trigger.get("schedule", ""))
        try:
            schedule = parse_schedule(resolve_settings(declared, environ))
        except ScheduleError as e:
            fields = {"action": "timer_invalid", "function": name}
            logger.error("The '%s' function is in error: %s", name, e, extra=fields)
            continue
        use_monitor = bool(trigger.get("useMonitor", True))
        if use_monitor and too_frequent_to_monitor(schedule, now):
            logger.debug("timer %s: UseMonitor changed to false based on schedule frequency", name)
            use_monitor = False
        timers.append(
            TimerFunction(
                function_name=name,
                declared=declared,
                schedule=schedule,
                binding_name=trigger.get("name", "timer"),
                run_on_startup=bool(trigger.get("runOnStartup", False)),
                use_monitor=use_monitor,
                disabled=is_disabled(name, environ),
                user_function=function.get_user_function(),
            )
        )
    return timers
