"""A direct upload (issue 12): ``POST /api/uploads``, then the file straight to Blob Storage through the write-only
SAS URL it answered with, as a block blob in parallel blocks (Put Block, then Put Block List), as ``azcopy`` and the
SDK's ``upload_blob(max_concurrency=...)`` do. Plain HTTP: the CLI needs no storage SDK."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape

import httpx

from cli.errors import UploadFailed

UPLOAD_ABOVE = 64 * 1024 * 1024  # files larger than this are uploaded to storage, not sent in the request
BLOCK_SIZE = 8 * 1024 * 1024
CONCURRENCY = 4


def put_blocks(client: httpx.Client, url: str, path: Path, *, block_size: int = BLOCK_SIZE,
               concurrency: int = CONCURRENCY) -> int:  # fmt: skip
    """Upload ``path`` to the SAS ``url`` as a block blob; the bytes sent."""
    size = path.stat().st_size
    count = max(1, -(-size // block_size))
    ids = [base64.b64encode(f"block-{i:08d}".encode()).decode() for i in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:

        def put(i: int) -> None:
            data = os.pread(fd, block_size, i * block_size)
            _check(client.put(f"{url}&comp=block&blockid={quote(ids[i], safe='')}", content=data))

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(put, range(count)))
    finally:
        os.close(fd)
    body = "<?xml version='1.0' encoding='utf-8'?><BlockList>"
    body += "".join(f"<Latest>{escape(i)}</Latest>" for i in ids) + "</BlockList>"
    headers = {"x-ms-blob-content-type": "image/tiff", "Content-Type": "application/xml"}
    _check(client.put(f"{url}&comp=blocklist", content=body.encode(), headers=headers))
    return size


def _check(response: httpx.Response) -> None:
    if not response.is_success:
        code = response.headers.get("x-ms-error-code", "")
        raise UploadFailed(f"storage answered {response.status_code} {code}".strip())
