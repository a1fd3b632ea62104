"""The worker caps glibc's malloc arenas itself, unless the operator's MALLOC_ARENA_MAX already did, and gives
freed memory back to the kernel after a large analysis."""

from __future__ import annotations

import os
import platform

import pytest

from gpu_worker import malloc
from gpu_worker.malloc import free_bytes, limit_arenas, release_free_memory

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt(M_ARENA_MAX) is glibc's")
def test_glibc_takes_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_arenas(2) is True


def test_an_operators_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas(2) is False


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_free_memory_goes_back_to_the_kernel() -> None:
    chunks = [bytearray(64 * 1024) for _ in range(2000)]  # 128 MB of the heap, below the mmap threshold
    del chunks[:-1]  # freed, but not at the heap's top: glibc keeps it resident
    free = free_bytes()
    assert free is None or free >= 100 * 1024 * 1024
    before = _resident_bytes()
    assert release_free_memory() is True
    assert before - _resident_bytes() >= 64 * 1024 * 1024


@pytest.mark.skipif(free_bytes() is None, reason="mallinfo2 is glibc's (2.33 and later)")
def test_too_little_free_memory_is_not_worth_a_trim() -> None:
    free = free_bytes()
    assert free is not None
    assert release_free_memory(min_free=free + 1024 * 1024 * 1024) is False


def test_release_does_nothing_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc, "_libc", lambda: None)
    assert release_free_memory() is False


def test_a_failing_trim_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(function: str) -> object:
        raise OSError("libc went away")

    monkeypatch.setattr(malloc, "_libc_function", broken)
    assert release_free_memory() is False
    assert any(getattr(r, "action", None) == "malloc_trim" for r in caplog.records)
