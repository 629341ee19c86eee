"""Small server-side SVG charts drawn from stored numbers: no JavaScript, no CDN, no plotting
library in the request path. Every function returns markup that is safe to embed (all text is
escaped here), so templates mark it ``|safe``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.2f}"


TICKS = 4


def _nice_range(lo: float, hi: float, ticks: int = TICKS) -> tuple[float, float, float]:
    """Widen [lo, hi] to multiples of a 1/2/2.5/5×10ⁿ step so gridlines land on round numbers;
    returns (lo, hi, step) with at most about ``ticks`` intervals."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0, 0.25
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def _frame(width: int, height: int, title: str, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(label)}" '
        f'class="chart">'
        f'<title>{escape(title)}</title>'
        f'<text x="8" y="14" {FONT} font-weight="600">{escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _tick(v: float, step: float) -> str:
    """A gridline label with as many decimals as the step needs (0.005 steps: 3), no more."""
    digits = max(0, math.ceil(-math.log10(step) - 1e-9))
    if abs(step * 10**digits - round(step * 10**digits)) > 1e-9:
        digits += 1
    return f"{v:.{digits}f}" if abs(v) > step * 1e-6 else "0"


def _axes(x0: int, y0: int, x1: int, y1: int, lo: float, hi: float, step: float) -> list[str]:
    """Left axis with a labelled gridline every ``step`` from ``lo`` (bottom) to ``hi`` (top)."""
    out = [f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#999"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#999"/>']
    n = max(1, round((hi - lo) / step))
    for i in range(n + 1):
        v = lo + step * i
        y = y1 - (y1 - y0) * i / n
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end" {FONT}>{_tick(v, step)}</text>'
        )
    return out


def _legend(names: Sequence[str], x: int, y: int) -> list[str]:
    out = []
    xx = float(x)
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<rect x="{xx:.0f}" y="{y - 8}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{xx + 14:.0f}" y="{y + 1}" {FONT}>{escape(name)}</text>')
        xx += max(60.0, 6.2 * len(name) + 28)  # ~6 px per character at 11 px
    return out


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    width: int = 420,
    height: int = 200,
    x_label: str = "",
    max_markers: int = 40,
) -> str:
    """One polyline per named series of (x, y) points; empty series are skipped. Points get a
    hoverable marker while a series has at most ``max_markers`` of them (a long run is a line)."""
    data = {k: [(float(x), float(y)) for x, y in v if math.isfinite(float(y))]
            for k, v in series.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return _frame(width, height, title, [f'<text x="8" y="40" {FONT}>no data</text>'], title)
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    xlo, xhi = min(xs), max(xs)
    if xlo == xhi:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi, step = _nice_range(min(ys), max(ys))
    x0, y0, x1, y1 = 48, 24, width - 10, height - 36
    body = _axes(x0, y0, x1, y1, ylo, yhi, step)

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for i, (name, pts) in enumerate(data.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        body.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{escape(name)}</title></polyline>"
        )
        for x, y in (pts if len(pts) <= max_markers else []):
            body.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(name)} @ {_fmt(x)}: {_fmt(y)}</title></circle>"
            )
    def tick(x: float) -> str:
        return str(int(x)) if x.is_integer() else _fmt(x)

    body.append(f'<text x="{x0}" y="{height - 22}" {FONT}>{tick(xlo)}</text>')
    body.append(f'<text x="{x1}" y="{height - 22}" text-anchor="end" {FONT}>{tick(xhi)}</text>')
    if x_label:
        body.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{height - 22}" text-anchor="middle" '
                    f'{FONT} fill="#666">{escape(x_label)}</text>')
    body += _legend(list(data), x0, height - 6)
    return _frame(width, height, title, body, title)


def bar_chart(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    width: int = 420,
    height: int = 200,
) -> str:
    """Grouped bars: one group per category, one bar per named series."""
    names = list(series)
    values = [float(v) for vs in series.values() for v in vs]
    if not categories or not values:
        return _frame(width, height, title, [f'<text x="8" y="40" {FONT}>no data</text>'], title)
    lo, hi, step = _nice_range(min(0.0, *values), max(0.0, *values))
    x0, y0, x1, y1 = 48, 24, width - 10, height - 36
    body = _axes(x0, y0, x1, y1, lo, hi, step)
    group_w = (x1 - x0) / len(categories)
    bar_w = group_w * 0.8 / max(1, len(names))

    def py(y: float) -> float:
        return y1 - (y - lo) / (hi - lo) * (y1 - y0)

    for c, cat in enumerate(categories):
        gx = x0 + c * group_w + group_w * 0.1
        for s, name in enumerate(names):
            vals = series[name]
            if c >= len(vals):
                continue
            v = float(vals[c])
            top, base = py(max(v, 0.0)), py(min(v, 0.0))
            body.append(
                f'<rect x="{gx + s * bar_w:.1f}" y="{top:.1f}" width="{bar_w - 1:.1f}" '
                f'height="{max(0.5, base - top):.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                f"<title>{escape(name)} · {escape(cat)}: {_fmt(v)}</title></rect>"
            )
        body.append(
            f'<text x="{gx + group_w * 0.4:.1f}" y="{y1 + 12}" text-anchor="middle" {FONT}>'
            f"{escape(cat)}</text>"
        )
    body += _legend(names, x0, height - 6)
    return _frame(width, height, title, body, title)


def interval_chart(
    metrics: Sequence[str],
    series: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    title: str,
    width: int = 420,
    height: int = 200,
) -> str:
    """Point estimates with CI whiskers: ``series[name][metric] = {value, ci_low, ci_high}``."""
    names = list(series)
    rows = [m for m in metrics if any(m in series[n] for n in names)]
    vals = [float(series[n][m][k]) for n in names for m in rows if m in series[n]
            for k in ("value", "ci_low", "ci_high")
            if series[n][m].get(k) is not None and math.isfinite(float(series[n][m][k]))]
    if not rows or not vals:
        return _frame(width, height, title, [f'<text x="8" y="40" {FONT}>no data</text>'], title)
    lo, hi, step = _nice_range(min(min(vals), 0.0), max(vals))
    x0, y0, x1, y1 = 48, 24, width - 10, height - 36
    body = _axes(x0, y0, x1, y1, lo, hi, step)
    group_w = (x1 - x0) / len(rows)

    def py(y: float) -> float:
        return y1 - (y - lo) / (hi - lo) * (y1 - y0)

    for r, metric in enumerate(rows):
        for s, name in enumerate(names):
            m = series[name].get(metric)
            if not m:
                continue
            color = PALETTE[s % len(PALETTE)]
            x = x0 + r * group_w + group_w * (s + 1) / (len(names) + 1)
            v = float(m["value"])
            low = float(m.get("ci_low", v))
            high = float(m.get("ci_high", v))
            body.append(
                f'<line x1="{x:.1f}" y1="{py(low):.1f}" x2="{x:.1f}" y2="{py(high):.1f}" '
                f'stroke="{color}" stroke-width="2"/>'
            )
            body.append(
                f'<circle cx="{x:.1f}" cy="{py(v):.1f}" r="4" fill="{color}">'
                f"<title>{escape(name)} {escape(metric)}: {_fmt(v)} "
                f"[{_fmt(low)}, {_fmt(high)}]</title></circle>"
            )
        body.append(
            f'<text x="{x0 + r * group_w + group_w / 2:.1f}" y="{y1 + 12}" '
            f'text-anchor="middle" {FONT}>{escape(metric)}</text>'
        )
    body += _legend(names, x0, height - 6)
    return _frame(width, height, title, body, title)
