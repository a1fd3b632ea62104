"""Where the schedule monitor keeps each timer's status: one JSON file per function under ``<state-dir>/timers/``.

The host keeps ``{"Last": ..., "Next": ..., "LastUpdated": ...}`` in the storage account, in the blob
``timers/{hostId}/Host.Functions.{function}/status`` (``StorageScheduleMonitor.cs`` in azure-webjobs-sdk-extensions,
``src/WebJobs.Extensions.Timers.Storage/``); here it is ``<state-dir>/timers/{function}.json``, in the same JSON,
replaced atomically (a temporary file, then ``os.replace``). As on the host, a failed write is logged and the
schedule goes on. Unlike the host, whose listener fails to start on a status it cannot read, an unreadable file is
logged and treated as absent: the timer starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from local.functions_host.monitor import ScheduleStatus

logger = logging.getLogger(__name__)


class StatusFiles:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "timers"

    def path(self, function_name: str) -> Path:
        return self.directory / f"{function_name}.json"

    def read(self, function_name: str) -> ScheduleStatus | None:
        """The recorded status, or None when there is none (or none that can be read)."""
        path = self.path(function_name)
        try:
            return ScheduleStatus.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            fields = {"action": "timer_status_unreadable", "function": function_name}
            logger.warning(
                "timer %s: cannot read its status %s (%s); starting afresh", function_name, path, e, extra=fields
            )
            return None

    def write(self, function_name: str, status: ScheduleStatus) -> None:
        path = self.path(function_name)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{function_name}.", suffix=".tmp")
            try:
                with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                    json.dump(status.as_json(), out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError:
            fields = {"action": "timer_status_write_failed", "function": function_name}
            logger.exception(
                "Function '%s' failed to update the timer trigger status in %s", function_name, path, extra=fields
            )
