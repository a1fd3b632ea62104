"""A real webhook receiver on loopback for tests and benchmarks: a ThreadingHTTPServer that verifies each delivery's
Standard Webhooks signature with the job's secret (``standardwebhooks.Webhook(secret).verify``), records it, and
answers with the status the test scripted (``fail_first`` 500s, then 200; or ``always``)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.http_server import LoopbackServer


@dataclass
class Received:
    path: str
    at: float  # time.time() when the request arrived
    headers: dict[str, str]
    body: bytes
    verified: bool | None  # None: no secret registered for the path
    status: int  # what the receiver answered

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Script:
    secret: str | None = None
    fail_first: int = 0
    fail_status: int = 500
    always: int | None = None  # answer this status to every request


@dataclass
class WebhookReceiver:
    """``with WebhookReceiver() as receiver``; ``receiver.url(path, secret=..., fail_first=...)`` scripts a path."""

    scripts: dict[str, Script] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def __enter__(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver._record(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = LoopbackServer(Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, path: str, **script: Any) -> str:
        self.scripts[path] = Script(**script)
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            script = self.scripts.get(path, Script())
            seen = sum(r.path == path for r in self.received)
            verified = None
            if script.secret is not None:
                try:
                    Webhook(script.secret).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
            if script.always is not None:
                status = script.always
            else:
                status = script.fail_status if seen < script.fail_first else 200
            if verified is False:
                status = 401
            self.received.append(Received(path, time.time(), headers, body, verified, status))
            return status
