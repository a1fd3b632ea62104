"""bench/latency_proxy.py against a local echo server: bytes pass intact and in order, each way held back; the stack's
settings rehosted through it (bench.worker_throughput)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bench.latency_proxy import DelayProxy
from bench.worker_throughput import delayed
from local import azurite
from local.ports import is_listening
from local.servicebus_emulator.process import connection_string as servicebus_connection_string

DELAY = 0.01  # seconds each way: far above this machine's scheduling noise, so the lower bound below cannot flake
WAIT = 10.0  # seconds: a bound on a hang, never a speed claim


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
    server.close()
    thread.join(WAIT)


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = sock.recv(1 << 16)
        assert chunk, "the proxy closed the connection early"
        received += chunk
    return bytes(received)


def test_bytes_pass_intact_and_in_order_and_each_round_trip_takes_at_least_twice_the_delay(echo_port: int) -> None:
    payload = os.urandom(1 << 20)  # many chunks queued at once: their order must hold
    with DelayProxy(echo_port, delay=DELAY) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        assert _exchange(sock, payload) == payload
        started = time.monotonic()
        assert _exchange(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 2 * DELAY


def test_an_end_of_stream_is_passed_on_after_the_bytes_before_it(echo_port: int) -> None:
    with DelayProxy(echo_port, delay=DELAY) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.settimeout(WAIT)
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server sees the end once it has echoed them, and closes
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
        assert received == b"last words"


def test_leaving_the_proxy_closes_the_connections_still_open(echo_port: int) -> None:
    with DelayProxy(echo_port, delay=DELAY) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        assert _exchange(sock, b"ping") == b"ping"
    with sock:
        sock.settimeout(WAIT)
        assert sock.recv(1) == b""  # the client sees the end, not a hang


def test_a_setting_rehosted_names_the_proxy_and_keeps_the_rest() -> None:
    with DelayProxy(5432, delay=0.0) as proxy:
        url = proxy.rehost("postgresql://postgres@127.0.0.1:5432/jobs?sslmode=disable")
        assert url == f"postgresql://postgres@127.0.0.1:{proxy.port}/jobs?sslmode=disable"
        assert proxy.rehost("postgresql://127.0.0.1:5432/jobs") == f"postgresql://127.0.0.1:{proxy.port}/jobs"
        blob = "DefaultEndpointsProtocol=http;AccountName=a;BlobEndpoint=http://127.0.0.1:5432/a;"
        assert (
            proxy.rehost(blob)
            == f"DefaultEndpointsProtocol=http;AccountName=a;BlobEndpoint=http://127.0.0.1:{proxy.port}/a;"
        )
        bus = "Endpoint=sb://127.0.0.1:5432;SharedAccessKeyName=K;UseDevelopmentEmulator=true;"
        assert (
            proxy.rehost(bus)
            == f"Endpoint=sb://127.0.0.1:{proxy.port};SharedAccessKeyName=K;UseDevelopmentEmulator=true;"
        )


@pytest.mark.parametrize("setting", ["postgresql://127.0.0.1:54320/jobs", "postgresql://127.0.0.2:5432/jobs",
                                     "postgresql://1127.0.0.1:5432/jobs",
                                     "Endpoint=sb://127.0.0.1:5432;BlobEndpoint=http://127.0.0.1:5432/a;"])  # fmt: skip
def test_a_setting_that_does_not_name_the_upstream_once_is_refused(setting: str) -> None:
    with DelayProxy(5432, delay=0.0) as proxy, pytest.raises(ValueError, match="does not name"):
        proxy.rehost(setting)


@pytest.mark.parametrize(
    "setting",
    [azurite.connection_string, lambda port: servicebus_connection_string("127.0.0.1", port),
     lambda port: f"postgresql://postgres@127.0.0.1:{port}/postgres",
     lambda port: f"postgresql://u:1234@127.0.0.1:{port}/db?sslmode=disable"],
    ids=["blob", "bus", "database", "database with a password of digits"],
)  # fmt: skip
def test_the_throughput_benchmark_sends_each_stack_setting_through_a_proxy_that_adds_the_round_trip(
    setting: Callable[[int], str], echo_port: int
) -> None:
    """The stack's own setting formats, naming a backend (an echo server): what the consumers get names the proxy in
    its place and nothing else changes; bytes sent there reach the backend and come back one round trip late."""
    rtt = 2 * DELAY
    with contextlib.ExitStack() as proxied:
        through = delayed(proxied, setting(echo_port), rtt_ms=rtt * 1000)
        port = int(re.findall(r"127\.0\.0\.1:(\d+)", through)[0])
        assert port != echo_port
        assert through == setting(port)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            start = time.monotonic()
            assert _exchange(sock, b"ping") == b"ping"
            assert time.monotonic() - start >= rtt
    assert not is_listening(port)  # closed with the stack
