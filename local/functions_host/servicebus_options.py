"""The Service Bus trigger's options from ``host.json`` (``extensions.serviceBus``), read as extension 5.x reads them.

| option | default | here |
|---|---|---|
| ``maxConcurrentCalls`` | 16 x the processor count | invocations at once, per function |
| ``autoCompleteMessages`` | true | complete on return; false leaves a message that ran to its lock |
| ``maxAutoLockRenewalDuration`` | ``00:05:00`` | how long a running message's lock is renewed; ``00:00:00`` never |
| ``prefetchCount`` | 0 | not used: the listener asks for one message per free slot and never prefetches |

The 2.x/3.x (``messageHandlerOptions``) spellings are still read, as the extension reads them, and the top-level
names override them: ``messageHandlerOptions.maxConcurrentCalls``, ``messageHandlerOptions.autoComplete`` (else
``sessionHandlerOptions.autoComplete``, else ``batchOptions.autoComplete``) and
``messageHandlerOptions.maxAutoRenewDuration`` (else ``sessionHandlerOptions.maxAutoRenewDuration``). Other keys
under ``messageHandlerOptions`` (``maxAutoLockRenewalDuration``, ``autoCompleteMessages``) are ignored by the host, and
a warning says so. Keys are matched ignoring case, values may be JSON strings, as .NET configuration binds them; an
invalid value stops the host from starting, as it does the real one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from local.functions_host.ncrontab import parse_timespan

logger = logging.getLogger(__name__)

_LEGACY_HANDLER_KEYS = {"autocomplete", "maxautorenewduration", "maxconcurrentcalls"}


class HostJsonError(ValueError):
    """An ``extensions.serviceBus`` value the host cannot bind."""


@dataclass(frozen=True)
class ServiceBusOptions:
    max_concurrent_calls: int
    auto_complete_messages: bool = True
    max_auto_lock_renewal_duration: timedelta = timedelta(minutes=5)
    prefetch_count: int = 0


def processor_count() -> int:
    """The processors this process may use (.NET's ``Environment.ProcessorCount`` honours the affinity mask too)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _child(section: Mapping[str, Any], key: str) -> Any:
    return next((value for name, value in section.items() if name.lower() == key.lower()), None)


def _section(section: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    child = _child(section, key)
    return child if isinstance(child, Mapping) else {}


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return value if isinstance(value, bool) else str(value).lower() == "true"
    raise HostJsonError(f"{where}: {value!r} is not a boolean")


def _int(value: Any, where: str, minimum: int) -> int:
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        raise HostJsonError(f"{where}: {value!r} is not an integer") from None
    if number < minimum:
        raise HostJsonError(f"{where}: {number} is less than {minimum}")
    return number


def _timespan(value: Any, where: str) -> timedelta:
    span = parse_timespan(str(value))
    if span is None or span < timedelta(0):
        raise HostJsonError(f"{where}: {value!r} is not a TimeSpan of zero or more (hh:mm:ss)")
    return span


def _first(*candidates: tuple[Mapping[str, Any], str]) -> tuple[Any, str] | None:
    """The first ``(section, key)`` that is set, as ``(value, key)``."""
    for section, key in candidates:
        if (value := _child(section, key)) is not None:
            return value, key
    return None


def parse_servicebus_options(config: Mapping[str, Any], processors: int) -> ServiceBusOptions:
    """The options from a parsed ``host.json`` document."""
    root = _section(_section(config, "extensions"), "serviceBus")
    handler, sessions = _section(root, "messageHandlerOptions"), _section(root, "sessionHandlerOptions")
    for key in handler:
        if key.lower() not in _LEGACY_HANDLER_KEYS:
            logger.warning(
                "host.json extensions.serviceBus.messageHandlerOptions.%s is not read by the host; "
                "set extensions.serviceBus.%s instead",
                key,
                key,
                extra={"action": "host_json_ignored"},
            )
    where = "host.json extensions.serviceBus"
    options = ServiceBusOptions(max_concurrent_calls=16 * processors)
    found = _first((root, "maxConcurrentCalls"), (handler, "maxConcurrentCalls"))
    calls = options.max_concurrent_calls if found is None else _int(found[0], f"{where} {found[1]}", 1)
    found = _first(
        (root, "autoCompleteMessages"),
        (handler, "autoComplete"),
        (sessions, "autoComplete"),
        (_section(root, "batchOptions"), "autoComplete"),
    )
    complete = options.auto_complete_messages if found is None else _bool(found[0], f"{where} {found[1]}")
    found = _first(
        (root, "maxAutoLockRenewalDuration"),
        (handler, "maxAutoRenewDuration"),
        (sessions, "maxAutoRenewDuration"),
    )
    renewal = options.max_auto_lock_renewal_duration if found is None else _timespan(found[0], f"{where} {found[1]}")
    prefetch = _child(root, "prefetchCount")
    return ServiceBusOptions(
        max_concurrent_calls=calls,
        auto_complete_messages=complete,
        max_auto_lock_renewal_duration=renewal,
        prefetch_count=0 if prefetch is None else _int(prefetch, f"{where} prefetchCount", 0),
    )


def load_servicebus_options(host_json: Path, processors: int | None = None) -> ServiceBusOptions:
    """``parse_servicebus_options`` of ``host_json``; the defaults when the file is absent."""
    config: Mapping[str, Any] = json.loads(host_json.read_text(encoding="utf-8")) if host_json.exists() else {}
    return parse_servicebus_options(config, processors if processors is not None else processor_count())
