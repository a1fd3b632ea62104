"""A Service Bus receiver shared by the worker's threads: one call on it at a time.

The pipelined consumer (:mod:`gpu_worker.pipeline`) receives in one thread and settles in others, and
:class:`~gpu_worker.renewal.LockRenewer` renews locks from its own thread. ``ServiceBusReceiver`` is documented as
not thread-safe, and the installed SDK (azure-servicebus 7.15, its pyamqp transport) bears that out: each receiver
has a connection of its own (``ServiceBusClient`` shares none), and ``receive_messages`` (the link's ``do_work``),
``complete``/``abandon``/``dead_letter_message`` (a disposition frame, then waiting for the outcome) and
``renew_message_lock`` (a request on the management link, then waiting for its response) each pump that connection
with ``Connection.listen``. Only the socket's frame reads and writes (``_transport.socket_lock``) and the creation
of the management link (``_mgmt_link_lock``) are locked: two threads pumping one connection may each read a frame
and process them out of order, and a receive that reopens a failed handler (``_open``) swaps ``_handler`` under a
settlement using it. The renewer does this to a sequential consumer too.

So every call the worker makes on a receiver holds the receiver's lock: :class:`SerialReceiver` wraps it, and the
messages are registered with the renewer (:class:`gpu_worker.renewal.LockRenewer`) through it
(:meth:`SerialReceiver.renew_message_lock`), not by the SDK (the receivers are opened without
``auto_lock_renewer``). The two receivers have separate connections, so each has its own lock. A receive holds the
lock for its wait (at most ``IDLE_WAIT``, 0.5 s): a settlement or a renewal usually waits at most that long behind
it, well inside a lock's duration (the renewer renews 10 s, or half of a short lock, before it runs out). Not
everything is serialised: a receive that fails holds the lock while the SDK closes the handler (which may wait a few
seconds for the link to detach), the SDK's keep-alive thread pumps the connection outside any lock of ours, and
reading a message's ``_settled`` or a receiver's ``_running`` takes none.

A receive that fails (the connection lost) leaves the SDK's handler closed (``_running`` false) until the next
receive reopens it; meanwhile a settlement would raise ``ValueError`` and a renewal would stop. So a settlement or a
renewal reopens a closed handler first (the SDK's own ``_open``, which the next receive would call), under the lock;
a settlement on the new link is made by the lock token (the SDK falls back to the management link). A renewal of a
message already settled (it waited behind its settlement) is not a lost lock: it returns the lock's time unchanged.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusConnectionError, ServiceBusError

logger = logging.getLogger(__name__)


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
            self._reopen()
            self.receiver.complete_message(message)

    def abandon_message(self, message: ServiceBusReceivedMessage) -> None:
        with self._lock:
            self._reopen()
            self.receiver.abandon_message(message)

    def dead_letter_message(
        self, message: ServiceBusReceivedMessage, reason: str | None = None, error_description: str | None = None
    ) -> None:
        with self._lock:
            self._reopen()
            self.receiver.dead_letter_message(message, reason=reason, error_description=error_description)

    def renew_message_lock(self, message: ServiceBusReceivedMessage, **kwargs: Any) -> datetime:
        """What the renewer calls for a message registered through this receiver; a message settled meanwhile keeps
        its lock's time (nothing to renew, nothing lost)."""
        with self._lock:
            if getattr(message, "_settled", False) and message.locked_until_utc is not None:
                return message.locked_until_utc
            self._reopen()
            return self.receiver.renew_message_lock(message, **kwargs)

    def _reopen(self) -> None:
        """Reopen the SDK's handler if a failed receive closed it (under the lock); a failed reopen raises
        ``ServiceBusConnectionError`` (the SDK's ``_open`` raises its transport's errors untranslated)."""
        if getattr(self.receiver, "_running", True) is False and callable(getattr(self.receiver, "_open", None)):
            logger.info("reopening the receiver closed by a failed receive", extra={"action": "receiver_reopen"})
            try:
                self.receiver._open()
            except ServiceBusError:
                raise
            except Exception as e:
                raise ServiceBusConnectionError(message=f"could not reopen the receiver: {e!r}") from e

    def locked(self) -> threading.Lock:
        """The lock, for a call the SDK has no method for (the inbox's link-credit flow)."""
        return self._lock
