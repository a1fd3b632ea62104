"""The job envelope sent on the Service Bus queue (schema version 1).

``message_id`` is the job id, so Service Bus duplicate detection drops a re-sent submit; the body is JSON
(``content_type = application/json``); W3C trace context travels in the application properties so that the
worker's span is a child of the submit span.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidMessage

CONTENT_TYPE = "application/json"
SUBJECT = "crop-ai.job"


class JobMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    job_id: UUID
    input_blob: str = Field(min_length=1, description="blob name in the images container")
    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bands: list[str] = Field(min_length=1, description="band names in file order")
    scale: float = Field(gt=0, description="reflectance = DN / scale")
    analysis: str = "crop-health"
    submitted_at: datetime

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def decode(body: bytes | str) -> JobMessage:
    """Decode and validate a message body; any failure is a permanent :class:`InvalidMessage`."""
    try:
        return JobMessage.model_validate_json(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidMessage(f"job message does not validate: {detail}"[:1000]) from e
