"""A job's status document as a short, readable report (the demo's output)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_FRACTIONS = ("valid_fraction", "cloud_fraction", "clear_fraction", "vegetation_fraction", "water_fraction")
_SHOWN = {"analysis", "scene", "indices", "indices_clear", "model_version", "outputs", "cover", *_FRACTIONS}


def _number(value: Any) -> str:
    return f"{value:8.4f}" if isinstance(value, int | float) else f"{'-':>8}"


def indices_table(title: str, indices: Mapping[str, Mapping[str, Any]]) -> list[str]:
    columns = ("mean", "std", "p10", "p50", "p90")
    lines = [f"  {title:<14}" + " ".join(f"{c:>8}" for c in columns)]
    for name, stats in indices.items():
        lines.append(f"    {name.upper():<12}" + " ".join(_number(stats.get(c)) for c in columns))
    return lines


def summary(job: Mapping[str, Any]) -> str:
    lines = [f"job {job['job_id']}: {job['status']} after {job.get('attempts', '?')} attempt(s)"]
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        lines.append(f"  error {error.get('code', '?')}: {error.get('message', '')}")
        return "\n".join(lines)
    result: Mapping[str, Any] = job.get("result") or {}
    scene = result.get("scene", {})
    lines.append(f"  analysis {result.get('analysis', job.get('analysis', '?'))} ({result.get('model_version', '?')})")
    lines.append(
        f"  scene {scene.get('width')} x {scene.get('height')} px, {scene.get('band_count')} bands, "
        f"{scene.get('crs')}, WGS 84 bounds {scene.get('bounds_wgs84')}"
    )
    fractions = [f"{k.removesuffix('_fraction')} {result[k]:.1%}" for k in _FRACTIONS if k in result]
    if fractions:
        lines.append("  " + ", ".join(fractions))
    if isinstance(result.get("cover"), Mapping):
        lines.append("  cover " + ", ".join(f"{k} {v:.1%}" for k, v in result["cover"].items()))
    lines.extend(indices_table("indices", result.get("indices", {})))
    if result.get("indices_clear"):
        lines.extend(indices_table("clear pixels", result["indices_clear"]))
    for key in sorted(set(result) - _SHOWN):
        lines.append(f"  {key}: {json.dumps(result[key])}")
    return "\n".join(lines)
