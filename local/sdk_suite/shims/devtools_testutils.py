"""The SDK tests import ``devtools_testutils``: the emulator's stand-ins (local/sdk_suite/testutils.py)."""

from local.sdk_suite.testutils import AzureMgmtRecordedTestCase, AzureRecordedTestCase, get_credential

__all__ = ["AzureMgmtRecordedTestCase", "AzureRecordedTestCase", "get_credential"]
