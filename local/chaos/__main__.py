"""``python -m local.chaos [--short] [--jobs N] [--pg-outage S] [--blob-outage S] ...``: one chaos run; ONE JSON
object on stdout (logs on stderr); exit 0 when nothing was stuck, lost, run twice or failed, 1 otherwise, 130 when
interrupted."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import FrameType

from local.chaos.run import SETTINGS, Options, run
from local.chaos.timeline import Plan
from local.stack import REPO_ROOT


@dataclass(frozen=True)
class Preset:
    jobs: int
    pg_outage: float
    blob_outage: float
    orphans: int
    kill_every: tuple[float, float]
    settle_timeout: float


DEFAULT = Preset(jobs=200, pg_outage=600, blob_outage=120, orphans=5, kill_every=(20, 40), settle_timeout=900)
SHORT = Preset(jobs=40, pg_outage=60, blob_outage=30, orphans=5, kill_every=(30, 60), settle_timeout=300)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local.chaos", description=__doc__.split(";")[0])
    parser.add_argument("--short", action="store_true", help="a quick run: 40 jobs, PG down 60 s, Azurite 30 s")
    parser.add_argument("--jobs", type=int, help="jobs submitted over HTTP (default 200; --short 40)")
    parser.add_argument("--pg-outage", type=float, help="seconds PostgreSQL is down (default 600; --short 60)")
    parser.add_argument("--blob-outage", type=float, help="seconds Azurite is down (default 120; --short 30)")
    parser.add_argument("--orphans", type=int, help="jobs inserted and stored but never sent (default 5)")
    parser.add_argument("--kill-every", type=float, nargs=2, metavar=("MIN", "MAX"), help="seconds between SIGKILLs")
    parser.add_argument("--settle-timeout", type=float, help="seconds to wait for every job to be terminal")
    parser.add_argument("--submit-timeout", type=float, help="seconds a submit is retried (default PG outage + 180)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--image", type=Path, default=REPO_ROOT / "tests" / "data" / "s2_rgbn_fields_128.tif")
    parser.add_argument("--bands", default="B02,B03,B04,B08")
    parser.add_argument("--base", type=Path, default=REPO_ROOT / ".local" / "chaos", help="runs go in BASE/<time>")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a service setting (e.g. JOB_MAX_ATTEMPTS=1)"
    )
    return parser


def options(argv: list[str] | None = None) -> Options:
    args = _parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Preset) if getattr(args, f.name) is not None}
    preset = replace(SHORT if args.short else DEFAULT, **given)
    settings = dict(SETTINGS)
    for item in args.set:
        name, sep, setting = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        settings[name] = setting
    plan = Plan(
        jobs=preset.jobs,
        pg_outage=preset.pg_outage,
        blob_outage=preset.blob_outage,
        orphans=preset.orphans,
        kill_every=(preset.kill_every[0], preset.kill_every[1]),
        seed=args.seed,
    )
    return Options(
        plan=plan,
        base=args.base,
        image=args.image,
        bands=args.bands,
        workers=args.workers,
        submit_timeout=args.submit_timeout or plan.pg_outage + 180.0,
        settle_timeout=preset.settle_timeout,
        settings=settings,
    )


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    chosen = options(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("azure", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        report = run(chosen)
    except KeyboardInterrupt:
        print(json.dumps({"ok": False, "error": "interrupted"}))
        return 130
    except Exception as e:  # the stack was stopped; say why in the one JSON object
        logging.getLogger("local.chaos").exception("chaos: the run failed")
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
