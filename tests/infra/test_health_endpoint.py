"""The workers' /health endpoint (cloud-init) answers the Application Health extension in Rich Health States.

The extension (typeHandlerVersion 2.0) reads a 2xx answer's {"ApplicationHealthState": "Healthy" | "Unhealthy"};
anything else is Unknown. At extension start an instance is Initializing until numberOfProbes equal Healthy or
Unhealthy answers, or until gracePeriod ends (virtual-machine-scale-sets-health-extension, "Initializing state"). So a
worker still booting (GPU driver, container toolkit, a multi-GB image pull, the HEALTHCHECK's start period) must not
answer Unhealthy, or it leaves Initializing within numberOfProbes x intervalInSeconds. These tests run the endpoint's
own script, taken from the cloud-init file, with a fake `docker` that reports each container state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.infra import bicep_tree as bt
from tests.infra.bicep_tree import dig

CLOUD_INIT = bt.MODULES_DIR / "gpu-worker.cloud-init.yaml"
Probe = Callable[[str | None], tuple[int, dict[str, str]]]


def health_settings() -> dict[str, object]:
    (vmss,) = bt.module("gpu-vmss").resources_of_type("Microsoft.Compute/virtualMachineScaleSets")
    profile = vmss.value["properties"]["virtualMachineProfile"]
    extensions = dig(profile, "extensionProfile", "extensions")
    (health,) = [e["properties"] for e in extensions if e["name"] == "HealthExtension"]
    assert isinstance(health, dict)
    return health


def endpoint_script(port: int) -> str:
    config = yaml.safe_load(CLOUD_INIT.read_text().replace("__HEALTH_PORT__", str(port)))
    (entry,) = [f for f in config["write_files"] if f["path"] == "/usr/local/sbin/crop-ai-health"]
    script = entry["content"]
    assert isinstance(script, str)
    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Probe]:
    """GET /health of the real script, with `docker inspect` answering `status` (None: no such container)."""
    port = free_port()
    (tmp_path / "health.py").write_text(endpoint_script(port))
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir()
    docker.write_text(
        '#!/bin/sh\nstatus=$(cat "$(dirname "$0")/../status" 2>/dev/null) || exit 1\n'
        '[ -n "$status" ] || { echo "Error: No such object: crop-ai-worker" >&2; exit 1; }\necho "$status"\n'
    )
    docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{docker.parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, str(tmp_path / "health.py")], env=env)

    def get(status: str | None) -> tuple[int, dict[str, str]]:
        (tmp_path / "status").write_text(status or "")
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as error:
                with error:
                    return error.code, json.loads(error.read())
            except urllib.error.URLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    try:
        yield get
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_extension_runs_rich_health_states_on_the_endpoint_s_port_and_path() -> None:
    health = health_settings()
    assert health["typeHandlerVersion"] == "2.0"
    settings = health["settings"]
    assert isinstance(settings, dict)
    assert (settings["protocol"], settings["requestPath"]) == ("http", "/health")
    assert settings["port"] == bt.Expr("healthPort")
    assert 'HTTPServer(("127.0.0.1", __HEALTH_PORT__), Health)' in CLOUD_INIT.read_text()


def test_the_grace_period_covers_a_worker_s_start() -> None:
    """Initializing lasts until gracePeriod: long enough for the driver, the image pull and the HEALTHCHECK's start."""
    settings = health_settings()["settings"]
    assert isinstance(settings, dict)
    assert settings["gracePeriod"] >= 900
    assert settings["gracePeriod"] <= 14400  # the extension's maximum
    assert settings["gracePeriod"] > settings["intervalInSeconds"] * settings["numberOfProbes"]


@pytest.mark.parametrize(
    ("docker_status", "code", "body"),
    [
        ("healthy", 200, {"ApplicationHealthState": "Healthy"}),
        ("unhealthy", 200, {"ApplicationHealthState": "Unhealthy"}),
        ("starting", 503, {"docker": "starting"}),  # Unknown: the instance stays Initializing at boot
        (None, 503, {"docker": "absent"}),  # no container yet (image still pulling) or the service restarting
    ],
)
def test_the_endpoint_maps_the_container_s_docker_health(
    probe: Probe, docker_status: str | None, code: int, body: dict[str, str]
) -> None:
    assert probe(docker_status) == (code, body)
