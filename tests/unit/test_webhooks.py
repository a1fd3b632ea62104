"""Webhook delivery's pure parts: the SSRF guard at delivery time, the payload, the signature a receiver verifies,
the backoff, what follows an attempt, and which messages need no POST."""

from __future__ import annotations

import ipaddress
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.delivery import Deliverer, WebhookPolicy, _recorded, _skip_reason
from shared.errors import DatabaseUnavailable, InvalidMessage
from shared.events import Delivery, EventMessage, redacted
from shared.jobs import JobStatus
from shared.status import GENERIC_MESSAGE, job_view
from shared.webhooks import (
    Outcome,
    Refused,
    Target,
    Verdict,
    backoff,
    decide,
    new_secret,
    payload,
    resolve_target,
    signed_headers,
)
from tests.fakes import InMemoryBlobStore
from tests.jobs import job_record

JOB_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
EVENT_ID = uuid.UUID("87654321-4321-8765-4321-876543218765")


def resolver(*addresses: str) -> Any:
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


# The SSRF guard


@pytest.mark.parametrize(
    "address",
    ["10.0.0.4", "172.31.255.255", "192.168.0.1", "127.0.0.1", "169.254.169.254", "100.64.1.1", "0.0.0.0",
     "224.0.0.251", "255.255.255.255", "240.0.0.1", "198.18.0.1", "::1", "::", "fe80::1%eth0", "fd00::1",
     "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:a00:1::1",
     # Addresses the standard library's properties let through (Python 3.11) or that look public:
     "168.63.129.16", "fec0::1", "192.0.0.192", "192.88.99.1", "3fff::1", "0.1.2.3", "100.100.100.200",
     "fd00:ec2::254", "::ffff:168.63.129.16", "2002:a83f:8110::1", "64:ff9b::a83f:8110", "64:ff9b:1::808:808",
     "::808:808", "2001:0:4136:e378:8000:63bf:3fff:fdd2"],
)  # fmt: skip
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    with pytest.raises(Refused, match="non-public"):
        resolve_target("https://hooks.example.com/x", allow_private=False, resolver=resolver(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.215.14", "2606:4700::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_a_public_address_and_its_ipv6_forms_are_allowed(address: str) -> None:
    target = resolve_target("https://hooks.example.com/", allow_private=False, resolver=resolver(address))
    assert target.address == ipaddress.ip_address(address)


def test_one_non_public_address_among_public_ones_is_enough_to_refuse() -> None:
    with pytest.raises(Refused):
        resolve_target("https://hooks.example.com/", allow_private=False, resolver=resolver("8.8.8.8", "10.0.0.1"))


@pytest.mark.parametrize(
    "url", ["http://hooks.example.com/", "https://127.0.0.1/", "https://[::1]/", "https://localhost/"]
)
def test_plain_http_and_local_literals_are_refused_without_a_lookup(url: str) -> None:
    def no_lookup(host: str, port: int) -> list[str]:
        raise AssertionError("looked up")

    with pytest.raises(Refused):
        resolve_target(url, allow_private=False, resolver=no_lookup)


def test_a_public_target_is_pinned_to_the_checked_address() -> None:
    target = resolve_target("https://hooks.example.com/in?t=1", allow_private=False, resolver=resolver("93.184.215.14"))
    assert target == Target(
        "https://hooks.example.com/in?t=1", "hooks.example.com", 443, ipaddress.ip_address("93.184.215.14")
    )
    assert target.pinned_url == "https://93.184.215.14:443/in?t=1"
    assert target.host_header == "hooks.example.com"


def test_an_ipv6_target_is_bracketed_and_keeps_its_port() -> None:
    target = resolve_target("https://hooks.example.com:8443/", allow_private=False, resolver=resolver("2606:4700::1"))
    assert target.pinned_url == "https://[2606:4700::1]:8443/"
    assert target.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "https://10.0.0.4/"])
def test_local_development_allows_private_targets(url: str) -> None:
    target = resolve_target(url, allow_private=True, resolver=resolver("127.0.0.1"))
    assert not target.address.is_global


def test_a_name_that_does_not_resolve_is_an_os_error_not_a_refusal() -> None:
    def nxdomain(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(OSError, match="not known"):
        resolve_target("https://nowhere.example/", allow_private=False, resolver=nxdomain)


# Payload and signature


def delivery(type_: str = "job.failed", **fields: Any) -> Delivery:
    stored = {"job_id": str(JOB_ID), "status": "failed", "attempt": 2, "error_code": "retries_exhausted",
              "error_message": "KeyError at 10.0.0.4", "progress": None}  # fmt: skip
    defaults: dict[str, Any] = {
        "event_id": EVENT_ID, "job_id": JOB_ID, "type": type_,
        "created_at": datetime(2025, 1, 31, 12, 0, 0, 123456, UTC), "payload": stored, "attempts": 0,
        "callback_url": "https://hooks.example.com/", "webhook_secret": new_secret(),
    }  # fmt: skip
    return Delivery(**{**defaults, **fields})


def test_a_failed_job_payload_filters_the_message_as_the_status_view_does() -> None:
    assert payload(delivery(), None) == {
        "type": "job.failed",
        "timestamp": "2025-01-31T12:00:00.123456Z",
        "data": {"job_id": str(JOB_ID), "status": "failed", "attempt": 2,
                 "error": {"code": "retries_exhausted", "message": GENERIC_MESSAGE}},
    }  # fmt: skip


def test_a_succeeded_job_payload_carries_its_result_and_progress() -> None:
    stored = {"job_id": str(JOB_ID), "status": "succeeded", "attempt": 1, "error_code": None, "error_message": None,
              "progress": {"stage": "outputs", "fraction": 1.0}}  # fmt: skip
    body = payload(delivery("job.succeeded", payload=stored), {"ndvi": 0.4})
    assert body["data"] == {"job_id": str(JOB_ID), "status": "succeeded", "attempt": 1, "result": {"ndvi": 0.4},
                            "progress": {"stage": "outputs", "fraction": 1.0}}  # fmt: skip


def test_the_result_goes_only_with_job_succeeded() -> None:
    stored = {"job_id": str(JOB_ID), "status": "running", "attempt": 1, "progress": {"stage": "indices"}}
    assert "result" not in payload(delivery("job.progress", payload=stored), {"stale": True})["data"]


def test_a_receiver_verifies_the_signature_with_standardwebhooks() -> None:
    secret = new_secret()
    body = json.dumps(payload(delivery(), None))
    headers = signed_headers(secret, str(EVENT_ID), datetime.now(UTC), body)
    assert headers["webhook-id"] == str(EVENT_ID)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers)["type"] == "job.failed"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)  # another job's secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("failed", "succeeded"), headers)


def test_an_old_signature_is_refused_by_the_receiver() -> None:
    secret = new_secret()
    headers = signed_headers(secret, str(EVENT_ID), datetime.now(UTC) - timedelta(minutes=10), "{}")
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify("{}", headers)


# Backoff, verdict, stale messages


@pytest.mark.parametrize(("attempt", "seconds"), [(1, 5), (2, 10), (3, 20), (4, 40), (8, 60), (500, 60)])
def test_backoff_doubles_per_attempt_up_to_the_cap(attempt: int, seconds: int) -> None:
    assert backoff(attempt, timedelta(seconds=5), timedelta(seconds=60)) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("outcome", "attempt", "verdict"),
    [(Outcome(200), 1, Verdict.DELIVERED), (Outcome(204), 8, Verdict.DELIVERED),
     (Outcome(500, "HTTP 500"), 1, Verdict.RETRY), (Outcome(None, "ConnectError"), 7, Verdict.RETRY),
     (Outcome(302, "HTTP 302"), 1, Verdict.RETRY), (Outcome(500, "HTTP 500"), 8, Verdict.ABANDON),
     (Outcome(None, "ReadTimeout"), 9, Verdict.ABANDON), (Outcome(410, "HTTP 410", final=True), 1, Verdict.GIVE_UP),
     (Outcome(None, "refused", final=True), 8, Verdict.GIVE_UP)],
)  # fmt: skip
def test_what_follows_an_attempt(outcome: Outcome, attempt: int, verdict: Verdict) -> None:
    assert decide(outcome, attempt, max_attempts=8) is verdict


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("fields", "attempt", "reason"),
    [({}, 1, None), ({"next_attempt": 2}, 1, None), ({"next_attempt": 4}, 3, None), ({"next_attempt": 4}, 2, "stale"),
     ({"next_attempt": 3, "attempts": 7}, 2, None), ({"next_attempt": 2}, 3, None),
     ({"delivered_at": NOW}, 1, "already delivered"), ({"delivered_at": NOW}, 5, "already delivered"),
     ({"callback_url": None}, 1, "no callback"), ({"gave_up_at": NOW, "next_attempt": 3}, 2, "given up"),
     ({"gave_up_at": NOW, "next_attempt": 6}, 5, None), ({"next_attempt": 13}, 5, None)],
)  # fmt: skip
def test_which_messages_need_nothing_done(fields: dict[str, Any], attempt: int, reason: str | None) -> None:
    found = _skip_reason(delivery(**fields), EventMessage(event_id=EVENT_ID, attempt=attempt), max_attempts=5)
    assert (found is None) == (reason is None)
    if reason is not None:
        assert reason in str(found)


@pytest.mark.parametrize(
    ("next_attempt", "attempt", "recorded"),
    [(1, 1, False), (2, 1, True), (3, 2, True), (3, 3, False), (6, 5, False), (9, 5, False)],
)
def test_a_redelivered_attempt_already_recorded_sends_its_next_message_instead_of_posting(
    next_attempt: int, attempt: int, recorded: bool
) -> None:
    """Attempt ``next_attempt - 1`` was made and recorded: its redelivery (the send of the next attempt's message
    failed) must not be stale, or the chain ends there; the last attempt (5) always POSTs again."""
    message = EventMessage(event_id=EVENT_ID, attempt=attempt)
    assert _recorded(delivery(next_attempt=next_attempt), message, max_attempts=5) is recorded


def test_an_event_message_round_trips_and_garbage_is_invalid() -> None:
    message = EventMessage.decode(json.dumps({"event_id": str(EVENT_ID), "attempt": 3}).encode())
    assert message.message_id == f"{EVENT_ID}:3"
    resent = EventMessage.decode(json.dumps({"event_id": str(EVENT_ID), "attempt": 3, "resent": 2}).encode())
    assert resent.message_id == f"{EVENT_ID}:3:r2"
    assert resent.model_copy(update={"postponed": 1}).message_id == f"{EVENT_ID}:3:r2:p1"
    for body in (
        b"",
        b"{}",
        b'{"event_id": "x", "attempt": 1}',
        json.dumps({"event_id": str(EVENT_ID), "attempt": 0}).encode(),
    ):
        with pytest.raises(InvalidMessage):
            EventMessage.decode(body)


# The status view


@pytest.mark.parametrize(
    ("url", "shown"),
    [("https://hooks.example.com/in?token=s3cret", "https://hooks.example.com"),
     ("https://hooks.example.com:8443/t/0123456789abcdef/in", "https://hooks.example.com:8443"),
     ("https://[2606:4700::1]:8443/t0ken", "https://[2606:4700::1]:8443"), ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
     ("https://user:pw@hooks.example.com/x#f", "https://hooks.example.com")],
)  # fmt: skip
def test_the_status_view_shows_only_the_callbacks_scheme_host_and_port(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_the_status_view_shows_the_webhook_summary_only_when_given() -> None:
    job = job_record(JobStatus.SUCCEEDED, callback_url="https://hooks.example.com/x")
    summary = {"url": "https://hooks.example.com/x", "events": ["completed"], "deliveries": 1, "attempts": 2,
               "last_status": 200, "last_attempt_at": "2025-01-31T12:00:00.123456+00:00", "delivered": 1,
               "pending": 0, "gave_up": 0}  # fmt: skip
    assert job_view(job, InMemoryBlobStore(), timedelta(minutes=5), summary)["webhook"] == summary
    assert "webhook" not in job_view(job, InMemoryBlobStore(), timedelta(minutes=5))


# A database outage puts the attempt off


class DownStore:
    def delivery(self, event_id: uuid.UUID) -> Delivery | None:
        raise DatabaseUnavailable("connection refused")

    def record_attempt(self, event_id: uuid.UUID, attempt: int, **outcome: Any) -> None:
        raise AssertionError("nothing to record")


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[EventMessage, datetime | None]] = []

    def send(self, message: EventMessage, *, at: datetime | None = None) -> None:
        self.sent.append((message, at))


POLICY = WebhookPolicy(max_attempts=8, backoff=timedelta(seconds=5), backoff_max=timedelta(minutes=10), timeout=1.0,
                       allow_private=False, result_url_ttl=timedelta(hours=1))  # fmt: skip


@pytest.mark.parametrize(("postponed", "seconds"), [(0, 5), (1, 10), (7, 600)])
def test_a_database_outage_puts_the_same_attempt_off_as_a_new_message(postponed: int, seconds: int) -> None:
    sender = RecordingSender()
    message = EventMessage(event_id=EVENT_ID, attempt=3, postponed=postponed)
    before = datetime.now(UTC)
    assert Deliverer(DownStore(), sender, POLICY).handle(message) is None  # returns: the message is completed
    [(later, at)] = sender.sent
    assert (later.attempt, later.postponed) == (3, postponed + 1)
    assert later.message_id == f"{EVENT_ID}:3:p{postponed + 1}"
    assert at is not None
    assert timedelta(seconds=seconds) <= at - before < timedelta(seconds=seconds + 5)


def test_a_first_message_body_has_no_postponement() -> None:
    assert json.loads(EventMessage(event_id=EVENT_ID, attempt=1).model_dump_json(exclude_defaults=True)) == {
        "event_id": str(EVENT_ID), "attempt": 1,
    }  # fmt: skip
