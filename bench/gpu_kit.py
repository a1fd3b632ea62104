"""What the GPU run needs that the GPU machine lacks, as one archive to carry there: ``python -m bench.gpu_kit``.

The lent GPU machines (``/work/.library/device``) run an image with CUDA, PyTorch, numpy, scipy, Pillow, attrs,
click, certifi and the NVML bindings, Python 3.12, and reach no package index. ``bench.gpu`` also imports rasterio
(GDAL), LightGBM (the cloud detector), pydantic, pyproj and shapely (field boundaries) and their small dependencies:
:data:`PACKAGES`, at the versions this environment has (the ones the tests ran with). This downloads their
manylinux wheels for ``--python`` (3.12), unpacks them into one tree (a wheel's contents are a ``site-packages``
layout, so ``PYTHONPATH`` finds them there), and writes it as ``.gpu/site.tar.xz`` (ignored by git): about 39 MB
against 54 MB of wheels, so that it and the repository's tracked files (~17 MB) stay under the 64 MiB a call may
carry. It prints one JSON object: the packages, the archive's bytes, the tracked files' bytes, and whether both fit.

On the GPU machine, one call (``carry: [".gpu"]``), as docs/performance.md ("GPU") gives it::

    python3 -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('/tmp/site', filter='data')" && \
      PYTHONPATH=/tmp/site:. python3 -m bench.gpu --tile-dir /tmp/bench --out $OUT/gpu.json

(Python's ``tarfile`` rather than ``tar xJf``: whether the image has ``xz`` is not known. LightGBM's library needs
the system's ``libgomp.so.1``, which a CUDA image with a compiler normally has; not checked on the machine.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The distributions bench.gpu imports (with the worker's analysis) that the GPU image does not hold.
PACKAGES = (
    "rasterio",
    "affine",
    "cligj",
    "click-plugins",
    "lightgbm",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pyproj",
    "shapely",
    # In the image too, at versions not known here: pydantic-core needs typing-extensions >= 4.16, LightGBM imports
    # narwhals (>= 1.15); these small wheels take precedence on PYTHONPATH.
    "typing-extensions",
    "narwhals",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
CARRY_LIMIT = 64 * 1024 * 1024  # what one call to the GPU machine may carry, the working tree included


def download(python: str, into: Path) -> list[str]:
    """The wheels of :data:`PACKAGES` at this environment's versions, for CPython ``python`` on x86-64 Linux."""
    pins = [f"{name}=={version(name)}" for name in PACKAGES]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         python, "--implementation", "cp", *platforms, "-d", str(into), *pins],
        check=True,
    )  # fmt: skip
    return pins


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in names if name and (REPO / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (3.12)")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu" / "site.tar.xz")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        pins = download(args.python, wheels)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        wheel_bytes = sum(w.stat().st_size for w in wheels.glob("*.whl"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:xz") as tar:
            tar.add(site, arcname=".")
    archive_bytes, tree = args.out.stat().st_size, tracked_bytes()
    report = {
        "gpu_kit": str(args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out),
        "python": args.python, "packages": pins, "wheel_bytes": wheel_bytes, "archive_bytes": archive_bytes,
        "tracked_bytes": tree, "carry_limit_bytes": CARRY_LIMIT, "fits": archive_bytes + tree <= CARRY_LIMIT,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
