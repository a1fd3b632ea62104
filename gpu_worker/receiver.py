"""A Service Bus receiver shared by the worker's threads: one call on it at a time.

The pipelined consumer (:mod:`gpu_worker.pipeline`) receives in one thread and settles in another, and the SDK's
:class:`~azure.servicebus.AutoLockRenewer` renews locks from its own pool. ``ServiceBusReceiver`` is documented as
not thread-safe, and the installed SDK (azure-servicebus 7.15, its pyamqp transport) bears that out: each receiver
has a connection of its own (``ServiceBusClient`` shares none), and ``receive_messages`` (the link's ``do_work``),
``complete``/``abandon``/``dead_letter_message`` (a disposition frame, then waiting for the outcome) and
``renew_message_lock`` (a request on the management link, then waiting for its response) each pump that connection
with ``Connection.listen``. Only the socket's frame reads and writes (``_transport.socket_lock``) and the creation
of the management link (``_mgmt_link_lock``) are locked: two threads pumping one connection may each read a frame
and process them out of order, and a receive that reopens a failed handler (``_open``) swaps ``_handler`` under a
settlement using it. The renewer does this to a sequential consumer too.

So every call the worker makes on a receiver holds the receiver's lock: :class:`SerialReceiver` wraps it, and the
messages are registered with the renewer through it (:meth:`SerialReceiver.renew_message_lock`), not by the SDK
(the receivers are opened without ``auto_lock_renewer``). The two receivers have separate connections, so each has
its own lock. A receive holds the lock for its wait (at most ``IDLE_WAIT``, 0.5 s): a settlement or a renewal waits
at most that long behind it, well inside a lock's duration (the renewer renews 10 s, or a quarter of a short lock,
before it runs out).
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver


class SerialReceiver:
    """``receiver``'s calls, one at a time (from any thread)."""

    def __init__(self, receiver: ServiceBusReceiver) -> None:
        self.receiver = receiver
        self._lock = threading.Lock()

    def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[ServiceBusReceivedMessage]:
        with self._lock:
            return self.receiver.receive_messages(max_message_count=max_message_count, max_wait_time=max_wait_time)

    def complete_message(self, message: ServiceBusReceivedMessage) -> None:
        with self._lock:
            self.receiver.complete_message(message)

    def abandon_message(self, message: ServiceBusReceivedMessage) -> None:
        with self._lock:
            self.receiver.abandon_message(message)

    def dead_letter_message(
        self, message: ServiceBusReceivedMessage, reason: str | None = None, error_description: str | None = None
    ) -> None:
        with self._lock:
            self.receiver.dead_letter_message(message, reason=reason, error_description=error_description)

    def renew_message_lock(self, message: ServiceBusReceivedMessage, **kwargs: Any) -> datetime:
        """What the ``AutoLockRenewer`` calls (from its pool) for a message registered through this receiver."""
        with self._lock:
            return self.receiver.renew_message_lock(message, **kwargs)

    def locked(self) -> threading.Lock:
        """The lock, for a call the SDK has no method for (the inbox's link-credit flow)."""
        return self._lock
