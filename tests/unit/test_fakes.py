"""The in-memory job store is held to the same contract as PostgreSQL's."""

from __future__ import annotations

import pytest

from tests.contracts.job_store import JobStoreContract
from tests.fakes import InMemoryJobStore


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


class TestInMemoryJobStore(JobStoreContract):
    pass
