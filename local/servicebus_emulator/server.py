"""Run the emulator: open the store, listen, log the ready line, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from .broker import Broker
from .config import EmulatorConfig
from .connection import Connection
from .store import Store

__all__ = ["READY", "serve"]

_LOGGER = logging.getLogger(__name__)
READY = "Service Bus emulator ready: amqp://{host}:{port}"


async def serve(config: EmulatorConfig, host: str, port: int, data_dir: Path) -> None:
    """Serve until SIGTERM or SIGINT; ``data_dir`` must exist."""
    store = Store(data_dir / "servicebus.sqlite3", config.queues)
    broker = Broker(config, store)
    loop = asyncio.get_running_loop()
    broker.start()
    server = await loop.create_server(lambda: Connection(broker), host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queues = ", ".join(q.name for q in config.queues)
    _LOGGER.info("serving queues [%s] from %s", queues, data_dir, extra={"action": "start"})
    print(READY.format(host=host, port=bound), file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        _LOGGER.info("stopping", extra={"action": "stop"})
        server.close()
        broker.stop()
        await server.wait_closed()
