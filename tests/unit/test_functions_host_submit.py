"""``POST /api/jobs`` with a chunked body: the Functions host does not pass it to the app (azure-functions-host#7930),
so the function sees an empty body, in Azure as through the local host, and answers a problem that tells the client
to send ``Content-Length``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from local.functions_host import FunctionsHost, HostConfig, RouteTable
from local.functions_host.routes import routes_of
from tests import geotiffs
from tests.functions_client import indexed, post_job
from tests.unit.test_functions import World, assert_problem
from tests.unit.test_functions import world as world


class _IndexedApp:
    def get_functions(self) -> list[Any]:
        return list(indexed().values())


@pytest.fixture
def api(world: World) -> Iterator[httpx.Client]:
    host = FunctionsHost(HostConfig(port=0), RouteTable(routes_of(_IndexedApp()), "api"))
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=host.base_url, timeout=30) as client:
            yield client
    finally:
        host.shutdown()
        host.close()
        thread.join(5)


def test_an_empty_chunked_body_is_an_empty_body_problem_that_asks_for_content_length(world: World) -> None:
    response = post_job(b"", headers={"Transfer-Encoding": "chunked"})
    assert "Content-Length" in str(assert_problem(response, 400, "empty_body")["detail"])
    assert "chunked" not in str(assert_problem(post_job(b""), 400, "empty_body")["detail"])


def test_a_chunked_upload_through_the_host_is_refused_and_a_sized_one_accepted(world: World, api: httpx.Client) -> None:
    image = geotiffs.crafted()
    chunked = api.post("/jobs", content=iter([image[:1000], image[1000:]]), headers={"Content-Type": "image/tiff"})
    assert (chunked.status_code, chunked.json()["code"]) == (400, "empty_body")
    assert "Content-Length" in chunked.json()["detail"]
    assert world.publisher.sent == []
    sized = api.post("/jobs", content=image, headers={"Content-Type": "image/tiff"})
    assert sized.status_code == 202, sized.text
    assert sized.json()["status"] == "queued"
