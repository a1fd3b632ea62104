"""What the queue tests import from ``devtools_testutils`` (the Azure SDK's test framework, not on PyPI).

The tests import it as ``devtools_testutils`` (``shims/devtools_testutils.py`` re-exports this module).

The tests only subclass the recorded-test base classes and ask :func:`get_credential` for a credential. The
emulator accepts every token (as Microsoft's emulator does), so a named key credential is enough: the SDK turns it
into a SAS token and puts it on ``$cbs``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from azure.core.credentials import AzureNamedKeyCredential

__all__ = ["AzureMgmtRecordedTestCase", "AzureRecordedTestCase", "get_credential"]


class AzureRecordedTestCase:
    """The recording base class: nothing to record against the emulator."""

    @staticmethod
    def await_prepared_test(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """Upstream, runs a coroutine test on an event loop; pytest-asyncio (``asyncio_mode = auto``) does that."""
        return test


class AzureMgmtRecordedTestCase(AzureRecordedTestCase):
    pass


def get_credential(*, is_async: bool = False) -> AzureNamedKeyCredential:
    """The same credential for the sync and the async client (``is_async`` kept for the tests' call sites)."""
    del is_async
    return AzureNamedKeyCredential("RootManageSharedAccessKey", "SAS_KEY_VALUE")
