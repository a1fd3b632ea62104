"""One POST over real sockets: the connection goes to the address the SSRF guard checked, while the ``Host`` header
and TLS (SNI and certificate verification) use the callback's host name; redirects are not followed."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared import webhooks
from shared.webhooks import post, resolve_target
from tests.http_server import LoopbackServer

pytestmark = pytest.mark.integration

HOST = "hooks.test"


@dataclass
class TlsServer:
    port: int
    cert_pem: bytes
    seen: list[dict[str, Any]] = field(default_factory=list)


def _self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem", pem


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsServer]:
    cert, key, pem = _self_signed(tmp_path)
    sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def remember(_sock: ssl.SSLObject, name: str, _ctx: ssl.SSLContext) -> None:
        sni.append(name)

    context.sni_callback = remember
    server_box: list[TlsServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            server_box[0].seen.append({"host": self.headers["host"], "sni": sni[-1] if sni else None,
                                       "path": self.path})  # fmt: skip
            status = 302 if self.path == "/moved" else 204
            self.send_response(status)
            if status == 302:
                self.send_header("location", "https://hooks.test/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    httpd = LoopbackServer(Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server_box.append(TlsServer(int(httpd.server_address[1]), pem))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    # The deliverer trusts certifi's CAs; here, the test's self-signed certificate instead.
    monkeypatch.setattr(webhooks, "_tls", lambda: ssl.create_default_context(cadata=pem.decode()))
    yield server_box[0]
    httpd.shutdown()
    httpd.server_close()


def loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


def test_https_goes_to_the_checked_address_with_the_names_sni_and_host(tls_server: TlsServer) -> None:
    target = resolve_target(f"https://{HOST}:{tls_server.port}/in", allow_private=True, resolver=loopback)
    outcome = post(target, b"{}", {"content-type": "application/json"}, 5.0)
    assert (outcome.status, outcome.delivered) == (204, True)
    assert tls_server.seen == [{"host": f"{HOST}:{tls_server.port}", "sni": HOST, "path": "/in"}]


def test_a_certificate_for_another_name_fails_the_attempt(tls_server: TlsServer) -> None:
    target = resolve_target(f"https://other.test:{tls_server.port}/in", allow_private=True, resolver=loopback)
    outcome = post(target, b"{}", {}, 5.0)
    assert outcome.status is None
    assert outcome.error is not None
    assert "ConnectError" in outcome.error
    assert "certificate" in outcome.error.lower()
    assert tls_server.seen == []


def test_a_redirect_is_not_followed(tls_server: TlsServer) -> None:
    target = resolve_target(f"https://{HOST}:{tls_server.port}/moved", allow_private=True, resolver=loopback)
    outcome = post(target, b"{}", {}, 5.0)
    assert (outcome.status, outcome.delivered, outcome.error) == (302, False, "HTTP 302")
    assert [s["path"] for s in tls_server.seen] == ["/moved"]


@contextmanager
def raw_http_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback TCP server that reads a request's first bytes, then lets ``answer`` write to the connection (an
    error writing, e.g. the client gave up, ends it)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                with suppress(OSError):
                    answer(connection)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield int(listener.getsockname()[1])
        thread.join(10)


def test_the_whole_attempt_is_bounded_by_the_timeout_not_each_read() -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-padding: " + b"a" * 40 + b"\r\n\r\n"
    sent: list[int] = []

    def drip(connection: socket.socket) -> None:  # each byte well within the timeout, all of them far past it
        for byte in response:
            try:
                connection.sendall(bytes([byte]))
            except OSError:  # the client gave up and closed
                return
            sent.append(byte)
            time.sleep(0.05)

    with raw_http_server(drip) as port:
        target = resolve_target(f"http://{HOST}:{port}/slow", allow_private=True, resolver=loopback)
        outcome = post(target, b"{}", {}, 0.5)
        given_up_after = len(sent)
    assert (outcome.status, outcome.delivered) == (None, False)
    assert outcome.error is not None
    assert outcome.error.startswith("ReadTimeout")
    # Every byte came within the read timeout, yet the attempt ended before the response was complete.
    assert given_up_after < len(response)


def test_the_response_body_is_never_read() -> None:
    def endless(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        while True:
            connection.sendall(chunk)

    with raw_http_server(endless) as port:
        target = resolve_target(f"http://{HOST}:{port}/big", allow_private=True, resolver=loopback)
        outcome = post(target, b"{}", {}, 5.0)
    assert (outcome.status, outcome.delivered) == (200, True)
