"""``python -m bench.gpu --device cpu``: the GPU run's script goes through every step and reports each.

A lent GPU machine is drawn by chance and gives a few minutes, so the script must work the first time it gets one;
this runs it here on the CPU at small sizes (a check of the script, not a figure).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    argv = [
        sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tile-size", "1024", "--tile-dir", str(tmp_path),
        "--decode-rows", "1024", "--batch-jobs", "4", "--repeat", "1", "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert json.loads(out.read_text()) == report

    assert report["machine"]["device"] == "cpu"
    assert report["machine"]["cuda"] is None
    assert all(rate > 0 for rate in report["stages"].values())
    for size in ("1024", "2048"):
        assert report["sizes"][size]["end_to_end"]["seconds"] > 0
        assert report["sizes"][size]["analysis_over_decode"] > 0
    assert report["full_tile"]["bands"] == 13
    assert report["full_tile"]["seconds"] > 0
    assert report["full_tile"]["peak_rss_mb"] > 0
    cpus = report["machine"]["cpus"]
    assert {"1", str(cpus)} <= set(report["decode"])  # 1, 2, 4, ... threads, and this machine's CPU count
    assert set(report["balance"]["analysis_over_decode"]) == set(report["decode"])
    assert report["cover_batching"]["batched_over_unbatched"] > 0
    assert report["cover_batching"]["batcher"]["model_calls"] >= 1
    at_once = report["analyses_at_once"]
    assert at_once["one_at_a_time"]["jobs_per_s"] > 0
    for key in ("batched_2_at_once", "batched_4_at_once"):
        # Batched across jobs, every job's cover is the one it gets alone.
        assert at_once[key]["max_abs_cover_mean_difference"] < 1e-6
        assert at_once[key]["model_calls"] >= 1
