"""A counting reverse proxy for the benchmarks: what a client reads over HTTP from a local server (Azurite).

    with CountingProxy(upstream_port, port) as proxy:   # http://127.0.0.1:{proxy.port}/... -> upstream
        ...
        proxy.bytes, proxy.requests                      # response body bytes passed on, requests answered

GET and HEAD only (what GDAL's ``/vsicurl/`` and the SDK's property reads send), HTTP/1.1 keep-alive towards the
client, one upstream connection per client connection. The body is streamed in 1 MiB chunks: the proxy holds no
more than that per request.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from local.ports import LOOPBACK

CHUNK = 1 << 20
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"})


class CountingProxy:
    def __init__(self, upstream_port: int, port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._server = _Server((LOOPBACK, port), _Forward, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    def count(self, sent: int) -> None:
        with self._lock:
            self.bytes += sent
            self.requests += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.requests = 0

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], proxy: CountingProxy) -> None:
        super().__init__(address, handler)
        self.proxy = proxy


class _Forward(BaseHTTPRequestHandler):
    """One client connection: its requests forwarded, in turn, on one upstream connection."""

    protocol_version = "HTTP/1.1"
    server: _Server
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def finish(self) -> None:
        super().finish()
        if self.upstream is not None:
            self.upstream.close()

    def do_HEAD(self) -> None:
        self._forward()

    def do_GET(self) -> None:
        self._forward()

    def _forward(self) -> None:
        proxy = self.server.proxy
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        self.upstream.request(self.command, self.path, headers=headers)
        response = self.upstream.getresponse()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        if self.command == "HEAD":
            self.end_headers()
            response.read()
            proxy.count(0)
        elif response.getheader("Content-Length") is None:  # chunked upstream: buffered, to give a length
            data = response.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            proxy.count(len(data))
        else:
            self.end_headers()
            sent = 0
            while chunk := response.read(CHUNK):
                self.wfile.write(chunk)
                sent += len(chunk)
            proxy.count(sent)
