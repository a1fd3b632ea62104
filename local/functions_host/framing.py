"""Request body framing (RFC 9112 section 6), checked before anything else, as the host's web server checks it.

``Transfer-Encoding`` must end in ``chunked``; ``Content-Length`` values must be digits and all the same; with both, the
chunked framing wins and the connection is closed after the answer. Anything else is a 400: a server that guessed
would read the rest as the next request. A chunked body is read (so the connection stays usable) but not kept: the
Functions host does not pass chunked bodies to out-of-process workers (azure-functions-host#7930), so the function
gets an empty body, as in Azure.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from email.message import Message

_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
_PIECE = 64 * 1024


class BadFraming(ValueError):
    """The request's body length cannot be determined reliably: answer 400 and close."""


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Framing:
    chunked: bool
    length: int  # Content-Length (0 when chunked or absent)
    close: bool  # both Content-Length and Transfer-Encoding: close the connection after the answer


def _values(headers: Message, name: str) -> list[str]:
    return [v.strip() for field in headers.get_all(name) or [] for v in str(field).split(",") if v.strip()]


def framing_of(headers: Message) -> Framing:
    codings = [v.lower() for v in _values(headers, "Transfer-Encoding")]
    lengths = _values(headers, "Content-Length")
    if codings:
        if codings[-1] != "chunked" or codings.count("chunked") > 1:
            raise BadFraming(f"Transfer-Encoding {', '.join(codings)!r} does not end in a single 'chunked'")
        return Framing(chunked=True, length=0, close=bool(lengths))
    if not lengths:
        return Framing(chunked=False, length=0, close=False)
    if any(not _DIGITS.fullmatch(v) for v in lengths):
        raise BadFraming(f"Content-Length {', '.join(lengths)!r} is not a number")
    if len({int(v) for v in lengths}) > 1:
        raise BadFraming(f"conflicting Content-Length values {', '.join(lengths)}")
    return Framing(chunked=False, length=int(lengths[0]), close=False)


def read_exactly(rfile: io.BufferedIOBase, length: int) -> bytes:
    data = rfile.read(length)
    if len(data) < length:
        raise ConnectionResetError(f"the client sent {len(data)} of {length} bytes and closed the connection")
    return data


def drain_chunked(rfile: io.BufferedIOBase, limit: int) -> int:
    """Read a chunked body and its trailers; return its size. :class:`BodyTooLarge` past ``limit`` bytes."""
    total = 0
    while True:
        line = rfile.readline(1024)
        size_field = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not _HEX.fullmatch(size_field):
            raise BadFraming("malformed chunk size line")
        size = int(size_field, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise BodyTooLarge
        while size:
            size -= len(read_exactly(rfile, min(size, _PIECE)))
        if rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadFraming("a chunk is longer than its size line says")
    for _ in range(100):  # trailers
        if rfile.readline(8192) in (b"\r\n", b"\n"):
            return total
    raise BadFraming("too many trailer lines")
