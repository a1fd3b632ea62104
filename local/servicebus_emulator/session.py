"""Per-session and per-link protocol state (no I/O, no store access)."""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Link", "LinkKind", "Session"]

RECEIVER_ROLE = True  # AMQP role field: True = receiver, False = sender
SETTLED_MODE = 1  # snd-settle-mode settled: receive-and-delete


class LinkKind(Enum):
    QUEUE = "queue"  # a queue or its dead-letter queue
    MANAGEMENT = "management"  # <entity>/$management request-response node
    CBS = "cbs"  # $cbs claims-based security node


@dataclass(eq=False)
class Link:
    session: Session
    name: bytes
    handle: int  # ours (we reuse the peer's handle number: both are unique within the session)
    remote_handle: int
    address: str  # the node's path, e.g. "jobs", "jobs/$DeadLetterQueue", "jobs/$management", "$cbs"
    kind: LinkKind
    entity: str | None  # canonical queue entity name for QUEUE/MANAGEMENT links
    outgoing: bool  # True when we send on this link (the peer is a receiver)
    snd_settle_mode: int
    rcv_settle_mode: int
    reply_to: bytes | None = None  # a node link's target address, which requests name as reply-to
    # outgoing: AMQP link flow control
    credit: int = 0
    delivery_count: int = 0
    drain: bool = False
    replies: deque[bytes] = field(default_factory=deque)  # node responses waiting for credit
    # incoming: a transfer split over several frames
    partial: bytearray | None = None
    partial_first: list[Any] | None = None
    credit_granted: int = 0
    closed: bool = False

    @property
    def settled_mode(self) -> bool:
        return self.snd_settle_mode == SETTLED_MODE


@dataclass(eq=False)
class Session:
    connection: Connection
    channel: int
    remote_channel: int
    next_outgoing_id: int = 0  # transfer ids we send
    next_delivery_id: int = 0
    next_incoming_id: int = 0
    links: dict[int, Link] = field(default_factory=dict)  # by remote handle
    unsettled: dict[int, tuple[Link, uuid.UUID]] = field(default_factory=dict)  # our delivery id -> lock
