"""Queue depths for ``GET /api/stats``: each queue's active, scheduled and dead-letter message counts.

Read through ``ServiceBusAdministrationClient.get_queue_runtime_properties`` (the namespace's ATOM management
endpoint, one HTTPS GET per queue) on one long-lived client. Any SDK failure becomes
:class:`shared.errors.BusUnavailable`.

Permissions. With a connection string the SAS rule needs the ``Manage`` right (an entity read needs the Manage or
EntityRead claim; ``Listen``/``Send`` rules get 401). With Microsoft Entra ID it is a data-plane call (token
audience ``https://servicebus.azure.net``, not ARM), authorised by the RBAC action
``Microsoft.ServiceBus/namespaces/queues/read``. The built-in *Azure Service Bus Data Receiver* and *Data Sender*
roles both list it (``actions``: ``Microsoft.ServiceBus/*/queues/read``, ``*/topics/read``,
``*/topics/subscriptions/read``) and *Data Owner* has ``Microsoft.ServiceBus/*``:
https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/integration#azure-service-bus-data-receiver
So Data Receiver (or Sender) on each reported queue, or on the namespace, should be enough, with no ARM Reader
role. Not yet verified against a live namespace (community reports differ, e.g. Azure/Azure-Functions#2379): if
the call answers 401 there, *Data Owner* scoped to the queues is the documented superset.

The emulator. Version 7.15 of the SDK parses ``UseDevelopmentEmulator=true`` into ``use_tls=False`` but only the
AMQP clients honour it: the administration client still builds ``https://{host}:{port}`` URLs. With that flag the
client gets a transport that sends plain HTTP to the same host and port, which is what ``use_tls=False`` means and
what our emulator (``local/servicebus_emulator``, on its AMQP port) and Microsoft's (port 5300) serve.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast, overload

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError
from azure.core.pipeline.transport import HttpRequest, HttpResponse, RequestsTransport
from azure.servicebus.management import ServiceBusAdministrationClient
from pydantic import BaseModel, ConfigDict

from shared.errors import BusUnavailable

if TYPE_CHECKING:
    from azure.core.rest import HttpRequest as RestHttpRequest
    from azure.core.rest import HttpResponse as RestHttpResponse

    from shared.settings import Settings

__all__ = ["PlainHttpTransport", "QueueCounts", "QueueStats"]

log = logging.getLogger(__name__)


class QueueCounts(BaseModel):
    """One queue's message counts. ``total`` is the service's MessageCount: active, scheduled and dead-lettered
    messages together (transfer counts are always 0: nothing auto-forwards)."""

    model_config = ConfigDict(frozen=True)

    name: str
    active: int
    scheduled: int
    dead_letter: int
    total: int


class QueueStats:
    """Reads queue counts on one long-lived :class:`ServiceBusAdministrationClient`; thread-safe.

    Build it once at the entrypoint (:meth:`from_connection_string`, :meth:`from_namespace` or
    :meth:`from_settings`) and close it on shutdown (``with QueueStats...`` or :meth:`close`). ``timeout`` bounds
    the connection and the read of each HTTP request; a failed request is retried once.
    """

    def __init__(self, client: ServiceBusAdministrationClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._opened = False

    @classmethod
    def from_connection_string(cls, connection_string: str, *, timeout: float = 5.0) -> QueueStats:
        transport = PlainHttpTransport if _is_emulator(connection_string) else RequestsTransport
        options = _options(timeout)
        client = ServiceBusAdministrationClient.from_connection_string(
            connection_string, transport=transport(**options), **options
        )
        return cls(client)

    @classmethod
    def from_namespace(
        cls, fully_qualified_namespace: str, credential: TokenCredential, *, timeout: float = 5.0
    ) -> QueueStats:
        options = _options(timeout)
        client = ServiceBusAdministrationClient(
            fully_qualified_namespace, credential, transport=RequestsTransport(**options), **options
        )
        return cls(client)

    @classmethod
    def from_settings(cls, settings: Settings, credential: TokenCredential | None = None) -> QueueStats:
        """The same namespace as :func:`shared.bus.servicebus_client`: the connection string when there is one."""
        if settings.servicebus_connection_string:
            return cls.from_connection_string(settings.servicebus_connection_string)
        from azure.identity import DefaultAzureCredential

        assert settings.servicebus_namespace, "Settings guarantees one of the two"
        return cls.from_namespace(settings.servicebus_namespace, credential or DefaultAzureCredential())

    def __enter__(self) -> QueueStats:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def _open(self) -> None:
        """Open the HTTP session once, before any request: the SDK's transport opens it lazily and unguarded."""
        with self._lock:
            if not self._opened:
                self._client.__enter__()
                self._opened = True

    def counts(self, queue_names: Sequence[str]) -> list[QueueCounts]:
        """The counts of each queue, in the order given; :class:`BusUnavailable` when one cannot be read
        (namespace unreachable, not authorised, unknown queue)."""
        self._open()
        return [self._count(name) for name in queue_names]

    def _count(self, name: str) -> QueueCounts:
        try:
            props = self._client.get_queue_runtime_properties(name)
        except AzureError as e:  # ServiceBusError, HttpResponseError (401, 404, ...), ServiceRequestError, ...
            log.warning("could not read queue %s: %s", name, type(e).__name__, extra={"queue": name, "action": "stats"})
            raise BusUnavailable(f"could not read the counts of queue {name!r}: {type(e).__name__}: {e}"[:1000]) from e
        return QueueCounts(
            name=name,
            active=props.active_message_count or 0,
            scheduled=props.scheduled_message_count or 0,
            dead_letter=props.dead_letter_message_count or 0,
            total=props.total_message_count or 0,
        )


def _options(timeout: float) -> dict[str, Any]:
    return {"connection_timeout": timeout, "read_timeout": timeout, "retry_total": 1, "retry_backoff_factor": 0.2}


def _is_emulator(connection_string: str) -> bool:
    """The SDK's own test (``_parse_conn_str``): ``UseDevelopmentEmulator=true``, the key in any case."""
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "usedevelopmentemulator":
            return value.strip() == "true"
    return False


class PlainHttpTransport(RequestsTransport):  # type: ignore[misc]  # azure-core exports it lazily: Any to mypy
    """``use_tls=False`` for the administration client: each request goes to the same host and port over plain
    HTTP. Only for a connection string with ``UseDevelopmentEmulator=true`` (:meth:`QueueStats.from_connection_string`
    chooses it), like the SDK's plain AMQP: the SAS token travels in clear."""

    @overload
    def send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse: ...

    @overload
    def send(self, request: RestHttpRequest, **kwargs: Any) -> RestHttpResponse: ...

    def send(self, request: HttpRequest | RestHttpRequest, **kwargs: Any) -> HttpResponse | RestHttpResponse:
        if request.url.startswith("https://"):
            request.url = "http://" + request.url.removeprefix("https://")
        return cast("HttpResponse | RestHttpResponse", super().send(request, **kwargs))
