"""Microsoft Entra access tokens as the PostgreSQL password (Azure Database for PostgreSQL Flexible Server).

In Azure the server has password authentication disabled; the app connects as its managed identity with an access
token for ``https://ossrdbms-aad.database.windows.net/.default`` as the password. Tokens live about an hour (up to
24 h for managed identities), so ``EntraPassword`` caches one and fetches a new one ``refresh_margin`` before it
expires. A token only has to be valid when a connection is *opened*; open connections outlive it.

Use with psycopg_pool, whose ``kwargs`` may be a callable evaluated for every new connection::

    password = EntraPassword(DefaultAzureCredential())
    pool = ConnectionPool(kwargs=lambda: entra_conninfo_kwargs(settings, password), ...)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

from azure.core.credentials import AccessToken, TokenCredential

from shared.settings import Settings

POSTGRES_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"


class EntraPassword:
    """A callable returning a valid Entra access token for PostgreSQL; thread-safe, cached, refreshed early."""

    def __init__(
        self,
        credential: TokenCredential,
        *,
        refresh_margin: timedelta = timedelta(minutes=5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if refresh_margin < timedelta(0):
            raise ValueError("refresh_margin must not be negative")
        self._credential = credential
        self._margin = refresh_margin.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        self._token: AccessToken | None = None

    def __call__(self) -> str:
        with self._lock:
            if self._token is None or self._token.expires_on - self._clock() <= self._margin:
                self._token = self._credential.get_token(POSTGRES_SCOPE)
            return self._token.token


def entra_conninfo_kwargs(settings: Settings, password: EntraPassword) -> dict[str, object]:
    """psycopg connection keywords for Entra authentication; ``password`` is called, so each call is fresh."""
    if not (settings.postgres_host and settings.postgres_user):
        raise ValueError("Entra authentication needs POSTGRES_HOST and POSTGRES_USER")
    return {
        "host": settings.postgres_host,
        "port": settings.postgres_port,
        "dbname": settings.postgres_database,
        "user": settings.postgres_user,
        "sslmode": "require",
        "password": password(),
    }
