"""Gather every benchmark's JSON into bench/REPORT.md and draw bench/throughput.png.

``make bench`` runs each benchmark with ``--json bench/output/<name>.json`` and then this
script. Every figure is shown with the baseline measured in the same run and the ratio.
A benchmark whose JSON is missing is listed as not run. The chart plots delivered emails
per second over time: the 50,000-recipient backlog draining in bench/latency.py (with the
window in which transactional latency was measured) and bench/scaling.py's runs with 1, 2
and 4 bulk worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OUTPUT = BENCH / "output"
HEAD = ["| figure | baseline (same run) | Mailroom | ratio | target |", "|---|---:|---:|---:|---|"]


def load(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def med(values: list[float]) -> float:
    return statistics.median(values)


def delivery_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    if data.get("runs"):
        runs = data["runs"]
        rows.append(
            f"| bulk delivery, 5,000 emails (legacy API), emails/s | raw smtplib "
            f"{rate(med([r['raw']['rate'] for r in runs]))} "
            f"| {rate(med([r['mailroom']['rate'] for r in runs]))} "
            f"| {data['median_ratio']:.2f} | ≥ 0.7 |"
        )
    campaign = data.get("campaign")
    if campaign:
        runs = campaign["runs"]
        rows.append(
            f"| campaign delivery, emails/s | raw smtplib "
            f"{rate(med([r['raw']['rate'] for r in runs]))} "
            f"| {rate(med([r['mailroom']['rate'] for r in runs]))} "
            f"| {campaign['median_ratio']:.2f} | — |"
        )
        growth = runs[-1]["memory_growth"]
        rows.append(
            f"| bulk worker memory over the campaign | after warm-up "
            f"{campaign['memory_after_warmup']['total_kib'] / 1024:.0f} MiB "
            f"| {runs[-1]['memory_after']['total_kib'] / 1024:.0f} MiB | {1 + growth:.3f} "
            f"| growth < 10 % |"
        )
    return rows


def ingest_rows(data: dict[str, Any]) -> list[str]:
    runs = data["runs"]
    copy = f"raw COPY {rate(med([r['raw']['rate'] for r in runs]))}"
    rows = [
        f"| CSV ingestion, {data['machine']['rows']:,} rows, rows/s | {copy} "
        f"| {rate(med([r['ingest']['rate'] for r in runs]))} | {data['median_ratio']:.2f} "
        f"| ≥ 0.5 |"
    ]
    for share, what in (("database", "the outbox INSERT alone"), ("python", "the reader alone")):
        measured = [r for r in runs if r.get(share) and r.get(f"{share}_ratio")]
        if measured:
            seconds = med([r[share]["seconds"] for r in measured])
            rows.append(
                f"| ingestion's {share} share: {what}, rows/s | {copy} "
                f"| {rate(data['machine']['rows'] / seconds)} "
                f"| {med([r[f'{share}_ratio'] for r in measured]):.2f} "
                f"| upper bound for the ingestion's ratio |"
            )
    return rows


def api_rows(data: dict[str, Any]) -> list[str]:
    runs = data["runs"]

    def figure(side: str, key: str) -> float:
        return med([float(r[side][key]) for r in runs])

    def requests_per_second(side: str) -> float:
        return med([r[side]["requests"] / r[side]["seconds"] for r in runs])

    return [
        f"| POST /api/v1/messages, requests/s | trivial Django view "
        f"{rate(requests_per_second('trivial'))} | {rate(requests_per_second('api'))} "
        f"| {data['median_ratio']:.2f} | ≥ {data.get('target', '—')} |",
        *(
            [
                f"| floor for the above: one raw INSERT + one LPUSH, requests/s | trivial "
                f"Django view {rate(requests_per_second('trivial'))} "
                f"| {rate(requests_per_second('floor'))} "
                f"| {data['median_floor_ratio']:.2f} | upper bound for the API's ratio |"
            ]
            if "median_floor_ratio" in data
            else []
        ),
        f"| POST /api/v1/messages, p99 | trivial view {figure('trivial', 'p99_ms'):.0f} ms "
        f"| {figure('api', 'p99_ms'):.0f} ms "
        f"| {figure('api', 'p99_ms') / figure('trivial', 'p99_ms'):.2f} | — |",
    ]


def latency_rows(data: dict[str, Any]) -> list[str]:
    idle, busy = data["idle"], data["busy"]
    return [
        f"| transactional latency p50, API accepted → SMTP accepted, during a "
        f"{data['backlog']:,} backlog | idle system {idle['p50'] * 1000:.0f} ms "
        f"| {busy['p50'] * 1000:.0f} ms | {busy['p50'] / idle['p50']:.2f} | — |",
        f"| transactional latency p99, same | idle system {idle['p99'] * 1000:.0f} ms "
        f"| {busy['p99'] * 1000:.0f} ms | {data['ratio_p99']:.2f} "
        f"| < {data['target_p99_seconds'] * 1000:.0f} ms: "
        f"{'met' if data['meets_target'] else 'MISSED'} |",
    ]


def scaling_rows(data: dict[str, Any]) -> list[str]:
    return [
        f"| end-to-end throughput, {row['processes']} bulk process(es), emails/s "
        f"| raw smtplib, {row['processes']} connection(s), {rate(row['raw_rate'])} "
        f"| {rate(row['mailroom_rate'])} | {row['ratio']:.2f} | — |"
        for row in data["rows"]
    ]


def dashboard_rows(data: dict[str, Any]) -> list[str]:
    trivial, page = data["trivial"], data["data"]
    return [
        f"| GET /dashboard/data p50 | GET /healthz {trivial['p50_ms']:.1f} ms "
        f"| {page['p50_ms']:.1f} ms | {data['data_p50_ratio']:.2f} "
        f"| < {data.get('target_p50_ms', 50):g} ms |"
    ]


SECTIONS = (
    ("delivery", "bench/delivery.py", delivery_rows),
    ("ingest", "bench/ingest.py", ingest_rows),
    ("api", "bench/api.py", api_rows),
    ("latency", "bench/latency.py", latency_rows),
    ("scaling", "bench/scaling.py", scaling_rows),
    ("dashboard", "bench/dashboard.py", dashboard_rows),
)


def report(directory: Path, chart: bool, note: str = "") -> str:
    lines = [
        "# Benchmark report",
        "",
        f"Generated by `make bench` (bench/report.py) on {time.strftime('%Y-%m-%d %H:%M %Z')}. "
        "Every figure is next to a baseline measured in the same run on the same machine; "
        "ratio = Mailroom / baseline (for latencies: Mailroom under load / idle).",
        "",
        *HEAD,
    ]
    missing = []
    machine = None
    for name, script, rows in SECTIONS:
        data = load(directory, name)
        if data is None:
            missing.append(script)
            continue
        machine = machine or data.get("machine") or data.get("facts")
        lines += rows(data)
    if machine:
        lines += ["", f"Machine: {machine.get('cpu_count')} CPU(s), {machine.get('cpu', '?')}."]
    known = {name for name, _, _ in SECTIONS}
    others = sorted(p.name for p in directory.glob("*.json") if p.stem not in known)
    if others:
        lines += ["", f"Also in {directory.name}/, not summarised here: {', '.join(others)}."]
    if missing:
        lines += ["", f"Not run for this report: {', '.join(missing)}."]
    if note:
        lines += ["", note]
    if chart:
        lines += ["", "![throughput over time](throughput.png)"]
    return "\n".join(lines) + "\n"


def draw(directory: Path, target: Path) -> bool:
    latency, scaling = load(directory, "latency"), load(directory, "scaling")
    if latency is None and scaling is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (latency, scaling) if p is not None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, data in zip(axes[:, 0], panels, strict=True):
        if data["bench"] == "latency":
            plot_rate(ax, data["timeline"], "bulk backlog draining")
            start, end = data["measured_window"]
            ax.axvspan(start, end, alpha=0.15, label="transactional latency measured")
            ax.set_title(f"{data['backlog']:,}-recipient backlog: delivered emails/s")
        else:
            for row in data["rows"]:
                plot_rate(ax, row["timeline"], f"{row['processes']} bulk process(es)")
            ax.set_title(f"{data['emails']:,} emails end to end: delivered emails/s")
        ax.set_xlabel("seconds")
        ax.set_ylabel("emails/s")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return True


def plot_rate(ax: Any, points: list[list[float]], label: str) -> None:
    """Emails/s between successive samples of a cumulative counter."""
    xs, ys = [], []
    for (t0, n0), (t1, n1) in itertools.pairwise(points):
        if t1 > t0:
            xs.append(t1)
            ys.append((n1 - n0) / (t1 - t0))
    ax.plot(xs, ys, label=label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--input", type=Path, default=OUTPUT, help="where the JSON files are")
    parser.add_argument("--out", type=Path, default=BENCH / "REPORT.md")
    parser.add_argument("--chart", type=Path, default=BENCH / "throughput.png")
    parser.add_argument("--note", default="", help="a paragraph about the run, e.g. its load")
    args = parser.parse_args(argv)
    drawn = draw(args.input, args.chart)
    text = report(args.input, drawn, args.note)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
