"""The job envelope: schema version 2 (``generation``), its message id, and version 1 bodies still in flight."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.errors import InvalidMessage
from shared.jobs import JobStatus
from shared.messages import JobMessage, decode, message_id, parse_message_id
from tests.jobs import PARAMS, job_record

JOB_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _message(**fields: Any) -> JobMessage:
    defaults: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "input_blob": "x/input.tif",
        "input_sha256": "a" * 64,
        "bands": ["B02", "B03", "B04", "B08"],
        "scale": 10000,
        "submitted_at": datetime.now(UTC),
    }
    return JobMessage(**{**defaults, **fields})


def test_round_trip() -> None:
    message = _message(generation=3)
    assert decode(message.to_json()) == message


def test_a_new_message_is_schema_2_of_generation_1() -> None:
    message = _message(job_id=JOB_ID)
    assert (message.schema_version, message.generation) == (2, 1)
    assert message.message_id == f"{JOB_ID}:1"
    assert json.loads(message.to_json())["generation"] == 1


@pytest.mark.parametrize("generation", [1, 2, 17])
def test_the_message_id_names_the_generation(generation: int) -> None:
    message = _message(job_id=JOB_ID, generation=generation)
    assert message.message_id == message_id(JOB_ID, generation) == f"{JOB_ID}:{generation}"


def test_for_job_builds_the_current_generations_message_from_the_row() -> None:
    sha = "c" * 64
    job = job_record(JobStatus.QUEUED, generation=4, input_blob="j/input.tif", input_sha256=sha, params=PARAMS)
    message = JobMessage.for_job(job)
    assert (message.job_id, message.generation, message.message_id) == (job.job_id, 4, f"{job.job_id}:4")
    assert (message.input_blob, message.input_sha256) == ("j/input.tif", sha)
    assert (message.bands, message.scale, message.analysis) == (PARAMS["bands"], 10000.0, "crop-health")
    assert message.submitted_at == job.created_at


def test_a_version_1_body_decodes_as_generation_1() -> None:
    body = {
        "schema_version": 1,
        "job_id": str(JOB_ID),
        "input_blob": "x/input.tif",
        "input_sha256": "a" * 64,
        "bands": ["B04", "B08"],
        "scale": 1.0,
        "analysis": "crop-health",
        "submitted_at": "2024-05-01T12:00:00+00:00",
    }
    message = decode(json.dumps(body))
    assert (message.schema_version, message.job_id, message.generation) == (1, JOB_ID, 1)
    assert message.message_id == f"{JOB_ID}:1"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (f"{JOB_ID}:3", (JOB_ID, 3)),
        (f"{JOB_ID}:1", (JOB_ID, 1)),
        (str(JOB_ID), (JOB_ID, 1)),  # a schema 1 message id: the bare job id
        (str(JOB_ID).upper(), (JOB_ID, 1)),
        ("not-a-uuid", None),
        ("not-a-uuid:3", None),
        (f"{JOB_ID}:three", None),
        (f"{JOB_ID}:3:4", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_message_id(text: str | None, parsed: tuple[uuid.UUID, int] | None) -> None:
    assert parse_message_id(text) == parsed


def test_parse_message_id_inverts_message_id() -> None:
    assert parse_message_id(message_id(JOB_ID, 9)) == (JOB_ID, 9)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "body"),
        (b"[]", "body"),
        (json.dumps({"schema_version": 2}).encode(), "job_id"),
        (json.dumps({"job_id": "nope"}).encode(), "job_id"),
    ],
)
def test_poison_bodies_are_invalid_messages(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidMessage, match=fragment) as info:
        decode(body)
    assert not info.value.transient
    assert info.value.code == "invalid_message"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"schema_version": 3}, "schema_version"), ({"generation": 0}, "generation"), ({"surprise": 1}, "surprise")],
    ids=["unknown-schema", "generation-0", "unknown-field"],
)
def test_invalid_fields_are_refused(change: dict[str, Any], fragment: str) -> None:
    payload = {**json.loads(_message().to_json()), **change}
    with pytest.raises(InvalidMessage, match=fragment):
        decode(json.dumps(payload))
