from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from shared.errors import InvalidMessage
from shared.messages import JobMessage, decode


def _message() -> JobMessage:
    return JobMessage(
        job_id=uuid.uuid4(),
        input_blob="x/input.tif",
        input_sha256="a" * 64,
        bands=["B02", "B03", "B04", "B08"],
        scale=10000,
        submitted_at=datetime.now(UTC),
    )


def test_round_trip() -> None:
    message = _message()
    assert decode(message.to_json()) == message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "body"),
        (b"[]", "body"),
        (json.dumps({"schema_version": 2}).encode(), "schema_version"),
        (json.dumps({"job_id": "nope"}).encode(), "job_id"),
    ],
)
def test_poison_bodies_are_invalid_messages(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidMessage, match=fragment) as info:
        decode(body)
    assert not info.value.transient
    assert info.value.code == "invalid_message"


def test_unknown_fields_are_refused() -> None:
    payload = json.loads(_message().to_json())
    payload["surprise"] = 1
    with pytest.raises(InvalidMessage, match="surprise"):
        decode(json.dumps(payload))
