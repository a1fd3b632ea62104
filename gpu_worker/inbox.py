"""Where the next message comes from: the high-priority queue first, without starving the normal one.

Service Bus has no per-message priority, so priorities are two queues (the Priority Queue pattern): ``jobs-high``
and ``jobs``, one receiver each on the worker's one client. Each receiver is used from several threads (received
here, settled by the pipeline's finishing threads, renewed by :class:`~gpu_worker.renewal.LockRenewer`), so the
inbox wraps it in a :class:`~gpu_worker.receiver.SerialReceiver` (one call at a time) and registers each message it
hands out with the renewer through that wrapper. Each :meth:`PriorityInbox.receive` returns at most one message (see
:mod:`gpu_worker.consumer`), with the receiver that must settle it:

* ``jobs-high`` is asked first, then ``jobs``. While there is work, each ask waits only ``QUICK`` (a queue that holds
  a message answers within a round trip), and ``jobs-high``, once found empty, only ``PEEK``, and not again until
  ``HIGH_RECHECK`` later: a stream of normal jobs would otherwise wait ``QUICK`` on the empty high-priority queue
  before each job (215 ms per tiny job against 55 ms for a naive consumer, bench/worker_throughput.py), and even a
  ``PEEK`` costs its 20 ms (a receive that comes back empty returns no sooner), which was most of the preparing
  thread's time per tiny job (receive 24 ms, prepare 9 ms: the pipeline's slowest stage). A high-priority job that
  arrives meanwhile is taken at the first round after ``HIGH_RECHECK``. Once a round found both empty, each waits
  ``wait`` in turn (``WORKER_MAX_WAIT_TIME``, capped at ``IDLE_WAIT``, 0.5 s), so an idle worker picks up a
  high-priority job within about that long and, at the cap, asks the broker about twice a second.
* After ``burst`` high-priority messages in a row (``WORKER_HIGH_PRIORITY_BURST``), ``jobs`` is asked once
  (``QUICK``) before ``jobs-high`` again: under a steady high-priority stream a waiting normal job still runs every
  ``burst + 1`` jobs.

A receive that times out leaves its link's credit with the broker (the SDK grants one message of credit per receive
and keeps what was not used; Azure/azure-sdk-for-python#35591). The broker would then lock the next message of that
queue into this worker's buffer while it runs a job from the other queue, where no other worker can take it until
its lock runs out. So after an empty receive the credit is taken back (:meth:`PriorityInbox._revoke_credit`). The
SDK has no public call for it, so this reaches into its internals (``receiver._handler._link``); if a new SDK
version moves them, the credit stays (as without this call) and a warning says so once per inbox
(``action=credit_revoke_unavailable``); ``tests/integration/test_worker_api.py`` checks the path on the installed SDK.
A message that arrives anyway, and whose lock ran out while it waited in the buffer, is skipped: the broker has
redelivered it. It is not registered with the renewer, and it is forgotten in :class:`~gpu_worker.locks.LostLocks`
(which holds at most the messages in hand).
After a failed receive (a connection lost), the next round waits ``wait`` on each queue: reopening a link takes
longer than ``QUICK``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError

from gpu_worker.locks import LostLocks
from gpu_worker.receiver import SerialReceiver
from gpu_worker.renewal import LockRenewer

logger = logging.getLogger(__name__)

QUICK = 0.2  # seconds: enough for a queue that holds a message to hand it over
PEEK = 0.02  # seconds: a look at jobs-high, found empty at the last ask, at most every HIGH_RECHECK while busy
# The receivers' socket_timeout (app.py): how long the SDK's pyamqp transport blocks on the socket per pump of the
# connection. At the SDK's default (0.2 s) no receive returns empty sooner than that, whatever its max_wait_time: a
# PEEK cost 0.2 s, and a tiny job 213 ms instead of 35 (bench/worker_throughput.py). It also bounds a socket write,
# and a receiver writes only small frames (flow, disposition, lock renewal); the SDK's advice if writes ever time
# out is a larger value.
RECEIVE_SOCKET_TIMEOUT = 0.02
IDLE_WAIT = 0.5  # seconds per queue while both are empty: the pick-up latency of an idle worker
HIGH_RECHECK = 0.25  # seconds: a busy worker looks at jobs-high, found empty, no more often than this


class Renewer(Protocol):
    """Renews the lock of each message registered (:class:`~gpu_worker.renewal.LockRenewer`; tests may give the
    SDK's ``AutoLockRenewer``)."""

    def register(self, receiver: Any, message: Any, /) -> object: ...


@dataclass(frozen=True)
class Received:
    message: ServiceBusReceivedMessage
    receiver: SerialReceiver  # the one that settles it
    priority: str


class PriorityInbox:
    def __init__(
        self,
        normal: ServiceBusReceiver,
        high: ServiceBusReceiver,
        *,
        burst: int,
        wait: float,
        locks: LostLocks,
        renewer: Renewer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``burst``: ``WORKER_HIGH_PRIORITY_BURST``; ``wait``: ``WORKER_MAX_WAIT_TIME``, capped at ``IDLE_WAIT``;
        ``locks``: the renewer's record of lost locks, where a skipped message is forgotten; ``renewer``: renews the
        lock of each message handed out (the receivers must not have one of their own); ``clock``: for
        ``HIGH_RECHECK``."""
        self._normal = SerialReceiver(normal)
        self._high = SerialReceiver(high)
        self._burst = burst
        self._locks = locks
        self._renewer = renewer
        self._credit_warned = False  # the SDK's internals were not where _revoke_credit looks (logged once)
        self._wait = min(wait, IDLE_WAIT)
        self._streak = 0  # high-priority messages in a row
        self._idle = True  # the last round found both queues empty, or failed: wait longer
        self._high_dry = False  # the last ask of jobs-high found it empty
        self._clock = clock
        self._high_asked = -float("inf")  # when jobs-high was last asked

    def receive(self) -> Received | None:
        """At most one message; ``None`` when the queues asked had none. ``ServiceBusError`` passes through."""
        busy = not self._idle
        wait = QUICK if busy else self._wait
        self._idle = True  # unless a message comes (an error leaves it set)
        if self._streak >= self._burst:
            self._streak = 0
            received, _ = self._take(self._normal, "normal", QUICK)
            if received is not None:
                self._idle = False
                return received
        received = None
        now = self._clock()
        if not (busy and self._high_dry and now - self._high_asked < HIGH_RECHECK):
            self._high_asked = now
            received, delivered = self._take(self._high, "high", PEEK if busy and self._high_dry else wait)
            self._high_dry = not delivered  # a message skipped (its lock ran out) is redelivered: look again soon
        if received is not None:
            self._streak += 1
        else:
            self._streak = 0
            received, _ = self._take(self._normal, "normal", wait)
        self._idle = received is None
        return received

    def _take(self, receiver: SerialReceiver, priority: str, wait: float) -> tuple[Received | None, bool]:
        """The message the receive got, if it may be run, and whether the queue handed one over at all."""
        try:
            batch = receiver.receive_messages(max_message_count=1, max_wait_time=wait)
        except ServiceBusError:
            self._streak = 0
            raise
        if not batch:
            self._revoke_credit(receiver)
            return None, False
        [message] = batch
        locked_until = message.locked_until_utc
        if locked_until is not None and locked_until <= datetime.now(UTC):
            self._locks.forget(message)
            extra = {"message_id": message.message_id, "action": "skip_expired_lock"}
            logger.warning("message %s: its lock ran out in the buffer; the broker redelivers it", message.message_id,
                           extra=extra)  # fmt: skip
            return None, True
        if self._renewer is not None:  # through the wrapper: each renewal holds the receiver's lock
            self._renewer.register(receiver, message)
        return Received(message, receiver, priority), True

    def release(self, message: ServiceBusReceivedMessage) -> None:
        """The message is out of hand (settled, or left to the broker): its lock is renewed no more."""
        if isinstance(self._renewer, LockRenewer):
            self._renewer.forget(message)

    def _revoke_credit(self, receiver: SerialReceiver) -> None:
        """Take back the credit an empty receive left on the link (a flow with link-credit 0, which AMQP allows a
        receiver at any time), through the SDK's AMQP link (:func:`link_of`), holding the receiver's lock."""
        link = link_of(receiver.receiver)
        if link is None:
            if not self._credit_warned:
                self._credit_warned = True
                logger.warning("the Service Bus SDK's receiver has no _handler._link with current_link_credit and "
                               "flow: link credit is not taken back after an empty receive (a new SDK version?)",
                               extra={"action": "credit_revoke_unavailable"})  # fmt: skip
            return
        try:
            with receiver.locked():
                if link.current_link_credit > 0:
                    link.flow(link_credit=0)
        except Exception:  # a link closed meanwhile: the credit stays, as without this call
            logger.debug("could not take back the link credit", exc_info=True)


def link_of(receiver: ServiceBusReceiver) -> Any | None:
    """The AMQP link of an open receiver (``azure-servicebus`` 7.15's pyamqp ``ReceiverLink``), or ``None`` where the
    SDK's internals differ: a ``_handler`` with a ``_link`` that has ``current_link_credit`` and ``flow``."""
    link = getattr(getattr(receiver, "_handler", None), "_link", None)
    if not hasattr(link, "current_link_credit") or not callable(getattr(link, "flow", None)):
        return None
    return link
