"""Webhooks (Standard Webhooks): the callback a client gives at submit, its secret, the SSRF guard, the payload, the
signature, one delivery attempt and the backoff between attempts.

* :func:`validate_callback` checks ``callback_url``/``callback_events`` at submit (no DNS look-up: the address is
  checked again, resolved, at every delivery by :func:`resolve_target`);
* :func:`new_secret`: a job's signing secret, ``whsec_`` + base64 of 24 random bytes;
* :func:`resolve_target` (the SSRF guard) resolves the host and refuses private, loopback, link-local, multicast,
  reserved and unspecified addresses, and plain http, unless ``allow_private`` (``WEBHOOK_ALLOW_PRIVATE``, local
  development only). :func:`post` then connects to *the address that was checked* (the request's URL names the IP,
  the ``Host`` header and TLS SNI name the host), so a DNS answer that changes between the check and the connection
  (DNS rebinding) cannot point the request elsewhere;
* :func:`payload` / :func:`signed_request` / :func:`post`: the body, the ``webhook-*`` headers, and one POST
  (``WEBHOOK_TIMEOUT``, redirects never followed);
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

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


def is_public(address: IPAddress) -> bool:
    """Whether a webhook may go to ``address`` in production: a global unicast address. An IPv4-mapped or 6to4 /
    Teredo IPv6 address is judged by the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public(embedded)
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


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
    if not allow_private:
        refused = [str(a) for a in addresses if not is_public(a)]
        if refused:
            raise Refused(f"{host} resolves to a non-public address ({', '.join(refused[:3])})")
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
    """One POST to ``target`` over a connection to its checked address; redirects are not followed (a 3xx is a
    failed attempt), proxies from the environment are ignored, the response body is never read."""
    extensions = {"sni_hostname": target.host} if target.url.lower().startswith("https") else {}
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=_tls()) as client:
        request = client.build_request(
            "POST", target.pinned_url, content=body, headers={**headers, "host": target.host_header},
            extensions=extensions,
        )  # fmt: skip
        try:
            response = client.send(request, stream=True)
        except httpx.HTTPError as e:
            return Outcome(None, f"{type(e).__name__}: {e}"[:500])
        response.close()
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(status)
    return Outcome(status, f"HTTP {status}", final=status == 410)


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
