"""Webhooks (Standard Webhooks): the callback a client gives at submit, its secret, the SSRF guard, the payload, the
signature, one delivery attempt and the backoff between attempts.

* :func:`validate_callback` checks ``callback_url``/``callback_events`` at submit (no DNS look-up: the address is
  checked again, resolved, at every delivery by :func:`resolve_target`);
* :func:`new_secret`: a job's signing secret, ``whsec_`` + base64 of 24 random bytes;
* :func:`resolve_target` (the SSRF guard) resolves the host and refuses every address :func:`is_public` refuses
  (private, loopback, link-local, shared, multicast, reserved, unspecified, documentation ranges, cloud platform
  endpoints such as Azure's 168.63.129.16, and IPv6 forms of those), and plain http, unless ``allow_private``
  (``WEBHOOK_ALLOW_PRIVATE``, local development only). :func:`post` then connects to *the address that was checked*
  (the request's URL names the IP, the ``Host`` header and TLS SNI name the host), so a DNS answer that changes
  between the check and the connection (DNS rebinding) cannot point the request elsewhere;
* :func:`payload` / :func:`signed_headers` / :func:`post`: the body, the ``webhook-*`` headers, and one POST
  (``WEBHOOK_TIMEOUT`` for the whole of it, redirects never followed, the response body never read);
* :func:`backoff`: ``WEBHOOK_BACKOFF`` doubled per attempt, at most ``WEBHOOK_BACKOFF_MAX``.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx
from standardwebhooks import Webhook

from shared.lifecycle import Notice
from shared.rejection import Rejected
from shared.status import client_message

if TYPE_CHECKING:
    from shared.events import Delivery

MAX_URL_LENGTH = 2048
USER_AGENT = "crop-ai-webhooks/1"
SECRET_PREFIX = "whsec_"
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def new_secret() -> str:
    """A job's signing secret: ``whsec_`` + base64 of 24 random bytes (what ``standardwebhooks.Webhook`` takes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def validate_callback(url: str, events: str | None, *, allow_private: bool) -> tuple[str, list[str] | None]:
    """``(url, events)`` as the job stores them, or :class:`Rejected` (``invalid_callback_url``,
    ``invalid_callback_events``). ``events``: comma-separated groups (``started``, ``progress``, ``completed``);
    ``None`` stores ``None`` (completed only). Without ``allow_private`` the URL must be https and must not name a
    local host or a non-public IP address (a host name is resolved and checked again at every delivery)."""
    return _validate_url(url, allow_private=allow_private), _validate_events(events)


def _validate_url(url: str, *, allow_private: bool) -> str:
    url = url.strip()
    why = _url_problem(url, allow_private=allow_private)
    if why is not None:
        raise Rejected("invalid_callback_url", f"callback_url {url[:100]!r} {why}")
    return url


def _url_problem(url: str, *, allow_private: bool) -> str | None:
    """What is wrong with ``url`` as a callback, or ``None``."""
    if not url or len(url) > MAX_URL_LENGTH:
        return f"must be an absolute URL of at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as e:
        return f"is not a valid URL ({e})"
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.scheme.lower() not in (("https", "http") if allow_private else ("https",)):
        return "must use http or https" if allow_private else "must use https"
    if not host or port == 0:
        return "has no host (or port 0)"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@); put a token in the path or query instead"
    if parts.fragment:
        return "must not have a fragment (#...)"
    if allow_private:
        return None
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return "names a local host"
    address = _literal_address(host)
    if address is not None and not is_public(address):
        return "names a private, loopback, link-local or reserved address"
    return None


def _validate_events(events: str | None) -> list[str] | None:
    if events is None:
        return None
    known = [notice.value for notice in Notice]
    given = [name.strip().lower() for name in events.split(",")]
    unknown = [name for name in given if name not in known]
    if not events.strip() or unknown or "" in given:
        raise Rejected(
            "invalid_callback_events",
            f"callback_events {events[:100]!r} must be a comma-separated list of {', '.join(known)}",
        )
    return [name for name in known if name in given]  # canonical order, no duplicates


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# Never a webhook target, whatever the standard library's address properties say (they differ between Python
# versions and miss some): special-purpose ranges (RFC 6890 and the IANA registries), and cloud endpoints on
# addresses that look public or that a version may not flag.
_DENIED_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "100.64.0.0/10",  # shared address space (CGNAT; 100.100.100.200 is Alibaba Cloud's metadata service)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: 169.254.169.254 is the metadata service of Azure, AWS, GCP and others
        "168.63.129.16/32",  # Azure WireServer / platform DNS: a public-looking address every Azure VM reaches
        "192.0.0.0/24",  # IETF protocol assignments (192.0.0.192: Oracle Cloud's metadata service)
        "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and 255.255.255.255 (broadcast)
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible addresses (::a.b.c.d)
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): what it reaches is the operator's choice
        "100::/64",  # discard-only
        "2001:db8::/32", "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local (fd00:ec2::254: AWS's IPv6 metadata service)
        "fec0::/10",  # site-local (deprecated, still routed inside some networks)
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix: the last 32 bits are the IPv4 target


def is_public(address: IPAddress) -> bool:
    """Whether a webhook may go to ``address`` in production: a global unicast address, none of
    ``_DENIED_NETWORKS``. An IPv6 address that carries an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
    ``64:ff9b::a.b.c.d``, 6to4 ``2002::/16``, Teredo: both its server and its client) is judged by the IPv4
    addresses it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = _carried_ipv4(address)
        if carried:
            return all(is_public(embedded) for embedded in carried)
    if any(address in network for network in _DENIED_NETWORKS):
        return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _carried_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    return list(address.teredo) if address.teredo is not None else []


# Delivery: the SSRF guard, the payload, the signature, one POST, the backoff


class Refused(Exception):
    """The callback may not be called (a non-public address, plain http in production): no attempt will help."""


@dataclass(frozen=True)
class Target:
    """Where a POST goes: the URL as given (``Host`` header, TLS server name) and the checked address it connects to."""

    url: str
    host: str
    port: int
    address: IPAddress

    @property
    def pinned_url(self) -> str:
        """``url`` with its host replaced by the checked address (the connection goes there and nowhere else)."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return urlunsplit(parts._replace(netloc=f"{literal}:{self.port}"))

    @property
    def host_header(self) -> str:
        return urlsplit(self.url).netloc


Resolver = Callable[[str, int], list[str]]


def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the system resolver); :class:`OSError` when it does not resolve."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_target(url: str, *, allow_private: bool, resolver: Resolver = getaddrinfo_resolver) -> Target:
    """Resolve the callback's host and check every address it resolves to: :class:`Refused` unless all are public
    (or ``allow_private``) and the scheme is https (or ``allow_private``). :class:`OSError` when the name does not
    resolve right now (a failed attempt, retried)."""
    why = _url_problem(url, allow_private=allow_private)
    if why is not None:
        raise Refused(f"callback_url {why}")
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    literal = _literal_address(host)
    addresses = (
        [literal] if literal is not None else [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
    )
    if not addresses:
        raise OSError(f"{host} resolved to no address")
    if not allow_private and not all(is_public(a) for a in addresses):  # not which: they may be our network's
        raise Refused(f"{host} resolves to a non-public address")
    return Target(url=url, host=host, port=port, address=addresses[0])


def payload(delivery: Delivery, result: dict[str, Any] | None) -> dict[str, Any]:
    """The Standard Webhooks body: ``{type, timestamp, data}``; ``timestamp`` is when the event happened, ``data``
    the job as the transition left it (``result``: given for ``job.succeeded``)."""
    stored = delivery.payload
    data: dict[str, Any] = {"job_id": str(delivery.job_id), "status": stored.get("status"),
                            "attempt": stored.get("attempt")}  # fmt: skip
    code = stored.get("error_code")
    if code and stored.get("status") == "failed":
        data["error"] = {"code": code, "message": client_message(code, stored.get("error_message"))}
    if stored.get("progress") is not None:
        data["progress"] = stored["progress"]
    if delivery.type == "job.succeeded" and result is not None:
        data["result"] = result
    timestamp = delivery.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {"type": delivery.type, "timestamp": timestamp, "data": data}


def signed_headers(secret: str, msg_id: str, at: datetime, body: str) -> dict[str, str]:
    """The ``webhook-*`` headers of one attempt (``at``: the attempt's time, checked by receivers against replay)."""
    at = at.astimezone(UTC)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: the HTTP status (``None``: no response) and, without a 2xx, why."""

    status: int | None
    error: str | None = None
    final: bool = False  # no later attempt can help: the receiver said 410 Gone, or the guard refused the target

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> Outcome:
    """One POST to ``target`` over a connection to its checked address. ``timeout`` bounds the whole of it (connect,
    TLS handshake, sending, the response's status line and headers), not each read or write: a receiver that
    answers a byte at a time is cut off at the deadline. Redirects are not followed (a 3xx is a failed attempt), no
    proxy is used, the response body is never read (the connection is closed after the headers, which h11 caps at
    100 KiB)."""
    https = target.url.lower().startswith("https")
    extensions: dict[str, Any] = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)}
    if https:
        extensions["sni_hostname"] = target.host
    backend = _DeadlineBackend(time.monotonic() + timeout)
    request_headers = [*headers.items(), ("host", target.host_header)]
    with httpcore.ConnectionPool(ssl_context=_tls() if https else None, network_backend=backend) as pool:
        try:
            with pool.stream("POST", target.pinned_url, headers=request_headers, content=body,
                             extensions=extensions) as response:  # fmt: skip
                status = response.status  # leaving the block closes the connection, the body unread
        except _HTTP_ERRORS as e:
            return Outcome(None, f"{type(e).__name__}: {e}"[:500])
    if 200 <= status < 300:
        return Outcome(status)
    return Outcome(status, f"HTTP {status}", final=status == 410)


_HTTP_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol)
_WRITE_CHUNK = 4096  # bytes per send, so that each waits at most what is left of the deadline


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sockets, with every connect, TLS handshake, read and write waiting at most until ``deadline``
    (``time.monotonic()``): httpcore's timeouts apply to each operation, this bounds their sum."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        wait = _left(self._deadline, timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, wait, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("a webhook never goes to a unix socket")


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_CHUNK):
            chunk = buffer[start : start + _WRITE_CHUNK]
            self._stream.write(chunk, _left(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        wait = _left(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, wait), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _left(deadline: float, timeout: float | None, late: type[httpcore.TimeoutException]) -> float:
    """What an operation may wait: its own ``timeout``, at most until ``deadline``; ``late`` raised once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("the attempt's deadline (WEBHOOK_TIMEOUT) passed")
    return left if timeout is None else min(timeout, left)


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context (certifi's CAs) for every POST: building it costs ~20 ms; a connection is never reused."""
    return httpx.create_ssl_context()


def backoff(attempt: int, base: timedelta, cap: timedelta) -> timedelta:
    """The wait after failed attempt ``attempt`` (1 = the first): ``base`` doubled per attempt, at most ``cap``."""
    exponent = min(attempt - 1, 30)  # 2**30 * any base is past any sane cap: no overflow
    delay: timedelta = base * (2**exponent)
    return min(delay, cap)


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"  # a 2xx
    RETRY = "retry"  # a later attempt, as a new scheduled message
    GIVE_UP = "give_up"  # 410 Gone or a refused target: stop, settle the message normally
    ABANDON = "abandon"  # the last attempt failed: give up and raise, the broker dead-letters after MaxDeliveryCount


def decide(outcome: Outcome, attempt: int, max_attempts: int) -> Verdict:
    """What follows attempt ``attempt`` (of ``max_attempts``) that got ``outcome``."""
    if outcome.delivered:
        return Verdict.DELIVERED
    if outcome.final:
        return Verdict.GIVE_UP
    return Verdict.RETRY if attempt < max_attempts else Verdict.ABANDON
