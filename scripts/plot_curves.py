#!/usr/bin/env python3
"""Turns target/bench/curves.jsonl (scripts/bench-curves.sh) into one SVG per curve
(breakwater's acked events/s, labelled with its share of the reference server, and
its p99, against the curve's variable) and prints a Markdown table per curve.

Usage: plot_curves.py CURVES.jsonl OUT_DIR
"""

import json
import sys
from collections import OrderedDict
from pathlib import Path

TITLES = {
    "batch": "events per request (32 connections)",
    "connections": "connections (100 events per request)",
    "size": "event size in bytes (32 connections, 50 events per request)",
    "transport": "transport (32 connections, 100 events per request)",
    "sink": "sinks (32 connections, 100 events per request)",
}

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 70, 40, 50


def nice_max(value):
    """The smallest 1, 2 or 5 × 10^k at or above value."""
    if value <= 0:
        return 1
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def svg_for(curve, points):
    labels = [p["label"] for p in points]
    ours = [p["acked_events_per_second"] for p in points]
    reference = [p.get("reference", {}).get("acked_events_per_second", 0) for p in points]
    p99 = [p["latency_ms"]["p99"] for p in points]
    rate_max = nice_max(max(ours) * 1.15)
    p99_max = nice_max(max(p99))
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM

    def x(i):
        return LEFT + (plot_w * (i + 0.5) / len(points))

    def y_rate(v):
        return TOP + plot_h * (1 - v / rate_max)

    def y_p99(v):
        return TOP + plot_h * (1 - v / p99_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">breakwater vs {TITLES.get(curve, curve)}</text>',
    ]
    for k in range(6):
        value = rate_max * k / 5
        yy = y_rate(value)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{yy}" y2="{yy}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{yy + 4}" text-anchor="end">{value / 1000:.0f}k</text>')
        out.append(f'<text x="{WIDTH - RIGHT + 6}" y="{yy + 4}" fill="#c0392b">{p99_max * k / 5:g} ms</text>')
    out.append(f'<text x="16" y="{TOP + plot_h / 2}" transform="rotate(-90 16 {TOP + plot_h / 2})" text-anchor="middle">acked events/s</text>')
    out.append(f'<text x="{WIDTH - 14}" y="{TOP + plot_h / 2}" transform="rotate(90 {WIDTH - 14} {TOP + plot_h / 2})" text-anchor="middle" fill="#c0392b">p99 latency</text>')
    for i, label in enumerate(labels):
        out.append(f'<text x="{x(i)}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{label}</text>')

    def line(values, scale, colour, dash=""):
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(i):.1f},{scale(v):.1f}" for i, v in enumerate(values))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        for i, v in enumerate(values):
            out.append(f'<circle cx="{x(i):.1f}" cy="{scale(v):.1f}" r="3" fill="{colour}"/>')

    line(ours, y_rate, "#2c7fb8")
    # The reference server is an order of magnitude faster: shown as a share, not a line.
    for i, (v, ref) in enumerate(zip(ours, reference)):
        if ref:
            out.append(f'<text x="{x(i):.1f}" y="{y_rate(v) - 9:.1f}" text-anchor="middle" fill="#2c7fb8">{v / 1000:.0f}k ({100 * v / ref:.0f} %)</text>')
    line(p99, y_p99, "#c0392b")
    legend_y = HEIGHT - 12
    out.append(f'<text x="{LEFT}" y="{legend_y}" fill="#2c7fb8">— breakwater events/s</text>')
    out.append(f'<text x="{LEFT + 170}" y="{legend_y}" fill="#7f8c8d">(%: share of the reference server in the same run)</text>')
    out.append(f'<text x="{LEFT + 480}" y="{legend_y}" fill="#c0392b">— breakwater p99</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def table(curve, points):
    rows = [
        f"**{TITLES.get(curve, curve)}**",
        "",
        "| point | acked events/s | p50 ms | p99 ms | p99.9 ms | reference events/s | share of reference "
        "| server CPU-µs per event | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        ref = p.get("reference", {}).get("acked_events_per_second")
        share = f"{100 * p['acked_events_per_second'] / ref:.0f} %" if ref else "—"
        ref_text = f"{ref:,.0f}" if ref else "—"
        lat = p["latency_ms"]
        cpu = p.get("cpu", {}).get("breakwater", {}).get("cpu_us_per_acked_event")
        cpu_text = f"{cpu:.2f}" if cpu is not None else "—"
        rows.append(
            f"| {p['label']} | {p['acked_events_per_second']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
            f"{lat['p999']:.2f} | {ref_text} | {share} | {cpu_text} | {p['non_200'] or '—'} |"
        )
    return "\n".join(rows)


def main():
    source, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = OrderedDict()
    for line in source.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            curves.setdefault(point["curve"], []).append(point)
    for curve, points in curves.items():
        (out_dir / f"curve-{curve}.svg").write_text(svg_for(curve, points))
        print(table(curve, points))
        print()


if __name__ == "__main__":
    main()
