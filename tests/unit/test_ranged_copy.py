"""``shared.ranged.copy_to``: a whole source copied to a file by ranges in parallel, stopped between ranges when asked
(a cancelled job's input), the first error raised. Against an in-memory source; the worker's copies of real blobs
and URLs are in tests/integration/test_inputs_by_reference.py and tests/unit/test_url_inputs.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import ranged
from shared.errors import InputMissing
from shared.inputs import SourceUnavailable
from shared.ranged import CopyStopped, copy_to


class MemorySource:
    """A :class:`shared.ranged.RangeSource` over bytes that records the ranges read; ``fail_at``: the offset whose
    read raises ``InputMissing``; ``on_read``: called before each read."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data, self.fail_at = data, fail_at
        self.reads: list[tuple[int, int]] = []
        self.on_read: Callable[[int], object] = lambda offset: None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return '"v1"'

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.reads.append((offset, length))
        self.on_read(offset)
        if offset == self.fail_at:
            raise InputMissing("gone")
        return self.data[offset : offset + length]


@pytest.fixture(autouse=True)
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranged, "COPY_RANGE", 1000)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 3005])
def test_the_copy_is_the_source_byte_for_byte_each_range_read_once(tmp_path: Path, size: int) -> None:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    source = MemorySource(data)
    copy_to(source, tmp_path / "copy", threading.Event())
    assert (tmp_path / "copy").read_bytes() == data
    assert sorted(source.reads) == [(offset, min(1000, size - offset)) for offset in range(0, size, 1000)]


def test_the_first_error_is_raised_and_no_range_begins_after_it(tmp_path: Path) -> None:
    source = MemorySource(bytes(50_000), fail_at=3000)
    source.on_read = lambda offset: time.sleep(0.005)  # a read takes a while, as over a network
    with pytest.raises(InputMissing):
        copy_to(source, tmp_path / "copy", threading.Event())
    assert len(source.reads) <= 4 + ranged.COPY_THREADS  # the ranges before it, and those under way: not all 50


def test_the_error_raised_is_the_first_in_time(tmp_path: Path) -> None:
    """A thread still trying its range again (transient) when another's range finds the file changed: the copy
    fails with the change, not with the error that came later."""
    source = MemorySource(bytes(8000), fail_at=1000)

    def slow_then_transient(offset: int) -> None:
        if offset == 0:
            time.sleep(0.2)
            raise SourceUnavailable("timed out")

    source.on_read = slow_then_transient
    with pytest.raises(InputMissing):
        copy_to(source, tmp_path / "copy", threading.Event())


def test_a_stop_ends_the_copy_between_ranges(tmp_path: Path) -> None:
    stopped = threading.Event()
    stopped.set()
    before = MemorySource(bytes(50_000))
    with pytest.raises(CopyStopped):
        copy_to(before, tmp_path / "before", stopped)
    assert before.reads == []

    stop = threading.Event()
    during = MemorySource(bytes(50_000))
    during.on_read = lambda offset: stop.set() if offset == 5000 else time.sleep(0.005)
    with pytest.raises(CopyStopped):
        copy_to(during, tmp_path / "during", stop)
    assert len(during.reads) <= 6 + ranged.COPY_THREADS  # up to the range that saw the stop, and those under way
