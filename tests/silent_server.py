"""A TCP server that accepts connections, reads what comes and never answers: a backend that hangs.

Where a client's bound (its read timeout, a probe's deadline) is what ends a call, this makes the bound the only way
out, so a test can assert what the bound produced (an error, a count of requests, a "timed out" check) instead of
how long it took. ``requests`` counts the HTTP request heads received.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class SilentServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # the accept loop looks at _closed this often
        self.port: int = self._listener.getsockname()[1]
        self.requests = 0
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # wakes its reader; the client may have closed it already
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(None)
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), name="silent-connection", daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        pending = b""
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\r\n\r\n" in pending:  # a request's head (the bodies of the requests these tests send are empty)
                _, pending = pending.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.requests += 1
