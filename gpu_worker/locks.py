"""The message locks of a received batch: renewed while the messages wait their turn, checked before each starts.

``WORKER_MAX_LOCK_RENEWAL`` is how long *one job* may hold its lock. The SDK's AutoLockRenewer counts a message's
renewal duration from the moment it was *received*, and a batch's later messages wait while the earlier ones run,
so one flat duration would let a waiting message's lock lapse (or leave it too little time for its own run).
Hence the consumer registers each message itself (the receiver is opened without ``auto_lock_renewer``):

* on receipt, the message at position ``i`` of the batch is renewed for ``(i + 1) * max_lock_renewal`` seconds:
  enough to wait behind ``i`` jobs that each use their whole allowance, then run its own;
* when it starts, it is skipped if its lock is already gone (a renewal failed, or earlier jobs overran so much
  that its budget ran out): the broker has handed it, or will hand it, to another worker, so it is neither
  processed nor settled (``action=skip_lock_lost``). If the lock still holds but less than ``max_lock_renewal``
  of its budget is left, it is registered again for its remaining time plus ``max_lock_renewal`` (the earlier
  registration then lapses quietly while the new one keeps renewing).

The lock-loss registry is the renewer's failure callback (called from the renewer's threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusReceiver, ServiceBusSession

logger = logging.getLogger(__name__)

FailureCallback = Callable[[ServiceBusReceivedMessage | ServiceBusSession, Exception | None], None]


class LockRenewer(Protocol):
    """What the consumer needs of :class:`azure.servicebus.AutoLockRenewer`."""

    def register(
        self,
        receiver: ServiceBusReceiver,
        renewable: ServiceBusReceivedMessage,
        max_lock_renewal_duration: float | None = None,
        on_lock_renew_failure: FailureCallback | None = None,
    ) -> None: ...


class Locks:
    def __init__(
        self,
        renewer: LockRenewer | None,
        *,
        max_lock_renewal: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._renewer = renewer
        self._allowance = max_lock_renewal
        self._clock = clock
        self._lost: set[str] = set()
        self._lost_lock = threading.Lock()
        self._budgets: dict[str, tuple[float, float]] = {}  # lock token -> (received, renewal seconds), on ``clock``

    def hold(self, receiver: ServiceBusReceiver, batch: Sequence[ServiceBusReceivedMessage]) -> None:
        """Register a freshly received batch for renewal, each message for its position's budget."""
        self._budgets.clear()  # the previous batch is settled or skipped: its budgets are over
        with self._lost_lock:
            self._lost.clear()
        received = self._clock()
        for position, message in enumerate(batch):
            self._budgets[str(message.lock_token)] = (received, (position + 1) * self._allowance)
            self._register(receiver, message)

    def ready(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> bool:
        """Before starting ``message``: ``False`` when its lock is gone; else make sure a full allowance is left."""
        if self.lost(message):
            return False
        token = str(message.lock_token)
        if token in self._budgets:
            received, seconds = self._budgets[token]
            used = self._clock() - received
            if seconds - used < self._allowance:
                self._budgets[token] = (received, used + self._allowance)
                self._register(receiver, message)
        return True

    def lost(self, message: ServiceBusReceivedMessage) -> bool:
        """Whether the lock is lost: a renewal failed, or the lock ran out (e.g. the renewal budget was spent)."""
        with self._lost_lock:
            if str(message.lock_token) in self._lost:
                return True
        locked_until = message.locked_until_utc
        return locked_until is not None and locked_until <= datetime.now(UTC)

    def on_renew_failure(
        self, renewable: ServiceBusReceivedMessage | ServiceBusSession, error: Exception | None
    ) -> None:
        """The AutoLockRenewer's ``on_lock_renew_failure``."""
        message_id = getattr(renewable, "message_id", None)
        with self._lost_lock:
            self._lost.add(str(getattr(renewable, "lock_token", "")))
        logger.warning(
            "lock renewal failed for message %s: %s",
            message_id,
            error,
            extra={"message_id": message_id, "action": "lock_lost"},
        )

    def _register(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> None:
        if self._renewer is None:
            return
        _, seconds = self._budgets[str(message.lock_token)]  # the SDK counts them from the message's receipt
        self._renewer.register(
            receiver, message, max_lock_renewal_duration=seconds, on_lock_renew_failure=self.on_renew_failure
        )
