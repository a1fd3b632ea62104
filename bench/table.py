"""Markdown tables for docs/performance.md from a benchmark's JSON: ``python -m bench.X | python -m bench.table``.

Reads one JSON object on stdin (the output of ``bench.worker_throughput``, ``bench.db_round_trips``,
``bench.analysis``, ``bench.submit_overhead``, ``bench.api_latency`` or ``bench.gpu``), prints its tables in the
layout of docs/performance.md, and passes the JSON itself on to stderr so that nothing measured is lost.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

Rows = list[list[Any]]


def table(header: list[str], rows: Rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def worker_throughput(r: dict[str, Any]) -> str:
    rows: Rows = []
    for name, by_workers in r["results"].items():
        shape = "x".join(map(str, r["job_sets"][name]["shape"]))
        for workers, cell in by_workers.items():
            p, n = cell["project"], cell["naive"]
            rows.append([f"{name} ({shape}, {p['jobs']} jobs)", workers, p["jobs_per_s"], n["jobs_per_s"],
                         f"**{cell['project_over_naive']}**", p["cpu_s_per_job"], n["cpu_s_per_job"],
                         p.get("stack_cpu_s_per_job"), n.get("stack_cpu_s_per_job"), p.get("ceiling_jobs_per_s"),
                         cell.get("ceiling_over_naive")])  # fmt: skip
    header = ["job set", "workers", "project jobs/s", "naive jobs/s", "project/naive", "project CPU s/job",
              "naive CPU s/job", "project stack CPU s/job", "naive stack CPU s/job", "ceiling jobs/s",
              "ceiling/naive"]  # fmt: skip
    return table(header, rows)


def db_round_trips(r: dict[str, Any]) -> str:
    rows: Rows = []
    for name, cell in r["results"].items():
        p, n = cell["project"], cell["naive"]
        top = ", ".join(f"{k}… {v}" for k, v in list(p["by_statement"].items())[:4])
        rows.append([f"{name} ({p['jobs']} jobs)", p["statements_per_job"], n["statements_per_job"],
                     f"**{cell['project_over_naive']}**", top])  # fmt: skip
    return table(["job set", "project statements/job", "naive statements/job", "project/naive", "project's"], rows)


def analysis(r: dict[str, Any]) -> str:
    stages = ["read", "indices", "cloud_mask", "cover", "cog_write"]
    rows: Rows = [[device, *(d[s] for s in stages)] for device, d in r["devices"].items()]
    out = [table(["device", *(f"{s} Mpx/s" for s in stages)], rows), ""]
    rows = []
    for device, d in r["devices"].items():
        for key, label in (("", device), ("_bfloat16", f"{device}, cover MLP bfloat16")):
            for size, e2e in d.get(f"end_to_end{key}", {}).items():
                decode = r["decode"][size]["mpx_per_s"]
                ratio = r[f"analysis_over_decode{key}"][device][size]
                rows.append([f"{size}²", label, e2e["seconds"], e2e["mpx_per_s"], decode, f"**{ratio}**"])
    tile = r.get("full_tile")
    if tile:
        ratio = f"**{tile['analysis_over_decode']}** (peak RSS {tile['peak_rss_mb']} MB)"
        rows.append(["10980² (full tile)", tile["device"], tile["analyse_seconds"], tile["mpx_per_s"],
                     tile["decode_mpx_per_s"], ratio])  # fmt: skip
    header = ["scene (13 bands)", "device", "end-to-end s", "analysis Mpx/s", "decode Mpx/s", "analysis/decode"]
    out.append(table(header, rows))
    return "\n".join(out)


def submit_overhead(r: dict[str, Any]) -> str:
    rows: Rows = []
    for name in ("small", "large"):
        c = r[name]
        parts = ", ".join(f"{k} {v}" for k, v in c["raw_parts_ms"].items())
        rows.append([f"{name} ({c['bytes']:,} B)", c["submit_ms"]["p50"], c["submit_ms"]["p95"], c["raw_ms"]["p50"],
                     c["raw_ms"]["p95"], parts, f"**{c['submit_over_raw']}**"])  # fmt: skip
    header = ["GeoTIFF", "submit p50 ms", "submit p95 ms", "raw p50 ms", "raw p95 ms", "raw parts p50 ms",
              "submit/raw (p50)"]  # fmt: skip
    return table(header, rows)


def api_latency(r: dict[str, Any]) -> str:
    s, raw = r["status_ms"], r["raw_select_ms"]
    rows: Rows = [[s["p50"], s["p95"], raw["p50"], raw["p95"], f"**{r['status_over_raw_select']}**"]]
    return table(["status p50 ms", "status p95 ms", "raw SELECT p50 ms", "raw SELECT p95 ms", "status/raw"], rows)


def gpu(r: dict[str, Any]) -> str:
    if "note" in r:
        return f"(not measured: {r['note']})"
    m, t, b = r["machine"], r["full_tile"], r["balance"]
    batching = r["cover_batching"]["batched_over_unbatched"]
    rows: Rows = [[m.get("card", m["device"]), t["seconds"], t["mpx_per_s"], t.get("gpu_max_memory_allocated_mb"),
                   t["peak_rss_mb"], b["analysis_over_decode"]["1"], batching]]  # fmt: skip
    header = ["card", "full tile s", "Mpx/s", "GPU peak MB", "peak RSS MB", "analysis/decode (1 thread)",
              "cover batched/unbatched"]  # fmt: skip
    decode = table(["decode threads", *r["decode"]], [["Mpx/s", *r["decode"].values()]])
    return table(header, rows) + "\n\n" + decode


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "worker_throughput": worker_throughput,
    "db_round_trips": db_round_trips,
    "analysis": analysis,
    "submit_overhead": submit_overhead,
    "api_latency": api_latency,
    "gpu": gpu,
}


def main() -> int:
    text = sys.stdin.read()
    sys.stderr.write(text)
    report = json.loads(text)
    print(TABLES[report["benchmark"]](report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
