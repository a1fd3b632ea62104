"""The management API's ATOM documents: a queue's entry (``QueueDescription`` with ``CountDetails``), feeds, errors.

Element names, namespaces and order follow what Service Bus returns for ``api-version=2021-05`` (the version
``azure-servicebus`` 7.15 asks for). Pure: configuration and runtime properties in, UTF-8 XML out.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape, quoteattr

from .config import QueueConfig
from .store import QueueRuntime

__all__ = ["duration", "empty_feed", "error", "feed", "queue_entry", "timestamp"]

ATOM = "http://www.w3.org/2005/Atom"
CONNECT = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
COUNTS = "http://schemas.microsoft.com/netservices/2011/06/servicebus"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
_TIMESPAN_MAX = "P10675199DT2H48M5.4775807S"  # what the service reports for "never" (TimeSpan.MaxValue)
_NEVER = "0001-01-01T00:00:00Z"  # ... and for a time that has not happened (DateTime.MinValue)
_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>'


def duration(value: timedelta) -> str:
    """ISO-8601 duration as the service writes it: ``PT1M``, ``P1D``, ``PT0.5S``, ``P2DT3H``."""
    days, rest = value.days, value.seconds
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    second_text = f"{seconds}.{value.microseconds:06d}".rstrip("0") if value.microseconds else str(seconds)
    parts = ((hours, "H"), (minutes, "M"), (second_text, "S"))
    time = "".join(f"{amount}{unit}" for amount, unit in parts if amount not in (0, "0"))
    text = "P" + (f"{days}D" if days else "") + (f"T{time}" if time else "")
    return text if text != "P" else "PT0S"


def timestamp(ms: int) -> str:
    """UTC time with milliseconds; 0 (never) is the service's ``0001-01-01T00:00:00Z``."""
    if ms <= 0:
        return _NEVER
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _description(queue: QueueConfig, runtime: QueueRuntime) -> str:
    ttl = queue.default_message_time_to_live
    fields = [
        ("LockDuration", duration(queue.lock_duration)),
        ("MaxSizeInMegabytes", "1024"),
        ("RequiresDuplicateDetection", _flag(queue.requires_duplicate_detection)),
        ("RequiresSession", "false"),
        ("DefaultMessageTimeToLive", _TIMESPAN_MAX if ttl >= timedelta(days=10675199) else duration(ttl)),
        ("DeadLetteringOnMessageExpiration", _flag(queue.dead_lettering_on_message_expiration)),
        ("DuplicateDetectionHistoryTimeWindow", duration(queue.duplicate_detection_history_time_window)),
        ("MaxDeliveryCount", str(queue.max_delivery_count)),
        ("EnableBatchedOperations", "true"),
        ("SizeInBytes", str(runtime.size_in_bytes)),
        ("MessageCount", str(runtime.message_count)),
        ("IsAnonymousAccessible", "false"),
        ("AuthorizationRules", ""),
        ("Status", "Active"),
        ("CreatedAt", timestamp(runtime.created_at)),
        ("UpdatedAt", timestamp(runtime.updated_at)),
        ("AccessedAt", timestamp(runtime.accessed_at)),
        ("SupportOrdering", "true"),
    ]
    counts = [
        ("ActiveMessageCount", runtime.active),
        ("DeadLetterMessageCount", runtime.dead_letter),
        ("ScheduledMessageCount", runtime.scheduled),
        ("TransferMessageCount", 0),
        ("TransferDeadLetterMessageCount", 0),
    ]
    tail = [
        ("AutoDeleteOnIdle", _TIMESPAN_MAX),
        ("EnablePartitioning", "false"),
        ("EntityAvailabilityStatus", "Available"),
        ("EnableExpress", "false"),
        ("MaxMessageSizeInKilobytes", str(queue.max_message_size_in_kilobytes)),
    ]
    return (
        f'<QueueDescription xmlns="{CONNECT}" xmlns:i="{XSI}">'
        + "".join(f"<{name}>{value}</{name}>" for name, value in fields)
        + f'<CountDetails xmlns:d2p1="{COUNTS}">'
        + "".join(f"<d2p1:{name}>{value}</d2p1:{name}>" for name, value in counts)
        + "</CountDetails>"
        + "".join(f"<{name}>{value}</{name}>" for name, value in tail)
        + "</QueueDescription>"
    )


def _entry(url: str, namespace: str, queue: QueueConfig, runtime: QueueRuntime) -> str:
    return (
        f'<entry><id>{escape(url)}</id><title type="text">{escape(queue.name)}</title>'
        f"<published>{timestamp(runtime.created_at)}</published><updated>{timestamp(runtime.updated_at)}</updated>"
        f'<author><name>{escape(namespace)}</name></author><link rel="self" href={quoteattr(url)}/>'
        f'<content type="application/xml">{_description(queue, runtime)}</content></entry>'
    )


def queue_entry(url: str, namespace: str, queue: QueueConfig, runtime: QueueRuntime) -> bytes:
    """The document ``GET /{queue}`` answers: one ``<entry>`` whose content is the queue's description."""
    entry = _entry(url, namespace, queue, runtime)
    return (_DECLARATION + entry.replace("<entry>", f'<entry xmlns="{ATOM}">', 1)).encode()


def feed(
    url: str,
    title: str,
    namespace: str,
    queues: Sequence[tuple[str, QueueConfig, QueueRuntime]],
    next_url: str | None,
    now_ms: int,
) -> bytes:
    """A page of ``GET /$Resources/queues``: ``(entry url, queue, runtime)`` each, and the next page's link."""
    links = f'<link rel="self" href={quoteattr(url)}/>'
    if next_url is not None:
        links += f'<link rel="next" href={quoteattr(next_url)}/>'
    entries = "".join(_entry(u, namespace, q, r) for u, q, r in queues)
    return (
        f'{_DECLARATION}<feed xmlns="{ATOM}"><title type="text">{escape(title)}</title><id>{escape(url)}</id>'
        f"<updated>{timestamp(now_ms)}</updated>{links}{entries}</feed>"
    ).encode()


def empty_feed(now_ms: int) -> bytes:
    """What the service answers ``GET /{name}`` for an entity that does not exist: 200 and no entry (the SDK
    raises ``ResourceNotFoundError``), the same document as for the namespace root."""
    return (
        f'{_DECLARATION}<feed xmlns="{ATOM}"><title type="text">Publicly Listed Services</title>'
        '<subtitle type="text">This is the list of publicly-listed services currently available.</subtitle>'
        f"<id>uuid:00000000-0000-0000-0000-000000000000;id=1</id><updated>{timestamp(now_ms)}</updated>"
        "<generator>Service Bus 1.1</generator></feed>"
    ).encode()


def error(code: int, detail: str) -> bytes:
    """The service's error document: ``<Error><Code>404</Code><Detail>...</Detail></Error>``."""
    return f"<Error><Code>{code}</Code><Detail>{escape(detail)}</Detail></Error>".encode()
