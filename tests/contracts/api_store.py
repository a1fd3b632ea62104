"""The job store's reads for the job API (admission control's replay check, the dead-letter log), held to one
contract on PostgreSQL (tests/integration) and on the in-memory fake (tests/unit): subclass
:class:`JobApiStoreContract` and provide a ``store`` fixture."""

from __future__ import annotations

import uuid

from shared.jobs import DeadLetter, DeadLetterFilter, JobStatus, JobStore, NewJob
from tests.contracts.job_store import PARAMS, SHA_A, claimed, create


def letter(job_id: uuid.UUID | None, generation: int | None, *, sequence: int, reason: str, action: str) -> DeadLetter:
    return DeadLetter(
        message_id=f"{job_id}:{generation}", sequence_number=sequence, job_id=job_id, generation=generation,
        reason=reason, description="why", delivery_count=10, enqueued_at=None, action=action,
    )  # fmt: skip


class JobApiStoreContract:
    def test_find_by_key(self, store: JobStore) -> None:
        job, _ = create(store, key="k-1")
        create(store, key="k-2")
        assert store.find_by_key("k-1") == job
        assert store.find_by_key("unknown") is None

    def test_batch_by_key(self, store: JobStore) -> None:
        batch_id = uuid.uuid4()
        job_id = uuid.uuid4()
        new = NewJob(job_id=job_id, input_blob=f"{job_id}/input.tif", input_sha256=SHA_A, params=PARAMS)
        store.create_batch(batch_id, [new], "batch-key")
        assert store.batch_by_key("batch-key") == batch_id
        assert store.batch_by_key("other") is None
        assert store.find_by_key("batch-key") is None  # the jobs of a batch carry no key of their own

    def test_dead_letter_log_newest_first_with_the_jobs_status_and_filters(self, store: JobStore) -> None:
        failed, _ = create(store)
        store.dead_lettered(failed.job_id, failed.generation, "message_expired", "expired")
        running = claimed(store, create(store)[0])
        letters = [
            letter(failed.job_id, 1, sequence=1, reason="TTLExpiredException", action="failed"),
            letter(running.job_id, 1, sequence=2, reason="MaxDeliveryCountExceeded", action="redrive"),
            letter(None, None, sequence=3, reason="Other", action="none"),
        ]
        for each in letters:
            assert store.record_dead_letter(each)
        everything = store.dead_letter_log(DeadLetterFilter(), 10)
        assert [d.sequence_number for d in everything] == [3, 2, 1]
        assert [d.job_status for d in everything] == [None, JobStatus.RUNNING, JobStatus.FAILED]
        assert all(d.received_at is not None for d in everything)
        assert everything[2].model_dump(exclude={"received_at", "job_status"}) == letters[0].model_dump()
        assert [d.sequence_number for d in store.dead_letter_log(DeadLetterFilter(), 2)] == [3, 2]

        def sequences(**where: object) -> list[int]:
            return [d.sequence_number for d in store.dead_letter_log(DeadLetterFilter(**where), 10)]

        assert sequences(reason="TTLExpiredException") == [1]
        assert sequences(action="redrive") == [2]
        assert sequences(action="failed", job_status=JobStatus.FAILED) == [1]
        assert sequences(action="failed", job_status=JobStatus.QUEUED) == []
