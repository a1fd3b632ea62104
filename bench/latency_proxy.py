"""A TCP proxy that holds back every byte for a fixed time each way: a local database as far away as Azure's.

    with DelayProxy(upstream_port, delay=0.0005) as proxy:   # 127.0.0.1:{proxy.port} -> 127.0.0.1:upstream_port
        ...

Locally a PostgreSQL round trip costs ~0.1 ms; between an Azure VM and Azure Database for PostgreSQL in the same
region it is about 1 ms, so a consumer that sends more statements per job pays for them there and not here. The
benchmarks give their consumers a ``DATABASE_URL`` through this proxy to measure that (``worker_throughput
--db-rtt-ms``). Each direction of each connection has a reading thread, which stamps what it reads with the time it
is due, and a writing thread, which sends it then, in order: the delay is added to every exchange without limiting
throughput (bytes read while earlier ones wait are on their way too). ``time.sleep`` wakes within ~0.1 ms here
(asyncio's timers round up to whole milliseconds). Both sockets have ``TCP_NODELAY``, as libpq's own.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import statistics
import threading
import time
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import psycopg

from local.ports import LOOPBACK

CHUNK = 1 << 16


class DelayProxy:
    def __init__(self, upstream_port: int, *, delay: float, host: str = LOOPBACK) -> None:
        """``delay``: seconds added each way (a round trip gets twice that)."""
        self.delay = delay
        self._upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="delay-proxy", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (closing alone does not)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
        self._thread.join(5)

    def url(self, database_url: str) -> str:
        """``database_url`` (a ``postgresql://`` URL of the upstream) through the proxy: its host and port replaced."""
        parts = urlsplit(database_url)
        user, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user}{at}{self._upstream[0]}:{self.port}"))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            try:
                while data := source.recv(CHUNK):
                    line.put((time.monotonic() + self.delay, data))
            except OSError:
                pass
            line.put((time.monotonic() + self.delay, b""))  # the end, after what came before it

        def write() -> None:
            try:
                while True:
                    due, data = line.get()
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
            except OSError:
                source.close()

        for target in (read, write):
            threading.Thread(target=target, name=f"delay-proxy-{target.__name__}", daemon=True).start()


def round_trip_ms(database_url: str, count: int = 200) -> float:
    """The median milliseconds of ``SELECT 1`` on one connection to ``database_url``."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)
