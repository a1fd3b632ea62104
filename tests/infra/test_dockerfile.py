"""Dockerfile.gpu: CUDA PyTorch base, torch not reinstalled, non-root, healthcheck, SIGTERM drain, the worker CMD."""

from __future__ import annotations

import json
import re

import pytest

from tests.infra import bicep_tree as bt

DOCKERFILE = bt.REPO / "Dockerfile.gpu"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def last(steps: list[tuple[str, str]], keyword: str) -> str:
    matches = [args for k, args in steps if k == keyword]
    assert matches, f"no {keyword}"
    return matches[-1]


def test_base_is_a_cuda_pytorch_runtime(steps: list[tuple[str, str]]) -> None:
    base = re.search(r"BASE_IMAGE=(\S+)", last(steps, "ARG"))
    assert base
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base.group(1))
    assert last(steps, "FROM") == "${BASE_IMAGE}"


def test_installs_worker_requirements_without_touching_torch(steps: list[tuple[str, str]]) -> None:
    runs = " ".join(args for k, args in steps if k == "RUN")
    assert "pip install -r requirements-worker.txt -c /tmp/torch-constraint.txt" in runs
    assert not re.search(r"pip install[^&]*\s['\"]?torch([=<>~ ]|$)", runs)
    for name in ("requirements.txt", "requirements-worker.txt"):
        lines = (bt.REPO / name).read_text().splitlines()
        assert not [line for line in lines if re.match(r"\s*torch\b", line)], f"{name} would reinstall torch"


def test_runs_as_a_non_root_user(steps: list[tuple[str, str]]) -> None:
    user = last(steps, "USER").split(":")[0]
    assert user not in ("root", "0")


def test_healthcheck_stop_signal_and_command(steps: list[tuple[str, str]]) -> None:
    health = last(steps, "HEALTHCHECK")
    assert json.loads(health[health.index("CMD") + 3 :]) == ["python", "-m", "gpu_worker", "--healthcheck"]
    assert "--start-period=" in health
    assert last(steps, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(last(steps, "CMD")) == ["python", "-m", "gpu_worker"]


def test_stop_timeout_in_cloud_init_exceeds_the_drain_grace() -> None:
    vmss = bt.module("gpu-vmss")
    assert vmss.variables["stopTimeoutSeconds"].value == bt.Expr("shutdownGraceSeconds + 30")
    assert vmss.params["shutdownGraceSeconds"].value < 30  # a Spot Preempt notice comes at least 30 s ahead
    env = vmss.variables["workerEnvironment"].value
    assert env["WORKER_SHUTDOWN_GRACE"] == bt.Expr("string(shutdownGraceSeconds)")
    assert env["WORKER_PREEMPTION_WATCH"] == "true"
    assert env["WORKER_DEVICE"] == "cuda"


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    lines = (bt.REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"requirements.txt", "requirements-worker.txt", "shared", "gpu_worker"}
    copied = [args.split()[0].rstrip("/") for k, args in instructions(DOCKERFILE.read_text()) if k == "COPY"]
    assert {c for c in copied if c != "requirements.txt"} <= included | {"requirements-worker.txt"}
