"""The locks of the messages in hand, renewed from the receive to the settlement.

The SDK's ``AutoLockRenewer`` does not fit the pipelined worker (:mod:`gpu_worker.pipeline`): it stops renewing a
message ``max_lock_renewal_duration`` after its *receive* (a message prepared ahead waits for the analyses of others
first), and it stops, silently, as soon as it finds the receiver's handler closed (``_running`` false), which a
failed receive does for a moment to every message in hand on that receiver. :class:`LockRenewer` renews each
registered message's lock while it is in hand: until it is settled (``_settled``), forgotten
(:meth:`LockRenewer.forget`, after the settlement whatever became of it), or its lock is lost. It renews through the
message's :class:`~gpu_worker.receiver.SerialReceiver`, which reopens a closed handler first; a renewal that fails
while the lock still runs is tried again at the next tick, and one whose lock ran out meanwhile is reported to
``on_failure`` (:meth:`gpu_worker.locks.LostLocks.on_renew_failure`).

A lock is renewed once less than ``margin`` is left (10 s, or half the lock for a short one); the thread looks every
``tick`` seconds (0.5).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from azure.servicebus import ServiceBusReceivedMessage
from azure.servicebus.exceptions import MessageAlreadySettled, MessageLockLostError

logger = logging.getLogger(__name__)

TICK = 0.5
MARGIN = 10.0


class Renewing(Protocol):
    def renew_message_lock(self, message: ServiceBusReceivedMessage) -> datetime: ...


class LockRenewer:
    def __init__(
        self,
        on_failure: Callable[[ServiceBusReceivedMessage, Exception | None], None],
        *,
        tick: float = TICK,
        margin: float = MARGIN,
    ) -> None:
        self._on_failure = on_failure
        self._tick = tick
        self._margin = margin
        self._held: dict[int, tuple[Renewing, ServiceBusReceivedMessage, float]] = {}  # id -> receiver, message, margin
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-renewer", daemon=True)

    def __enter__(self) -> LockRenewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def register(self, receiver: Renewing, message: ServiceBusReceivedMessage) -> None:
        """Renew ``message``'s lock through ``receiver`` until it is settled or forgotten."""
        left = _seconds_left(message)
        margin = self._margin if left is None else min(self._margin, max(left, 0.0) / 2)
        with self._lock:
            self._held[id(message)] = (receiver, message, margin)

    def forget(self, message: ServiceBusReceivedMessage) -> None:
        with self._lock:
            self._held.pop(id(message), None)

    def holds(self, message: ServiceBusReceivedMessage) -> bool:
        with self._lock:
            return id(message) in self._held

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                held = list(self._held.values())
            for receiver, message, margin in held:
                if self._stop.is_set():
                    return
                self._renew(receiver, message, margin)

    def _renew(self, receiver: Renewing, message: ServiceBusReceivedMessage, margin: float) -> None:
        if getattr(message, "_settled", False):
            self.forget(message)
            return
        left = _seconds_left(message)
        if left is None or left > margin:
            return
        try:
            receiver.renew_message_lock(message)
        except MessageAlreadySettled:
            self.forget(message)
        except Exception as e:  # ServiceBusError (lock lost, connection gone), ValueError (a closed receiver)
            left = _seconds_left(message)
            if isinstance(e, MessageLockLostError) or (left is not None and left <= 0):
                self.forget(message)
                self._on_failure(message, e)
            else:
                logger.info("lock renewal of message %s failed (%r); trying again", message.message_id, e,
                            extra={"message_id": message.message_id, "action": "lock_renew_retry"})  # fmt: skip


def _seconds_left(message: ServiceBusReceivedMessage) -> float | None:
    locked_until = message.locked_until_utc
    return None if locked_until is None else (locked_until - datetime.now(UTC)).total_seconds()
