"""Console logging for processes we start ourselves (the worker, the local tools), and the Azure SDKs' level for all.

Log records carry stable fields in ``extra`` (``job_id``, ``message_id``, ``delivery_count``, ``action``, ...).
Application Insights receives them as custom dimensions; on the console they are appended as ``key=value`` so a
person reading a log file sees them too.

The Azure SDKs log every HTTP request (with its headers) and AMQP frame at INFO: :func:`quiet_azure_sdks` keeps them at
WARNING. Every process of ours calls it: the worker through :func:`configure_console_logging`, the Function App at
import. The Function App must do it itself: in Azure the Python worker forwards each record of an invocation to the
host as the function's own log (category ``Function.<name>.User``), so ``host.json``'s ``logging.logLevel`` cannot
tell an SDK's record from ours (its ``Azure.*`` categories are the host's own .NET SDKs).
"""

from __future__ import annotations

import logging

STABLE_FIELDS = ("job_id", "message_id", "delivery_count", "action", "reason", "sequence_number")


class StableFieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in STABLE_FIELDS if hasattr(record, name)]
        return f"{line} [{' '.join(fields)}]" if fields else line


def quiet_azure_sdks() -> None:
    """Keep the Azure SDKs' loggers (``azure.*``) at WARNING."""
    logging.getLogger("azure").setLevel(logging.WARNING)


def configure_console_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(StableFieldsFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    quiet_azure_sdks()
