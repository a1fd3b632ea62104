"""Loopback ports for local services: a free one for tests, a clear error when a chosen one is taken, and the port a
service that bound port 0 names in its ready line."""

from __future__ import annotations

import re
import socket

LOOPBACK = "127.0.0.1"
_ADDRESS = re.compile(r"://[^\s/]+:(\d+)")


class PortBusy(RuntimeError):
    """The port a service was asked to use is already taken by another process."""


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_free(port: int, service: str, host: str = LOOPBACK) -> None:
    """Raise PortBusy naming ``service`` when ``port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves do: connections of a stopped server lingering in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise PortBusy(f"port {port} for {service} is busy on {host}; free it or choose another port") from e


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def bound_port(ready: str) -> int | None:
    """The port of the first address (``scheme://host:port``) in a service's ready line, if it names one."""
    found = _ADDRESS.search(ready)
    return int(found.group(1)) if found else None
