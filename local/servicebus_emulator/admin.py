"""The management (ATOM) REST API, read-only: what ``ServiceBusAdministrationClient`` needs to read queues.

Routes (``GET``; ``api-version`` and ``enrich`` are accepted and ignored, entity names are case-insensitive):

- ``/{queue}``: the queue's entry, a ``QueueDescription`` with its ``CountDetails`` (``get_queue``,
  ``get_queue_runtime_properties``);
- ``/{name}`` that is no queue, and ``/``: 200 with an empty feed, as the service answers (the SDK raises
  ``ResourceNotFoundError``);
- ``/$Resources/queues``: every queue, paged by ``$skip`` and ``$top`` (``list_queues``,
  ``list_queues_runtime_properties``); ``/$Resources/topics``: an empty feed;
- any other path: 404, any other method: 405 (queues come from the configuration file), both as the service's
  ``<Error><Code/><Detail/></Error>``.

Authorization: a request without an ``Authorization`` header carrying a ``SharedAccessSignature`` or ``Bearer``
token is refused with 401 (``ClientAuthenticationError`` in the SDK), as the service does. The token itself is
not validated, as on the AMQP side (``$cbs``) and in Microsoft's emulator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from . import atom
from .broker import now_ms
from .config import QueueConfig
from .httpd import Request, Response
from .store import Store

__all__ = ["ManagementApi", "error_response"]

_LOGGER = logging.getLogger(__name__)
_ENTRY = "application/atom+xml;type=entry;charset=utf-8"
_FEED = "application/atom+xml;type=feed;charset=utf-8"
_SCHEMES = ("sharedaccesssignature ", "bearer ")


def error_response(status: int, detail: str) -> Response:
    headers = (("Allow", "GET"),) if status == HTTPStatus.METHOD_NOT_ALLOWED else ()
    return Response(status, atom.error(status, detail), headers=headers)


class ManagementApi:
    """Answers management requests from the store's current state (one event-loop turn, nothing written)."""

    def __init__(self, store: Store, namespace: str, clock: Callable[[], int] = now_ms) -> None:
        self._store = store
        self._namespace = namespace
        self._clock = clock
        self._queues = {name.lower(): queue for name, queue in store.queues.items()}

    def __call__(self, request: Request) -> Response:
        url = urlsplit(request.target)
        path = unquote(url.path).strip("/")
        _LOGGER.debug("%s /%s", request.method, path, extra={"action": "management"})
        auth = request.headers.get("authorization", "").lower()
        if not auth.startswith(_SCHEMES):
            return error_response(
                HTTPStatus.UNAUTHORIZED, "MissingToken: The request has no SharedAccessSignature or Bearer token."
            )
        if request.method != "GET":
            return error_response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{request.method} is not supported: the emulator's queues come from its configuration file.",
            )
        base = f"http://{request.headers.get('host', 'localhost')}"
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        segments = path.split("/") if path else []
        if len(segments) <= 1:
            queue = self._queues.get(path.lower())
            if queue is None:
                return Response(HTTPStatus.OK, atom.empty_feed(self._clock()), _FEED)
            return Response(HTTPStatus.OK, self._entry(base, queue, query), _ENTRY)
        if segments[0].lower() == "$resources" and len(segments) == 2:
            kind = segments[1].lower()
            if kind in ("queues", "topics"):
                return self._list(base, kind, query)
        return error_response(HTTPStatus.NOT_FOUND, f"No management resource at '/{path}'.")

    def _entry(self, base: str, queue: QueueConfig, query: dict[str, str]) -> bytes:
        url = f"{base}/{queue.name}?{urlencode({'api-version': query.get('api-version', '2021-05')})}"
        return atom.queue_entry(url, self._namespace, queue, self._store.runtime(queue.name))

    def _list(self, base: str, kind: str, query: dict[str, str]) -> Response:
        try:
            skip, top = int(query.get("$skip", "0")), int(query.get("$top", "100"))
        except ValueError:
            return error_response(HTTPStatus.BAD_REQUEST, "$skip and $top must be integers.")
        if skip < 0 or not 0 < top <= 100:
            return error_response(HTTPStatus.BAD_REQUEST, "$skip must be >= 0 and $top between 1 and 100.")
        version = query.get("api-version", "2021-05")
        names = sorted(self._store.queues, key=str.lower) if kind == "queues" else []
        page = [
            (f"{base}/{name}?{urlencode({'api-version': version})}", self._store.queues[name])
            for name in names[skip : skip + top]
        ]

        def link(start: int) -> str:
            return f"{base}/$Resources/{kind}?{urlencode({'$skip': start, '$top': top, 'api-version': version})}"

        body = atom.feed(
            link(skip),
            kind.capitalize(),
            self._namespace,
            [(url, queue, self._store.runtime(queue.name)) for url, queue in page],
            link(skip + top) if skip + top < len(names) else None,
            self._clock(),
        )
        return Response(HTTPStatus.OK, body, _FEED)
