"""The Entra token path for PostgreSQL, with an in-memory TokenCredential whose token lifetimes the test controls."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from shared.pg_entra import POSTGRES_SCOPE, EntraPassword, entra_conninfo_kwargs
from shared.settings import Settings

LIFETIME = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class InMemoryCredential:
    """Issues ``token-1``, ``token-2``, ... each valid for ``LIFETIME`` seconds from the clock's time."""

    def __init__(self, clock: Clock, *, fail: bool = False) -> None:
        self.clock = clock
        self.fail = fail
        self.requests: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        with self._lock:
            self.requests.append(scopes)
            if self.fail:
                raise ClientAuthenticationError("no managed identity endpoint")
            return AccessToken(f"token-{len(self.requests)}", int(self.clock() + LIFETIME))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def credential(clock: Clock) -> InMemoryCredential:
    return InMemoryCredential(clock)


def test_requests_the_postgres_scope_only(credential: InMemoryCredential, clock: Clock) -> None:
    assert EntraPassword(credential, clock=clock)() == "token-1"
    assert credential.requests == [(POSTGRES_SCOPE,)]
    assert POSTGRES_SCOPE == "https://ossrdbms-aad.database.windows.net/.default"


def test_caches_the_token_while_it_is_fresh(credential: InMemoryCredential, clock: Clock) -> None:
    password = EntraPassword(credential, clock=clock)
    first = password()
    clock.now += LIFETIME - 5 * 60 - 1  # one second before the refresh margin starts
    assert password() == first == "token-1"
    assert len(credential.requests) == 1


@pytest.mark.parametrize(
    ("margin", "elapsed"),
    [
        (timedelta(minutes=5), LIFETIME - 5 * 60),  # exactly at the margin
        (timedelta(minutes=5), LIFETIME - 60),  # inside the margin, still valid
        (timedelta(minutes=5), LIFETIME + 60),  # already expired
        (timedelta(minutes=30), LIFETIME - 29 * 60),  # a wider margin refreshes earlier
        (timedelta(0), LIFETIME),  # no margin: refreshed at expiry
    ],
)
def test_refreshes_before_expiry(
    credential: InMemoryCredential, clock: Clock, margin: timedelta, elapsed: float
) -> None:
    password = EntraPassword(credential, refresh_margin=margin, clock=clock)
    assert password() == "token-1"
    clock.now += elapsed
    assert password() == "token-2"
    assert credential.requests == [(POSTGRES_SCOPE,), (POSTGRES_SCOPE,)]


def test_concurrent_callers_share_one_token_request(credential: InMemoryCredential, clock: Clock) -> None:
    password = EntraPassword(credential, clock=clock)
    start = threading.Barrier(8)
    seen: list[str] = []

    def call() -> None:
        start.wait()
        seen.append(password())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == ["token-1"] * 8
    assert len(credential.requests) == 1


def test_credential_failure_propagates_and_is_retried_next_call(clock: Clock) -> None:
    credential = InMemoryCredential(clock, fail=True)
    password = EntraPassword(credential, clock=clock)
    with pytest.raises(ClientAuthenticationError):
        password()
    credential.fail = False
    assert password() == "token-2"


def test_negative_margin_is_refused(credential: InMemoryCredential) -> None:
    with pytest.raises(ValueError, match="refresh_margin"):
        EntraPassword(credential, refresh_margin=timedelta(seconds=-1))


def _azure_settings(**extra: str) -> Settings:
    env = {
        "ServiceBusConnection__fullyQualifiedNamespace": "sb-x.servicebus.windows.net",
        "AzureWebJobsStorage__blobServiceUri": "https://stx.blob.core.windows.net",
        "POSTGRES_HOST": "psql-x.postgres.database.azure.com",
        "POSTGRES_USER": "id-worker-x",
        **extra,
    }
    return Settings.from_env(env)


def test_conninfo_kwargs_for_entra(credential: InMemoryCredential, clock: Clock) -> None:
    kwargs = entra_conninfo_kwargs(
        _azure_settings(POSTGRES_DATABASE="crops", POSTGRES_PORT="6432"), EntraPassword(credential, clock=clock)
    )
    assert kwargs == {
        "host": "psql-x.postgres.database.azure.com",
        "port": 6432,
        "dbname": "crops",
        "user": "id-worker-x",
        "sslmode": "require",
        "password": "token-1",
    }


def test_conninfo_kwargs_fetch_a_fresh_token_per_call(credential: InMemoryCredential, clock: Clock) -> None:
    settings = _azure_settings()
    password = EntraPassword(credential, clock=clock)
    assert entra_conninfo_kwargs(settings, password)["password"] == "token-1"
    clock.now += LIFETIME
    assert entra_conninfo_kwargs(settings, password)["password"] == "token-2"


def test_conninfo_kwargs_refuse_settings_without_entra_user(credential: InMemoryCredential) -> None:
    settings = Settings.from_env(
        {
            "ServiceBusConnection": "Endpoint=sb://localhost/;SharedAccessKeyName=k;SharedAccessKey=v",
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "DATABASE_URL": "postgresql://localhost/cropai",
        }
    )
    with pytest.raises(ValueError, match="POSTGRES_HOST"):
        entra_conninfo_kwargs(settings, EntraPassword(credential))
    assert credential.requests == []
