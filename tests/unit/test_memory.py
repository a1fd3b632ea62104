from __future__ import annotations

import pytest

from shared.memory import InMemoryJobRepository
from tests.contracts.job_repository import JobRepositoryContract


class TestInMemoryJobRepository(JobRepositoryContract):
    @pytest.fixture
    def repo(self) -> InMemoryJobRepository:
        return InMemoryJobRepository()
