"""Reading a connection within bounds, as Kestrel (the Functions host's web server) does, so that a stalled or
trickling client cannot hold a server thread for long.

- The request line and headers must arrive within ``header_timeout`` of the moment the server starts waiting for them
  (Kestrel's ``RequestHeadersTimeout``, 30 s); an idle keep-alive connection is closed then too.
- A body must arrive at ``min_rate`` bytes per second on average once ``grace`` seconds have passed (Kestrel's
  ``MinRequestBodyDataRate``: 240 bytes/s, 5 s grace).
- And no single read waits longer than ``idle`` seconds.

Each ``recv`` gets the socket timeout that is left, so one raises ``TimeoutError`` once a bound is passed.
"""

from __future__ import annotations

import io
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadLimits:
    header_timeout: float = 30.0
    min_rate: float = 240.0
    grace: float = 5.0
    idle: float = 30.0


class DeadlineReader(io.RawIOBase):
    """The reading side of ``sock``; wrap it in ``io.BufferedReader``. ``received``: bytes read in the current phase."""

    def __init__(self, sock: socket.socket, limits: ReadLimits) -> None:
        super().__init__()
        self._sock = sock
        self._limits = limits
        self._started = time.monotonic()
        self._body = False
        self.received = 0

    def expect_request(self) -> None:
        """From now on: a request line and headers, within ``header_timeout``."""
        self._started, self._body, self.received = time.monotonic(), False, 0

    def expect_body(self) -> None:
        """From now on: a body, at ``min_rate`` on average after ``grace``."""
        self._started, self._body, self.received = time.monotonic(), True, 0

    def _deadline(self) -> float:
        limits = self._limits
        if not self._body:
            return self._started + limits.header_timeout
        return self._started + max(limits.grace, self.received / limits.min_rate)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self._deadline() - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client sent too slowly")
        self._sock.settimeout(min(left, self._limits.idle))
        count = self._sock.recv_into(buffer)
        self.received += count
        return count
