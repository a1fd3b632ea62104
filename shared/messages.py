"""The job envelope sent on the Service Bus queue (schema version 2: version 1 plus ``generation``).

``message_id`` is ``{job_id}:{generation}`` (:func:`message_id`): a retry of the same send is dropped by Service Bus
duplicate detection, a deliberate re-send (a new generation, :mod:`shared.lifecycle`) never is. Version 1 messages
(``message_id`` = job id, no generation) still decode, as generation 1, so messages in flight survive an upgrade.
A message is a wake-up for its job: the job's row decides whether it runs (:meth:`shared.jobs.JobStore.claim`). The
body is JSON
(``content_type = application/json``); W3C trace context travels in the application properties so that the
worker's span is a child of the submit span.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidMessage
from shared.jobs import Job, Priority

CONTENT_TYPE = "application/json"
SUBJECT = "crop-ai.job"


class JobMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1, 2] = 2
    job_id: UUID
    generation: int = Field(1, ge=1, description="the job's hand-over this message belongs to")
    input_blob: str = Field(min_length=1, description="blob name in the images container")
    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bands: list[str] = Field(min_length=1, description="band names in file order")
    scale: float = Field(gt=0, description="reflectance = DN / scale")
    analysis: str = "crop-health"
    submitted_at: datetime
    # Which queue carries it (jobs-high or jobs): the publisher's choice, never part of the body.
    priority: Priority = Field("normal", exclude=True)

    @classmethod
    def for_job(cls, job: Job) -> JobMessage:
        """The message of the job's current generation, built from its row."""
        return cls(
            job_id=job.job_id,
            generation=job.generation,
            input_blob=job.input_blob,
            input_sha256=job.input_sha256,
            bands=job.params["bands"],
            scale=job.params["scale"],
            analysis=job.params["analysis"],
            submitted_at=job.created_at,
            priority=job.priority,
        )

    @property
    def message_id(self) -> str:
        return message_id(self.job_id, self.generation)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def message_id(job_id: UUID, generation: int) -> str:
    return f"{job_id}:{generation}"


def parse_message_id(text: str | None) -> tuple[UUID, int] | None:
    """``(job_id, generation)`` from a message id (``{job_id}:{generation}``, or a bare job id from schema 1)."""
    head, _, tail = (text or "").partition(":")
    try:
        return UUID(head), int(tail) if tail else 1
    except ValueError:
        return None


def decode(body: bytes | str) -> JobMessage:
    """Decode and validate a message body; any failure is a permanent :class:`InvalidMessage`."""
    try:
        return JobMessage.model_validate_json(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidMessage(f"job message does not validate: {detail}"[:1000]) from e
