#!/usr/bin/env python3
"""Draws the plots of BENCHMARKS.md as SVG from the benchmarks' CSV figures (no plotting library
needed): docs/bench/handoff.csv -> docs/bench/handoff.svg, docs/bench/chat.csv -> docs/bench/chat.svg.

    python3 scripts/plot_benchmarks.py
"""
import csv
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench"
W, H, L, R, T, B = 640, 360, 70, 20, 40, 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def plot(title, xlabel, ylabel, xs, series, out, log_x=False):
    def fx(x):
        lo, hi = min(xs), max(xs)
        if log_x:
            lo, hi, x = math.log10(max(lo, 1)), math.log10(max(hi, 1)), math.log10(max(x, 1))
        return L + (W - L - R) * ((x - lo) / (hi - lo) if hi > lo else 0.5)

    top = max(v for _, ys in series for v in ys) * 1.1
    def fy(y):
        return H - B - (H - T - B) * (y / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W/2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
             f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">{xlabel}</text>',
             f'<text x="16" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 16 {(T+H-B)/2})">{ylabel}</text>']
    for i in range(5):
        y = top * i / 4
        parts.append(f'<text x="{L-6}" y="{fy(y)+4}" text-anchor="end">{y:.1f}</text>')
        parts.append(f'<line x1="{L}" y1="{fy(y)}" x2="{W-R}" y2="{fy(y)}" stroke="#ddd"/>')
    for x in xs:
        parts.append(f'<text x="{fx(x)}" y="{H-B+16}" text-anchor="middle">{x:,}</text>')
    for n, (name, ys) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        points = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            parts.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{L+10}" y="{T+14+16*n}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    (ROOT / out).write_text("\n".join(parts) + "\n")
    print("wrote", ROOT / out)


def read(name):
    with open(ROOT / name) as f:
        return list(csv.DictReader(f))


rows = read("handoff.csv")
plot("Handoff latency (release -> next grant), p50", "requests queued", "ms",
     [int(r["queued"]) for r in rows],
     [("coordinator, Postgres commit", [float(r["coordinator_p50_ms"]) for r in rows]),
      ("coordinator, Postgres written behind", [float(r["behind_p50_ms"]) for r in rows]),
      ("pg_advisory_lock", [float(r["advisory_p50_ms"]) for r in rows])],
     "handoff.svg")
rows = read("chat.csv")
plot("Chat time-to-GPU under background load (50 ms chunks)", "background workers", "ms",
     [int(r["workers"]) for r in rows],
     [("coordinator p50", [float(r["coordinator_p50_ms"]) for r in rows]),
      ("coordinator p99", [float(r["coordinator_p99_ms"]) for r in rows]),
      ("FIFO lock (pg_advisory_lock) p50", [float(r["fifo_p50_ms"]) for r in rows]),
      ("FIFO lock p99", [float(r["fifo_p99_ms"]) for r in rows])],
     "chat.svg")
