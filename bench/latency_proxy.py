"""A TCP proxy that holds back every byte for a fixed time each way: a local database as far away as Azure's.

    with DelayProxy(upstream_port, delay=0.0005) as proxy:   # 127.0.0.1:{proxy.port} -> 127.0.0.1:upstream_port
        ...

Locally a PostgreSQL round trip costs well under 0.1 ms (0.02-0.05 ms measured); between an Azure VM and Azure
Database for PostgreSQL in the same region it is about 1 ms, so a consumer that sends more statements per job pays
for them there and not here; so with Blob Storage and Service Bus (Azurite and the emulator locally). The benchmarks
give their consumers settings through this proxy (:meth:`DelayProxy.rehost`) to measure that
(``worker_throughput --db-rtt-ms``, ``--blob-rtt-ms``, ``--bus-rtt-ms``).

Each direction of each connection has a reading thread, which stamps what it reads with the time it is due, and a
writing thread, which sends it then, in order: the delay is added to every exchange without limiting throughput
(bytes read while earlier ones wait are on their way too; there is no backpressure, which exchanges of at most a
few tens of MB, the benchmarks' largest blobs, do not need). ``time.sleep`` wakes within ~0.1 ms here (asyncio's
timers round up to whole milliseconds). Both sockets have ``TCP_NODELAY``, as libpq's and urllib3's own. An end
of stream is passed on after the bytes before it (a half-close); once both directions have ended, or either failed,
both sockets are closed. Leaving the ``with`` closes every connection still open.

The threads run in the process that opened the proxy (a benchmark's): their CPU is counted in no consumer's.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import threading
import time
from types import TracebackType

from local.ports import LOOPBACK

CHUNK = 1 << 16


class _Connection:
    """A client's connection and its upstream one; closed once both directions ended (or one failed)."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.sockets = (client, server)
        self._lock = threading.Lock()
        self._open = 2  # directions still running

    def ended(self, *, failed: bool = False) -> bool:
        """One direction is done; ``True`` when the connection was closed by this call."""
        with self._lock:
            self._open = 0 if failed else self._open - 1
            if self._open > 0:
                return False
        self.close()
        return True

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv (closing alone does not)
            sock.close()


def upstream_of(setting: str) -> tuple[str, int]:
    """The ``(host, port)`` a ``postgresql://`` URL or a Blob or Service Bus connection string names: the first
    ``host:port`` after ``//`` or ``@`` and before a path, ``;`` or a query (not a ``user:password@``)."""
    match = re.search(r"(?:@|//)([^:/@;]+):(\d+)(?=[/;?]|$)", setting)
    if match is None:
        raise ValueError("the setting names no host:port")
    return match[1], int(match[2])


class DelayProxy:
    def __init__(self, upstream_port: int, *, delay: float, host: str = LOOPBACK) -> None:
        """``delay``: seconds added each way (a round trip gets twice that)."""
        self.delay = delay
        self._upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="delay-proxy", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (closing alone does not)
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            self._closed = True
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            connection.close()

    def rehost(self, setting: str) -> str:
        """``setting`` (a ``postgresql://`` URL, a Blob or Service Bus connection string) that names the upstream
        as ``host:port``, through the proxy: that port replaced by the proxy's. ``ValueError`` unless it names it
        exactly once."""
        upstream = f"{self._upstream[0]}:{self._upstream[1]}"
        named = re.compile(rf"(?<![\w.-]){re.escape(upstream)}(?!\d)")  # not inside a longer host or port
        if len(named.findall(setting)) != 1:
            raise ValueError(f"the setting does not name {upstream} once")
        return named.sub(f"{self._upstream[0]}:{self.port}", setting)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # shut down
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, server)
            with self._lock:
                if self._closed:
                    connection.close()
                    return
                self._connections.add(connection)
            self._pipe(connection, client, server)
            self._pipe(connection, server, client)

    def _pipe(self, connection: _Connection, source: socket.socket, sink: socket.socket) -> None:
        line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            try:
                while data := source.recv(CHUNK):
                    line.put((time.monotonic() + self.delay, data))
            except OSError:
                pass
            line.put((time.monotonic() + self.delay, b""))  # the end, after what came before it

        def write() -> None:
            failed = False
            try:
                while True:
                    due, data = line.get()
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        break
                    sink.sendall(data)
            except OSError:
                failed = True
            if connection.ended(failed=failed):
                with self._lock:
                    self._connections.discard(connection)

        for target in (read, write):
            threading.Thread(target=target, name=f"delay-proxy-{target.__name__}", daemon=True).start()
