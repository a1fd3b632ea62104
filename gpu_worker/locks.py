"""Which received messages have lost their lock, as far as this worker knows.

The receiver renews each message's lock with the SDK's :class:`~azure.servicebus.AutoLockRenewer` for
:attr:`shared.settings.Settings.lock_renewal_limit` (the attempt's time limit plus the grace to stop and settle), so
a lock outlives any attempt that is allowed to run. If a renewal fails anyway (the connection dropped), the message
is settled by nobody here: the broker redelivers it, and the job's row (its lease, its attempt) decides what the
redelivery does. :meth:`LostLocks.on_renew_failure` is the renewer's ``on_lock_renew_failure`` (called from its
threads).
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
        locked_until = message.locked_until_utc
        return locked_until is not None and locked_until <= datetime.now(UTC)

    def forget(self, message: ServiceBusReceivedMessage) -> None:
        with self._lock:
            self._lost.discard(str(message.lock_token))
