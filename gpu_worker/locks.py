"""Which received messages have lost their lock, as far as this worker knows.

The worker renews each message's lock while it is in hand, from its receive to its settlement
(:class:`gpu_worker.renewal.LockRenewer`, whatever the time it waits in the pipeline), so a lock outlives its
message's attempt. If a renewal fails anyway and the lock runs out (the connection stayed down), the message is
settled by nobody here: the broker redelivers it, and the job's row (its lease, its attempt) decides what the
redelivery does. :meth:`LostLocks.on_renew_failure` is the renewer's ``on_failure`` (the SDK's
``on_lock_renew_failure`` has the same signature; called from the renewer's thread).

A lock token is remembered only while its lock has not run out by its own time (after that :meth:`LostLocks.lost`
says so without it), and forgotten once the message is left to the broker: settled (:mod:`gpu_worker.settle`) or
skipped because its lock ran out in the receive buffer (:mod:`gpu_worker.inbox`). So the set holds at most the
messages in hand: a failure reported after a message was forgotten (the renewer finds a skipped message's lock run
out after the inbox has skipped it) adds nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusSession

logger = logging.getLogger(__name__)


class LostLocks:
    def __init__(self) -> None:
        self._lost: set[str] = set()
        self._lock = threading.Lock()

    def on_renew_failure(
        self, renewable: ServiceBusReceivedMessage | ServiceBusSession, error: Exception | None
    ) -> None:
        message_id = getattr(renewable, "message_id", None)
        if not _ran_out(renewable):
            with self._lock:
                self._lost.add(str(getattr(renewable, "lock_token", "")))
        logger.warning(
            "lock renewal failed for message %s: %s",
            message_id,
            error,
            extra={"message_id": message_id, "action": "lock_lost"},
        )

    def lost(self, message: ServiceBusReceivedMessage) -> bool:
        """Whether the lock is lost: a renewal failed, or the lock ran out."""
        with self._lock:
            if str(message.lock_token) in self._lost:
                return True
        return _ran_out(message)

    def forget(self, message: ServiceBusReceivedMessage) -> None:
        """The message is left to the broker: its token is no longer needed."""
        with self._lock:
            self._lost.discard(str(message.lock_token))


def _ran_out(renewable: ServiceBusReceivedMessage | ServiceBusSession) -> bool:
    locked_until = renewable.locked_until_utc
    return locked_until is not None and locked_until <= datetime.now(UTC)
