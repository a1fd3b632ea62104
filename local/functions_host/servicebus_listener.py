"""Running Service Bus queue-triggered functions, the way the host's Service Bus listener (a ``ServiceBusProcessor``)
runs them.

One listener per enabled function, on a thread of its own that owns the function's client and peek-lock receiver: it
receives and it settles, so the SDK's receiver (not thread-safe) is used from that thread only, lock renewals aside
(the SDK's ``AutoLockRenewer`` renews from its own threads, as it is made to). Invocations run on threads of their
own, at most ``maxConcurrentCalls`` at once per function, through ``invoke.run_function`` as HTTP and timer
invocations do (a coroutine function runs on the host's event loop). The receiver asks for one message per free slot
and never prefetches, so no message is locked that is not running; a running message's lock is renewed for up to
``maxAutoLockRenewalDuration`` (``servicebus_options``).

Settlement, as the extension decides it, in one place (``_settle``), on the listener's thread: a function that returns
has its message completed (``autoCompleteMessages``; when false the message is left to its lock, since a Python
function cannot settle it: Service Bus delivers it again once renewal stops and the lock runs out); a function that
raises has its exception logged with the invocation and its message abandoned (the delivery count goes up; past the
queue's ``MaxDeliveryCount`` Service Bus dead-letters it). A message whose lock is lost (a renewal failed, or the
connection dropped while the function ran) is not settled: Service Bus delivers it again.

A listener never dies: when its connection fails (the emulator restarted, the network dropped) it logs the error,
closes the client, waits (1 s, doubling up to 30 s, back to 1 s after a receive succeeds) and opens a new one. On
stop it receives nothing more, lets running invocations finish within the grace period (settling each as it ends),
abandons the messages of those still running after it, and closes its client.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from azure.core.exceptions import AzureError
from azure.servicebus import (
    AutoLockRenewer,
    ServiceBusClient,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
    ServiceBusSession,
)
from azure.servicebus.exceptions import ServiceBusError

from local.functions_host.invoke import EventLoopThread, run_function
from local.functions_host.servicebus import ServiceBusFunction
from local.functions_host.servicebus_message import delivery_count, function_message
from local.functions_host.servicebus_options import ServiceBusOptions

logger = logging.getLogger(__name__)

IDLE_WAIT = 1.0  # seconds a receive waits when nothing runs; also how long a stop may wait for a receive to return
BUSY_WAIT = 0.2  # seconds a receive waits while invocations run: their messages are settled between receives
INITIAL_BACKOFF, MAX_BACKOFF = 1.0, 30.0
# Few, short SDK retries: the listener retries a failed connection itself, and must notice a stop meanwhile.
CLIENT_OPTIONS = {"retry_total": 2, "retry_backoff_factor": 0.5, "retry_backoff_max": 2.0}


@dataclass(eq=False)
class _Invocation:
    message: ServiceBusReceivedMessage
    receiver: ServiceBusReceiver
    invocation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    error: BaseException | None = None  # the function's exception, once it has ended


class ServiceBusListener:
    """Receive ``function``'s queue and invoke it for each message, from ``start`` until ``request_stop``."""

    def __init__(
        self,
        function: ServiceBusFunction,
        options: ServiceBusOptions,
        loop: EventLoopThread,
        client: Callable[[], ServiceBusClient] | None = None,  # a new client for each connection; tests pass theirs
    ) -> None:
        assert function.connection is not None, "a disabled function has no listener"
        self.function = function
        self._client = client or functools.partial(function.connection.client, **CLIENT_OPTIONS)
        self._options = options
        self._loop = loop
        self._stopping = threading.Event()
        self._deadline = math.inf
        self._ended: queue.Queue[_Invocation] = queue.Queue()
        self._running: set[_Invocation] = set()  # started and not yet settled; the listener's thread only
        self._received = False
        self._thread = threading.Thread(target=self._run, name=f"servicebus-{function.function_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self, grace: float) -> None:
        """Receive nothing more; running invocations get ``grace`` seconds before their messages are abandoned."""
        self._deadline = time.monotonic() + grace
        self._stopping.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the listener to close; False if it has not."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _fields(self, invocation: _Invocation | None = None, **more: object) -> dict[str, object]:
        fields: dict[str, object] = {"function": self.function.function_name, "queue": self.function.queue_name}
        if invocation is not None:
            fields |= {
                "invocation_id": invocation.invocation_id,
                "message_id": invocation.message.message_id,
                "delivery_count": delivery_count(invocation.message),
            }
        return fields | more

    def _run(self) -> None:
        backoff = INITIAL_BACKOFF
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as e:  # the listener never dies: any failure means a new client after a backoff
                expected = isinstance(e, AzureError | OSError)
                if self._received:
                    backoff, self._received = INITIAL_BACKOFF, False
                logger.warning(
                    "Service Bus listener for Functions.%s (queue %s) failed: %s; connecting again in %.0f s",
                    self.function.function_name,
                    self.function.queue_name,
                    e,
                    backoff,
                    exc_info=not expected,
                    extra=self._fields(action="servicebus_reconnect"),
                )
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, MAX_BACKOFF)
        self._drain(None)  # only invocations of a connection that failed are left: they cannot be settled

    def _listen(self) -> None:
        """Receive and invoke until stopped (then drain and return) or until the connection fails (raise)."""
        seconds = self._options.max_auto_lock_renewal_duration.total_seconds()
        renewer = AutoLockRenewer(seconds, on_lock_renew_failure=self._lock_lost) if seconds > 0 else None
        with self._client() as client:
            receiver = client.get_queue_receiver(self.function.queue_name, prefetch_count=0, auto_lock_renewer=renewer)
            try:
                self._pump(receiver)
                self._drain(receiver)
            finally:
                if renewer is not None:
                    renewer.close(wait=False)  # before the receiver closes: no renewal may race the link's detach
                try:
                    receiver.close()
                except (AzureError, OSError) as e:
                    logger.debug("closing the receiver of %s failed: %s", self.function.function_name, e)

    def _pump(self, receiver: ServiceBusReceiver) -> None:
        while not self._stopping.is_set():
            free = self._options.max_concurrent_calls - len(self._running)
            self._settle_ended(receiver, wait=IDLE_WAIT if free == 0 else 0.0)
            free = self._options.max_concurrent_calls - len(self._running)
            if free == 0 or self._stopping.is_set():
                continue
            wait = BUSY_WAIT if self._running else IDLE_WAIT
            # One at a time, as the host's processor pulls per free slot: asking the SDK for more makes it wait
            # another 0.2 s for them after the first one arrives (measured: +200 ms per webhook delivery).
            messages = receiver.receive_messages(max_message_count=1, max_wait_time=wait)
            self._received = True
            for message in messages:
                self._start(_Invocation(message, receiver))

    def _start(self, invocation: _Invocation) -> None:
        if self._stopping.is_set():  # received as the stop came: not run, handed back at once
            self._running.add(invocation)
            invocation.error = RuntimeError("the host is stopping")
            self._settle(invocation.receiver, invocation)
            return
        self._running.add(invocation)
        name = f"{self._thread.name}-{invocation.invocation_id[:8]}"
        threading.Thread(target=self._invoke, args=(invocation,), name=name, daemon=True).start()

    def _invoke(self, invocation: _Invocation) -> None:
        """On the invocation's thread: run the function, then hand the invocation back to the listener's thread."""
        invocation.error = RuntimeError("the invocation was interrupted")
        try:
            invocation.error = self._call(invocation)
        finally:
            self._ended.put(invocation)

    def _call(self, invocation: _Invocation) -> Exception | None:
        name, message = self.function.function_name, invocation.message
        fields = self._fields(invocation)
        logger.info(
            "Executing 'Functions.%s' (Reason='(null)', Id=%s)",
            name,
            invocation.invocation_id,
            extra={"action": "servicebus_started", **fields},
        )
        logger.info(
            "Trigger Details: MessageId: %s, SequenceNumber: %s, DeliveryCount: %d, EnqueuedTimeUtc: %s, "
            "LockedUntilUtc: %s, SessionId: (null)",
            message.message_id,
            message.sequence_number,
            delivery_count(message),
            _iso(message.enqueued_time_utc),
            _iso(message.locked_until_utc),
            extra=fields,
        )
        started = time.perf_counter()
        try:
            arguments = {self.function.binding_name: function_message(message)}
            run_function(self.function.user_function, arguments, self._loop)
        except Exception as e:
            elapsed = (time.perf_counter() - started) * 1000
            logger.exception(
                "Executed 'Functions.%s' (Failed, Id=%s, %.1f ms)",
                name,
                invocation.invocation_id,
                elapsed,
                extra={"action": "servicebus_failed", "duration_ms": elapsed, **fields},
            )
            return e
        elapsed = (time.perf_counter() - started) * 1000
        logger.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, %.1f ms)",
            name,
            invocation.invocation_id,
            elapsed,
            extra={"action": "servicebus_succeeded", "duration_ms": elapsed, **fields},
        )
        return None

    def _settle_ended(self, receiver: ServiceBusReceiver | None, wait: float) -> None:
        """Settle the invocations that have ended, first waiting up to ``wait`` seconds for one."""
        try:
            ended = [self._ended.get(timeout=wait) if wait > 0 else self._ended.get_nowait()]
        except queue.Empty:
            return
        while True:
            try:
                ended.append(self._ended.get_nowait())
            except queue.Empty:
                break
        for invocation in ended:
            self._settle(receiver, invocation)

    def _settle(self, receiver: ServiceBusReceiver | None, invocation: _Invocation) -> None:
        """The one place a message is settled: complete after a return, abandon after an exception."""
        if invocation not in self._running:  # abandoned at the end of a stop's grace, and has ended since
            return
        self._running.discard(invocation)
        message, succeeded = invocation.message, invocation.error is None
        action = "complete" if succeeded else "abandon"
        fields = self._fields(invocation, action=action)
        if invocation.receiver is not receiver:
            logger.warning(
                "message %s of Functions.%s not settled: its connection failed while the function ran; "
                "Service Bus delivers it again once its lock expires",
                message.message_id,
                self.function.function_name,
                extra=fields | {"action": "lock_lost"},
            )
            return
        if succeeded and not self._options.auto_complete_messages:
            logger.info(
                "message %s of Functions.%s left to its lock (autoCompleteMessages is false)",
                message.message_id,
                self.function.function_name,
                extra=fields | {"action": "leave"},
            )
            return
        try:
            if succeeded:
                invocation.receiver.complete_message(message)
            else:
                invocation.receiver.abandon_message(message)
        except (ServiceBusError, ValueError) as e:  # the lock is lost, or the connection: Service Bus delivers again
            logger.warning(
                "could not %s message %s of Functions.%s: %s",
                action,
                message.message_id,
                self.function.function_name,
                e,
                extra=fields | {"action": "lock_lost"},
            )
            return
        log = logger.debug if succeeded else logger.info
        done = "completed" if succeeded else "abandoned"
        log("%s message %s of Functions.%s", done, message.message_id, self.function.function_name, extra=fields)

    def _drain(self, receiver: ServiceBusReceiver | None) -> None:
        """On stop: settle invocations as they end until the grace runs out, then abandon the rest's messages."""
        while self._running and (remaining := self._deadline - time.monotonic()) > 0:
            self._settle_ended(receiver, wait=min(remaining, IDLE_WAIT))
        self._settle_ended(receiver, wait=0.0)
        if not self._running:
            return
        logger.warning(
            "%d invocation(s) of Functions.%s still running at the end of the stop grace: their messages are abandoned",
            len(self._running),
            self.function.function_name,
            extra=self._fields(action="servicebus_stop_timeout"),
        )
        for invocation in list(self._running):
            invocation.error = RuntimeError("the host stopped")
            self._settle(receiver, invocation)

    def _lock_lost(self, renewable: ServiceBusReceivedMessage | ServiceBusSession, error: Exception | None) -> None:
        """The renewer's ``on_lock_renew_failure`` (on its threads): renewal stopped before the message was settled."""
        message_id = getattr(renewable, "message_id", None)
        logger.warning(
            "lock of message %s of Functions.%s lost: %s",
            message_id,
            self.function.function_name,
            error,
            extra=self._fields(action="lock_lost", message_id=message_id),
        )


def _iso(moment: datetime | None) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds") if moment else "(null)"
