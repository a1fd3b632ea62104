"""Service Bus: the client (connection string locally, namespace + Entra credential in Azure) and the job publisher.

A job message's ``message_id`` is the job id, so the queue's duplicate detection drops a re-send within its window
(a submit retried after a timeout, an ``Idempotency-Key`` replay); the body is the JSON envelope of
:mod:`shared.messages`; the W3C trace context of the current span rides in the application properties.
"""

from __future__ import annotations

import logging
import threading

from azure.core.credentials import TokenCredential
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender
from azure.servicebus.exceptions import ServiceBusError

from shared.errors import BusUnavailable
from shared.messages import CONTENT_TYPE, SUBJECT, JobMessage
from shared.settings import Settings
from shared.telemetry import trace_properties

log = logging.getLogger(__name__)


def servicebus_client(settings: Settings, credential: TokenCredential | None = None) -> ServiceBusClient:
    if settings.servicebus_connection_string:
        return ServiceBusClient.from_connection_string(settings.servicebus_connection_string)
    from azure.identity import DefaultAzureCredential

    assert settings.servicebus_namespace, "Settings guarantees one of the two"
    return ServiceBusClient(settings.servicebus_namespace, credential or DefaultAzureCredential())


def job_message(message: JobMessage) -> ServiceBusMessage:
    return ServiceBusMessage(
        message.to_json(),
        message_id=str(message.job_id),
        content_type=CONTENT_TYPE,
        subject=SUBJECT,
        application_properties=trace_properties(),  # type: ignore[arg-type]  # dict[str, str] is accepted
    )


class JobPublisher:
    """Sends job messages on one long-lived sender (opened on first use, reopened after a failure); thread-safe."""

    def __init__(self, client: ServiceBusClient, queue_name: str, *, timeout: float = 30.0) -> None:
        self._client = client
        self._queue_name = queue_name
        self._timeout = timeout
        self._sender: ServiceBusSender | None = None
        self._lock = threading.Lock()

    def send(self, message: JobMessage) -> None:
        extra = {"job_id": str(message.job_id), "message_id": str(message.job_id), "action": "send"}
        with self._lock:
            try:
                if self._sender is None:
                    self._sender = self._client.get_queue_sender(self._queue_name)
                self._sender.send_messages(job_message(message), timeout=self._timeout)
            except ServiceBusError as e:
                self._close_sender()
                raise BusUnavailable(f"could not send to queue {self._queue_name!r}: {e}"[:1000]) from e
        log.info("sent job %s", message.job_id, extra=extra)

    def _close_sender(self) -> None:
        if self._sender is not None:
            try:
                self._sender.close()
            except ServiceBusError:
                log.debug("closing a failed sender failed too", exc_info=True)
            self._sender = None

    def close(self) -> None:
        with self._lock:
            self._close_sender()
        self._client.close()
