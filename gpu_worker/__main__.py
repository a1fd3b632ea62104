"""``python -m gpu_worker``: the consumer process. Wiring only: settings once, clients opened with ``with``.

Flags: ``--max-jobs N`` (exit after N messages),
``--healthcheck [--max-age S]`` (exit 0 when the heartbeat file is fresh; the Dockerfile's HEALTHCHECK runs it).
Exit status 0 after a drain (SIGTERM/SIGINT, preemption notice, ``--max-jobs``), 1 when the heartbeat is
stale or a job overruns its time limit, 2 on bad arguments, 75 when an attempt could not be stopped at its time
limit (the supervisor restarts the worker).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_worker.heartbeat import check
from shared.logs import configure_console_logging
from shared.settings import Settings

if TYPE_CHECKING:
    from gpu_worker.handler import Analyzer


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--max-jobs", type=int, metavar="N", help="exit after handling N messages")
    parser.add_argument("--healthcheck", action="store_true", help="exit 0 if the heartbeat file is fresh")
    parser.add_argument("--max-age", type=float, metavar="S", help="heartbeat age limit (WORKER_HEARTBEAT_MAX_AGE)")
    return parser.parse_args(argv)


def healthcheck(settings: Settings, max_age: float | None) -> int:
    healthy, why = check(
        Path(settings.worker_heartbeat_file),
        max_age=settings.worker_heartbeat_max_age if max_age is None else max_age,
        busy_limit=settings.job_timeout.total_seconds(),
    )
    print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


def main(argv: list[str] | None = None, *, analyzer: Analyzer | None = None) -> int:
    """``analyzer`` replaces the torch one (tests inject a slow one)."""
    args = _arguments(argv)
    settings = Settings.from_env()
    if args.healthcheck:
        return healthcheck(settings, args.max_age)
    configure_console_logging()
    from gpu_worker.app import run  # torch and the SDKs: not for the healthcheck

    return run(settings, analyzer=analyzer, max_jobs=args.max_jobs)


if __name__ == "__main__":
    sys.exit(main())
