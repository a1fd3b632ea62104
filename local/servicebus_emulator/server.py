"""Run the emulator: open the store, listen, log the ready line, stop cleanly on SIGTERM/SIGINT.

One port serves both protocols, so one connection string reaches both: a connection that opens with the AMQP
protocol header is an AMQP connection, anything else is HTTP, answered by the management API (``admin.py``). The
Python SDK's ``ServiceBusAdministrationClient`` keeps the connection string's port (see README.md). An optional
second port (``--http-port``, 5300 in Microsoft's emulator) serves the same, for tools that expect it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from .admin import ManagementApi, error_response
from .broker import Broker
from .config import EmulatorConfig
from .connection import Connection
from .httpd import HttpConnection
from .store import Store

__all__ = ["READY", "serve"]

_LOGGER = logging.getLogger(__name__)
READY = "Service Bus emulator ready: amqp://{host}:{port} management: http://{host}:{http_port}"
_AMQP = b"AMQP"
_TLS_HANDSHAKE = 0x16


class Sniffer(asyncio.Protocol):
    """A new connection's first bytes choose its protocol, which then takes over the transport."""

    def __init__(self, broker: Broker, api: ManagementApi, http: set[HttpConnection]) -> None:
        self._broker = broker
        self._api = api
        self._http = http  # the open HTTP connections, closed at shutdown (the broker closes the AMQP ones)
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        if len(self._buffer) < len(_AMQP) and _AMQP.startswith(self._buffer):
            return  # could still be the AMQP header
        if self._buffer[0] == _TLS_HANDSHAKE:
            _LOGGER.warning(
                "refused a TLS connection: the emulator speaks plain AMQP and HTTP only (UseDevelopmentEmulator=true;"
                " for ServiceBusAdministrationClient see local/servicebus_emulator/README.md)",
                extra={"action": "refuse-tls"},
            )
            self._transport.close()
            return
        protocol: asyncio.Protocol
        if self._buffer.startswith(_AMQP):
            protocol = Connection(self._broker)
        else:
            protocol = HttpConnection(self._api, error_response, self._http)
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(self._buffer)


async def serve(config: EmulatorConfig, host: str, port: int, data_dir: Path, http_port: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT; ``data_dir`` must exist. ``http_port``: an extra listener (0 = a free port)."""
    store = Store(data_dir / "servicebus.sqlite3", config.queues)
    broker = Broker(config, store)
    api = ManagementApi(store, config.namespace)
    http: set[HttpConnection] = set()
    loop = asyncio.get_running_loop()
    broker.start()
    ports = [port] if http_port is None else [port, http_port]
    servers = [await loop.create_server(lambda: Sniffer(broker, api, http), host, p, reuse_address=True) for p in ports]
    bound = [server.sockets[0].getsockname()[1] for server in servers]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queues = ", ".join(q.name for q in config.queues)
    _LOGGER.info("serving queues [%s] from %s", queues, data_dir, extra={"action": "start"})
    print(READY.format(host=host, port=bound[0], http_port=bound[-1]), file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        _LOGGER.info("stopping", extra={"action": "stop"})
        for server in servers:
            server.close()
        broker.stop()
        for connection in list(http):
            connection.abort()
        for server in servers:
            await server.wait_closed()
