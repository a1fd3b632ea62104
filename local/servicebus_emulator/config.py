"""The official Service Bus emulator's ``Config.json`` format, read into frozen queue definitions.

Only queues are supported (``UserConfig.Namespaces[].Queues[]``); topics are rejected with a clear error rather
than silently ignored. Every error names the offending field by its JSON path, e.g.
``UserConfig.Namespaces[0].Queues[1].Properties.LockDuration: not an ISO-8601 duration: '5 minutes'``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "STANDARD_MAX_MESSAGE_KIB",
    "ConfigError",
    "EmulatorConfig",
    "QueueConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]

_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_MAX_TTL = timedelta(days=10675199)  # TimeSpan.MaxValue, what the service uses for "never expires"
STANDARD_MAX_MESSAGE_KIB = 256  # the Standard tier's limit (the service's default SKU); Premium allows 1024-102400
_LARGEST_MAX_MESSAGE_KIB = 102400


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the field."""


@dataclass(frozen=True)
class QueueConfig:
    name: str
    lock_duration: timedelta = timedelta(minutes=1)
    max_delivery_count: int = 10
    default_message_time_to_live: timedelta = _MAX_TTL
    dead_lettering_on_message_expiration: bool = False
    requires_duplicate_detection: bool = False
    duplicate_detection_history_time_window: timedelta = timedelta(minutes=10)
    max_message_size_in_kilobytes: int = STANDARD_MAX_MESSAGE_KIB

    @property
    def max_message_size(self) -> int:
        """The largest message or batch a sender may send, in bytes (the link's max-message-size)."""
        return self.max_message_size_in_kilobytes * 1024


@dataclass(frozen=True)
class EmulatorConfig:
    namespace: str
    queues: tuple[QueueConfig, ...]


def parse_duration(text: str) -> timedelta:
    """Parse an ISO-8601 duration with days, hours, minutes and seconds (``P1D``, ``PT1M``, ``PT0.5S``)."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    parts = {name: float(value) for name, value in match.groupdict().items() if value is not None}
    return timedelta(**parts)


def _require(obj: Any, key: str, kind: type, path: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{path}.{key}: missing")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _duration(props: dict[str, Any], key: str, path: str, default: timedelta) -> timedelta:
    if key not in props:
        return default
    try:
        value = parse_duration(props[key])
    except ValueError as exc:
        raise ConfigError(f"{path}.{key}: {exc}") from None
    if value <= timedelta(0):
        raise ConfigError(f"{path}.{key}: must be positive, got {props[key]!r}")
    return value


def _flag(props: dict[str, Any], key: str, path: str, default: bool) -> bool:
    value = props.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}: expected true or false, got {value!r}")
    return value


def _positive_int(props: dict[str, Any], key: str, path: str, default: int, largest: int) -> int:
    value = props.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest:
        raise ConfigError(f"{path}.{key}: expected an integer from 1 to {largest}, got {value!r}")
    return value


def _queue(raw: Any, path: str) -> QueueConfig:
    name = _require(raw, "Name", str, path)
    if not name or "/" in name or "$" in name:
        raise ConfigError(f"{path}.Name: invalid queue name {name!r}")
    props = raw.get("Properties", {})
    ppath = f"{path}.Properties"
    if not isinstance(props, dict):
        raise ConfigError(f"{ppath}: expected an object")
    if props.get("RequiresSession"):
        raise ConfigError(f"{ppath}.RequiresSession: sessions are not supported by this emulator")
    for forward in ("ForwardTo", "ForwardDeadLetteredMessagesTo"):
        if props.get(forward):
            raise ConfigError(f"{ppath}.{forward}: auto-forwarding is not supported by this emulator")
    max_delivery = props.get("MaxDeliveryCount", QueueConfig.max_delivery_count)
    if not isinstance(max_delivery, int) or isinstance(max_delivery, bool) or max_delivery < 1:
        raise ConfigError(f"{ppath}.MaxDeliveryCount: expected a positive integer, got {max_delivery!r}")
    max_kib = _positive_int(
        props, "MaxMessageSizeInKilobytes", ppath, STANDARD_MAX_MESSAGE_KIB, _LARGEST_MAX_MESSAGE_KIB
    )
    return QueueConfig(
        name=name,
        lock_duration=_duration(props, "LockDuration", ppath, QueueConfig.lock_duration),
        max_delivery_count=max_delivery,
        max_message_size_in_kilobytes=max_kib,
        default_message_time_to_live=_duration(props, "DefaultMessageTimeToLive", ppath, _MAX_TTL),
        dead_lettering_on_message_expiration=_flag(props, "DeadLetteringOnMessageExpiration", ppath, False),
        requires_duplicate_detection=_flag(props, "RequiresDuplicateDetection", ppath, False),
        duplicate_detection_history_time_window=_duration(
            props, "DuplicateDetectionHistoryTimeWindow", ppath, QueueConfig.duplicate_detection_history_time_window
        ),
    )


def parse_config(document: Any) -> EmulatorConfig:
    """Validate a decoded ``Config.json`` document; raises :class:`ConfigError` naming the bad field."""
    user = _require(document, "UserConfig", dict, "$")
    namespaces = _require(user, "Namespaces", list, "UserConfig")
    if len(namespaces) != 1:
        raise ConfigError(f"UserConfig.Namespaces: expected exactly one namespace, got {len(namespaces)}")
    path = "UserConfig.Namespaces[0]"
    namespace = _require(namespaces[0], "Name", str, path)
    if namespaces[0].get("Topics"):
        raise ConfigError(f"{path}.Topics: topics are not supported by this emulator")
    raw_queues = _require(namespaces[0], "Queues", list, path)
    queues = tuple(_queue(raw, f"{path}.Queues[{i}]") for i, raw in enumerate(raw_queues))
    names = [q.name.lower() for q in queues]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{path}.Queues[{i}].Name: duplicate queue name {queues[i].name!r}")
    return EmulatorConfig(namespace=namespace, queues=queues)


def load_config(path: Path) -> EmulatorConfig:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_config(document)
