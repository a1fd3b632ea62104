"""``python -m local.sdk_suite [--shards N] [-- PYTEST ARGS]``: the SDK's queue tests against the emulator.

Downloads the source distribution of the installed azure-servicebus (``pip download --no-deps --no-binary :all:``)
into ``.local/sdk_suite/`` once, extracts ``tests/test_queues.py``, ``tests/async_tests/test_queues_async.py`` and
the helper modules they import, then runs each file in ``--shards`` pytest processes at once (the tests mostly
sleep), each with its own emulator (``plugin.py``). Prints one JSON object (per file: passed, failed, skipped,
excluded, wall seconds, the failed tests; the excluded tests with their reasons) and exits 1 when a test failed
or a pytest process did not finish, else 0. Each process's output is kept in ``.local/sdk_suite/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
_CACHE = _REPO / ".local" / "sdk_suite"
_SHIMS = Path(__file__).resolve().parent / "shims"
_FILES = {"sync": "tests/test_queues.py", "async": "tests/async_tests/test_queues_async.py"}
_HELPERS = ("tests/utilities.py", "tests/mocks.py", "tests/async_tests/mocks_async.py")
_PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet")
_INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\ntimeout = 900\n"


def fetch_tests(sdk_version: str) -> Path:
    """The extracted ``tests`` directory of the SDK's sdist, downloaded on first use."""
    root = _CACHE / f"azure_servicebus-{sdk_version}"
    tests = root / "tests"
    if all((root / name).exists() for name in (*_FILES.values(), *_HELPERS)):
        return tests
    _CACHE.mkdir(parents=True, exist_ok=True)
    archive = _CACHE / f"azure_servicebus-{sdk_version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [*_PIP_DOWNLOAD, "--dest", str(_CACHE), f"azure-servicebus=={sdk_version}"],
            check=True,
        )
    prefix = f"azure_servicebus-{sdk_version}/"
    with tarfile.open(archive) as tar:
        members = [tar.getmember(prefix + name) for name in (*_FILES.values(), *_HELPERS)]
        tar.extractall(_CACHE, members=members, filter="data")
    (tests / "pytest.ini").write_text(_INI, encoding="utf-8")
    return tests


def _start(tests: Path, kind: str, shard: int, shards: int, extra: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    logs = _CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = logs / f"{kind}-{shard}.json"
    report.unlink(missing_ok=True)
    path = [str(_REPO), str(_SHIMS), str(tests), str(tests / "async_tests")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, "-m", "pytest", str(tests.parent / _FILES[kind]), "-c", str(tests / "pytest.ini")]
    command += ["--rootdir", str(tests), "-p", "local.sdk_suite.plugin", "-p", "no:cacheprovider"]
    command += ["-p", "no:schemathesis", "-rfE", f"--sdk-shard={shard}/{shards}", f"--sdk-report={report}", *extra]
    with (logs / f"{kind}-{shard}.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, report


def _summarise(reports: list[Path], seconds: float) -> dict[str, Any]:
    tests: dict[str, dict[str, Any]] = {}
    excluded: dict[str, str] = {}
    for report in reports:
        data = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {"tests": {}, "excluded": {}}
        tests.update(data["tests"])
        excluded.update(data["excluded"])
    outcomes = [entry["outcome"] for entry in tests.values()]
    return {
        "passed": outcomes.count("passed"),
        "failed": outcomes.count("failed"),
        "skipped": outcomes.count("skipped"),
        "excluded": len(excluded),
        "wall_s": round(seconds, 1),
        "failures": sorted(nodeid for nodeid, entry in tests.items() if entry["outcome"] == "failed"),
        "excluded_tests": excluded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.sdk_suite", description=__doc__)
    parser.add_argument("--shards", type=int, default=4, help="pytest processes per test file (default 4)")
    parser.add_argument("--only", choices=sorted(_FILES), help="run one of the two files")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest, after --")
    args = parser.parse_args(argv)
    sdk_version = version("azure-servicebus")
    tests = fetch_tests(sdk_version)
    kinds = [args.only] if args.only else list(_FILES)
    started = time.monotonic()
    runs = {kind: [_start(tests, kind, i, args.shards, args.pytest_args) for i in range(args.shards)] for kind in kinds}
    summary: dict[str, Any] = {"azure_servicebus": sdk_version, "shards": args.shards}
    ok = True
    for kind, processes in runs.items():
        codes = [process.wait() for process, _ in processes]
        ok = ok and all(code in (0, 5) for code in codes)  # 5: a shard with no test left
        summary[kind] = _summarise([report for _, report in processes], time.monotonic() - started)
        ok = ok and summary[kind]["failed"] == 0
    summary["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary, indent=2))
    print(f"logs: {_CACHE / 'logs'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
