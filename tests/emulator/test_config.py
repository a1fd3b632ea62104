"""Config.json parsing: ISO-8601 durations, defaults, and the repository's file declaring the jobs queue we deploy."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

import pytest

from local.servicebus_emulator.config import ConfigError, load_config, parse_config, parse_duration
from tests.fixtures.servicebus import REPO_CONFIG

# The jobs queue as infra/bicep deploys it (tests/infra/test_settings_alignment.py checks Bicep against the same file).
JOBS_QUEUE = {
    "name": "jobs",
    "lock_duration": timedelta(minutes=1),
    "max_delivery_count": 5,
    "default_message_time_to_live": timedelta(days=1),
    "dead_lettering_on_message_expiration": True,
    "requires_duplicate_detection": True,
    "duplicate_detection_history_time_window": timedelta(minutes=10),
    "max_message_size_in_kilobytes": 256,  # Standard, the Bicep's default SKU
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PT1M", timedelta(minutes=1)),
        ("P1D", timedelta(days=1)),
        ("PT0.5S", timedelta(milliseconds=500)),
        ("P1DT2H3M4S", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("PT10M", timedelta(minutes=10)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "P", "PT", "1M", "PT1X", "P1DT", "five minutes"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not an ISO-8601 duration"):
        parse_duration(text)


def test_repository_config_declares_the_deployed_jobs_queue() -> None:
    queue = {q.name: q for q in load_config(REPO_CONFIG).queues}["jobs"]
    assert asdict(queue) == JOBS_QUEUE


def test_defaults_when_properties_are_omitted() -> None:
    config = parse_config({"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": [{"Name": "q"}]}]}})
    (queue,) = config.queues
    assert queue.lock_duration == timedelta(minutes=1)
    assert queue.max_delivery_count == 10
    assert not queue.requires_duplicate_detection
    assert queue.max_message_size == 256 * 1024  # the Standard tier's limit


def test_max_message_size_follows_the_queue_setting() -> None:
    raw = {"Name": "q", "Properties": {"MaxMessageSizeInKilobytes": 1024}}
    (queue,) = parse_config({"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": [raw]}]}}).queues
    assert queue.max_message_size == 1024 * 1024


@pytest.mark.parametrize(
    ("queues", "topics", "message"),
    [
        ([{"Name": "a"}, {"Name": "A"}], [], "Queues[1].Name: duplicate queue name"),
        ([{"Name": "a/b"}], [], "Queues[0].Name: invalid queue name"),
        ([{"Properties": {}}], [], "Queues[0].Name: missing"),
        ([{"Name": "a", "Properties": {"ForwardTo": "b"}}], [], "ForwardTo: auto-forwarding is not supported"),
        ([], [{"Name": "t"}], "Topics: topics are not supported"),
        (
            [{"Name": "a", "Properties": {"MaxMessageSizeInKilobytes": 0}}],
            [],
            "MaxMessageSizeInKilobytes: expected an integer from 1 to 102400, got 0",
        ),
        ([{"Name": "a", "Properties": {"RequiresSession": True}}], [], "RequiresSession: sessions are not supported"),
    ],
)
def test_invalid_config_names_the_field(queues: list[object], topics: list[object], message: str) -> None:
    document = {"UserConfig": {"Namespaces": [{"Name": "ns", "Queues": queues, "Topics": topics}]}}
    with pytest.raises(ConfigError) as excinfo:
        parse_config(document)
    assert message in str(excinfo.value)
