"""The callback a client gives at submit (``validate_callback``) and the per-job signing secret (``new_secret``)."""

from __future__ import annotations

import base64

import pytest
from standardwebhooks import Webhook

from shared.rejection import Rejected
from shared.webhooks import MAX_URL_LENGTH, Refused, new_secret, resolve_target, validate_callback


def test_a_secret_is_whsec_and_24_random_bytes_that_standardwebhooks_accepts() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert secret != new_secret()
    Webhook(secret)  # accepted as a signing key


@pytest.mark.parametrize(
    "url",
    ["https://example.com/hook", "https://hooks.example.com:8443/a/b?token=x", "https://8.8.8.8/hook",
     "https://[2001:4860:4860::8888]/hook", "  https://example.com/padded  "],
)  # fmt: skip
def test_public_https_urls_are_accepted(url: str) -> None:
    assert validate_callback(url, None, allow_private=False) == (url.strip(), None)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/hook", "ftp://example.com/x", "example.com/hook", "https://", "https:///path", "",
     "https://localhost/hook", "https://LOCALHOST./hook", "https://app.localhost/hook", "https://127.0.0.1/hook",
     "https://10.1.2.3/hook", "https://172.16.0.1/", "https://192.168.1.1/", "https://169.254.169.254/latest",
     "https://100.64.0.1/", "https://0.0.0.0/", "https://224.0.0.1/", "https://240.0.0.1/", "https://[::1]/",
     "https://[fe80::1]/", "https://[fc00::1]/", "https://[::ffff:10.0.0.1]/", "https://[::]/",
     "https://168.63.129.16/", "https://[fec0::1]/", "https://192.0.0.192/", "https://[::ffff:168.63.129.16]/",
     "https://user:pw@example.com/hook", "https://example.com/hook#frag", "https://example.com:99999/",
     "https://example.com:0/", "https://exa mple.com/", "https://example.com/\nx",
     "https://example.com/" + "a" * MAX_URL_LENGTH],
)  # fmt: skip
def test_other_urls_are_refused_in_production(url: str) -> None:
    with pytest.raises(Rejected) as refused:
        validate_callback(url, None, allow_private=False)
    assert refused.value.code == "invalid_callback_url"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "https://10.0.0.4/x"])
def test_local_development_allows_http_and_private_targets(url: str) -> None:
    assert validate_callback(url, None, allow_private=True)[0] == url


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http://user@127.0.0.1/", "http:///x"])
def test_local_development_still_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(Rejected):
        validate_callback(url, None, allow_private=True)


@pytest.mark.parametrize(
    ("events", "stored"),
    [(None, None), ("completed", ["completed"]), ("progress", ["progress"]),
     ("Completed, started", ["started", "completed"]), ("progress,progress,completed", ["progress", "completed"]),
     ("started,progress,completed", ["started", "progress", "completed"])],
)  # fmt: skip
def test_events_are_stored_in_canonical_order(events: str | None, stored: list[str] | None) -> None:
    assert validate_callback("https://example.com/", events, allow_private=False)[1] == stored


@pytest.mark.parametrize("events", ["", " ", "done", "completed,", "completed,,started", "all"])
def test_unknown_or_empty_events_are_refused(events: str) -> None:
    with pytest.raises(Rejected) as refused:
        validate_callback("https://example.com/", events, allow_private=False)
    assert refused.value.code == "invalid_callback_events"


def test_a_name_resolving_to_a_private_address_is_refused_without_naming_the_address() -> None:
    """The refusal reaches the client (a callback_url or an image_url): which addresses a name resolves to inside
    our network is not its business."""

    def internal(host: str, port: int) -> list[str]:
        return ["203.0.113.7", "10.1.2.3"]

    with pytest.raises(Refused) as refused:
        resolve_target("https://looks-public.example/in", allow_private=False, resolver=internal)
    assert "non-public" in str(refused.value)
    assert "10.1.2.3" not in str(refused.value)
