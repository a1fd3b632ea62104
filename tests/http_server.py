"""The test suite's HTTP servers on loopback: a ``ThreadingHTTPServer`` on a free port for which a client that hangs
up mid-reply (a read the test cancelled, a timeout it provoked) is the normal end of a request, not an error.

The standard server prints the traceback of each such ``ConnectionResetError`` or ``BrokenPipeError`` to stderr,
where no test captures it once the request outlives its test.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HUNG_UP = (ConnectionResetError, BrokenPipeError)


class LoopbackServer(ThreadingHTTPServer):
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], HUNG_UP):
            super().handle_error(request, client_address)
