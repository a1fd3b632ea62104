"""Console logging for processes we start ourselves (the worker, the local tools).

Log records carry stable fields in ``extra`` (``job_id``, ``message_id``, ``delivery_count``, ``action``, ...).
Application Insights receives them as custom dimensions; on the console they are appended as ``key=value`` so a
person reading a log file sees them too. The Azure SDKs log every HTTP request and AMQP frame at INFO: they are
kept at WARNING.
"""

from __future__ import annotations

import logging

STABLE_FIELDS = ("job_id", "message_id", "delivery_count", "action", "reason", "sequence_number")


class StableFieldsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in STABLE_FIELDS if hasattr(record, name)]
        return f"{line} [{' '.join(fields)}]" if fields else line


def configure_console_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(StableFieldsFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("azure").setLevel(logging.WARNING)
