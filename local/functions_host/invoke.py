"""Calling one function: build ``azure.functions.HttpRequest``, run the user function, turn its answer into bytes.

Synchronous functions run on the server's request thread (the Functions Python worker uses a thread pool too);
coroutine functions run on one event loop shared by every request and timer, so clients they cache stay on one loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import azure.functions as func

from local.functions_host.routes import Route


@dataclass(frozen=True)
class WireResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class EventLoopThread:
    """One asyncio loop in a daemon thread, for coroutine functions."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="functions-host-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def host_params(query: str) -> dict[str, str]:
    """The query parameters as the Functions host passes them to a worker: names matched ignoring case (the first
    spelling kept), a repeated name's values joined with ``,`` and empty values left out (``?bands=`` is no
    parameter at all; ``?a=x&a=&A=y`` is ``a=x,y``), as ASP.NET Core's ``StringValues`` joins them."""
    spelled: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(spelled.setdefault(name.lower(), name), []).append(value)
    joined = {name: ",".join(v for v in given if v) for name, given in values.items()}
    return {name: value for name, value in joined.items() if value}


def build_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    params: Mapping[str, str],
    route_params: Mapping[str, str],
    body: bytes,
) -> func.HttpRequest:
    return func.HttpRequest(
        method=method.upper(),
        url=url,
        headers=dict(headers),
        params=dict(params),
        route_params=dict(route_params),
        body=body,
    )


def run_function(user_function: Callable[..., Any], kwargs: Mapping[str, Any], loop: EventLoopThread) -> Any:
    """Call a user function on this thread, or, when it is a coroutine function, on ``loop`` and wait for it."""
    if inspect.iscoroutinefunction(user_function):
        return loop.run(user_function(**kwargs))
    return user_function(**kwargs)


def call(route: Route, request: func.HttpRequest, loop: EventLoopThread) -> Any:
    """Run the user function with the request bound to its trigger's parameter name."""
    return run_function(route.user_function, {route.binding_name: request}, loop)


def to_wire(result: Any) -> WireResponse:
    """Turn a function's return value into status, headers and body, as the Python worker does."""
    if isinstance(result, func.HttpResponse):
        headers = [(k, v) for k, v in result.headers.items()]
        if not any(k.lower() == "content-type" for k, _ in headers):
            mimetype = result.mimetype
            content_type = f"{mimetype}; charset={result.charset}" if mimetype.startswith("text/") else mimetype
            headers.append(("Content-Type", content_type))
        return WireResponse(result.status_code, headers, result.get_body() or b"")
    if result is None:
        return WireResponse(204, [], b"")
    if isinstance(result, bytes | bytearray):
        return WireResponse(200, [("Content-Type", "application/octet-stream")], bytes(result))
    if isinstance(result, str):
        return WireResponse(200, [("Content-Type", "text/plain; charset=utf-8")], result.encode())
    return WireResponse(200, [("Content-Type", "application/json")], json.dumps(result).encode())


def problem(status: int, title: str, detail: str, code: str) -> WireResponse:
    """An ``application/problem+json`` answer from the host itself (404, 413, 500, ...)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "code": code}
    return WireResponse(status, [("Content-Type", "application/problem+json")], json.dumps(body).encode())
