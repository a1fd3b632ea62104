"""Pure parts of the local Functions host's HTTP layer: body framing (RFC 9112), the query as the host passes it,
and the Function App setting the Azure SDKs' log level itself (in Azure, host.json cannot)."""

from __future__ import annotations

import io
import subprocess
import sys
from email.message import Message
from pathlib import Path

import pytest

from local.functions_host.framing import BadFraming, BodyTooLarge, Framing, drain_chunked, framing_of
from local.functions_host.invoke import host_params

ROOT = Path(__file__).resolve().parents[2]


def _headers(*fields: tuple[str, str]) -> Message:
    message = Message()
    for name, value in fields:
        message[name] = value
    return message


@pytest.mark.parametrize(
    ("fields", "framing"),
    [
        ((), Framing(chunked=False, length=0, close=False)),
        ((("Content-Length", "12"),), Framing(chunked=False, length=12, close=False)),
        ((("Content-Length", "12"), ("Content-Length", "12")), Framing(chunked=False, length=12, close=False)),
        ((("Content-Length", "12, 12"),), Framing(chunked=False, length=12, close=False)),
        ((("Transfer-Encoding", "Chunked"),), Framing(chunked=True, length=0, close=False)),
        ((("Transfer-Encoding", "gzip, chunked"),), Framing(chunked=True, length=0, close=False)),
        ((("Transfer-Encoding", "chunked"), ("Content-Length", "5")), Framing(chunked=True, length=0, close=True)),
    ],
)
def test_framing(fields: tuple[tuple[str, str], ...], framing: Framing) -> None:
    assert framing_of(_headers(*fields)) == framing


@pytest.mark.parametrize(
    "fields",
    [
        (("Content-Length", "12"), ("Content-Length", "13")),
        (("Content-Length", "12, 13"),),
        (("Content-Length", "+12"),),
        (("Content-Length", "1_2"),),
        (("Content-Length", "-1"),),
        (("Transfer-Encoding", "gzip"),),
        (("Transfer-Encoding", "chunked, gzip"),),
        (("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")),
    ],
)
def test_ambiguous_framing_is_refused(fields: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(BadFraming):
        framing_of(_headers(*fields))


def test_a_chunked_body_is_read_to_its_end() -> None:
    stream = io.BytesIO(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\nNEXT")
    assert drain_chunked(stream, 10) == 5
    assert stream.read() == b"NEXT"  # the next request starts where the body ended


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"zz\r\n", BadFraming),
        (b"0x3\r\nabc\r\n0\r\n\r\n", BadFraming),
        (b"3\r\nabcdef\r\n0\r\n\r\n", BadFraming),
        (b"3\r\nab", ConnectionResetError),
        (b"8\r\n12345678\r\n3\r\nabc\r\n0\r\n\r\n", BodyTooLarge),
    ],
)
def test_broken_chunked_bodies(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        drain_chunked(io.BytesIO(data), 10)


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("", {}),
        ("bands=B04,B08&scale=2", {"bands": "B04,B08", "scale": "2"}),
        ("bands=", {}),
        ("bands", {}),
        ("bands=&bands=", {}),
        ("bands=B04&bands=&bands=B08", {"bands": "B04,B08"}),
        ("Bands=B04&bands=B08", {"Bands": "B04,B08"}),
        ("q=a+b&r=%26", {"q": "a b", "r": "&"}),
    ],
)
def test_query_as_the_host_passes_it(query: str, params: dict[str, str]) -> None:
    assert host_params(query) == params


def test_the_function_app_keeps_the_azure_sdks_at_warning() -> None:
    code = "import logging, function_app; print(logging.getLevelName(logging.getLogger('azure').level))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "WARNING", done.stderr
