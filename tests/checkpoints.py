"""A checkpoint for the worker's stages in tests (:class:`gpu_worker.handler.Checkpoint`)."""

from __future__ import annotations


class StopsAt:
    """Raises ``error`` at its ``at``-th check: a cancellation or a lost attempt arriving while a stage waits for a
    transfer."""

    def __init__(self, at: int, error: BaseException) -> None:
        self.at, self.error = at, error
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.at:
            raise self.error
