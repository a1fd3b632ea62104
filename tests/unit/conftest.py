"""Fixtures of the unit tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu_worker.shutdown import Shutdown


@pytest.fixture
def shutdown() -> Iterator[Shutdown]:
    """A drain with its signal handlers installed (main thread), restored afterwards."""
    drain = Shutdown(grace=300)
    restore = drain.install()
    yield drain
    drain.finished()
    restore()
