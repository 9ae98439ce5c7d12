"""Small dependency-free SVG charts for reports (learning curves, benchmark sweeps).

Written by hand rather than with matplotlib so that every install can draw them:
the output is a standalone SVG file that browsers, GitHub and editors display.
"""

from __future__ import annotations

import math
from typing import Sequence
from xml.sax.saxutils import escape

__all__ = ["line_chart_svg", "nice_ticks"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About `target` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: bounds must be finite, got {lo}, {hi}")
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(target - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def line_chart_svg(series: dict[str, Sequence[tuple[float, float]]], *, title: str, x_label: str,
                   y_label: str, points: dict[str, tuple[float, float]] | None = None,
                   width: int = 640, height: int = 400) -> str:
    """An SVG line chart: one polyline per entry of `series` ({name: [(x, y), ...]}),
    plus labelled markers (`points`, {name: (x, y)}), axes with round ticks, a legend.
    Non-finite values are skipped."""
    points = points or {}
    clean = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in series.items()}
    all_xy = [p for pts in clean.values() for p in pts] + [
        p for p in points.values() if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not all_xy:
        raise ValueError("line_chart_svg: nothing to draw (no finite points)")
    xs, ys = [p[0] for p in all_xy], [p[1] for p in all_xy]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    left, right, top, bottom = 70, 20, 40, 55
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def sy(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for v in xt:  # vertical grid lines and x tick labels
        out.append(f'<line x1="{sx(v):.1f}" y1="{top}" x2="{sx(v):.1f}" y2="{top + ph}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt(v)}</text>')
    for v in yt:
        out.append(f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + pw}" y2="{sy(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2})">{escape(y_label)}</text>')
    legend = []
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        if pts:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend.append((name, color, "line"))
    for i, (name, (x, y)) in enumerate(points.items()):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}" stroke="black"/>')
        legend.append((f"{name}: {y:.3f}", color, "dot"))
    for i, (name, color, kind) in enumerate(legend):  # legend, top right inside the plot
        y = top + 14 + 16 * i
        x = left + pw - 170
        if kind == "line":
            out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>')
        else:
            out.append(f'<circle cx="{x + 9}" cy="{y - 4}" r="4" fill="{color}" stroke="black"/>')
        out.append(f'<text x="{x + 24}" y="{y}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
