"""The replay plot: equity curves and tiers over time as one self-contained HTML page.

``--replay FILE.csv`` writes its JSON report and, beside it, this page: inline SVG
and a little CSS, no scripts and no external URLs, so it opens offline. The top
panel draws the equity of the three strategies, a thin panel the price, and a
strip the regime-aware grid's tier over time; a table sums the strategies up.

:func:`render_html` is a pure function of the series; :func:`write_plot` writes it
atomically. Long runs are downsampled per line to at most :data:`MAX_POINTS`
points, keeping each window's minimum and maximum so spikes survive; the tier
strip is never downsampled, so its bands cover exactly the time each tier held.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

MAX_POINTS = 1500
"""Most points drawn per line (first and last point included)."""

STRATEGIES: tuple[tuple[str, str, str], ...] = (
    # key, label, colour
    ("regime_aware", "regime-aware grid", "#2f6aa8"),
    ("symmetric", "symmetric grid", "#e0661c"),
    ("buy_and_hold", "buy and hold", "#6a7683"),
)
TIERS: tuple[tuple[int, str, str], ...] = (
    (0, "tier 0 · symmetric", "#d3d9e0"),
    (1, "tier 1 · skewed", "#e2b325"),
    (2, "tier 2 · one side suppressed", "#c8453f"),
)
TIER_COLOURS = {tier: colour for tier, _, colour in TIERS}
SUMMARY_FIELDS = ("net_pnl_usd", "max_drawdown_pct", "cycles", "fees_usd")

# SVG geometry (user units; the SVG scales to the page width).
WIDTH = 1000
LEFT, RIGHT = 78, 18
EQUITY_TOP, EQUITY_HEIGHT = 34, 280
PRICE_TOP, PRICE_HEIGHT = 340, 90
TIER_TOP, TIER_HEIGHT = 452, 30
AXIS_Y = TIER_TOP + TIER_HEIGHT + 18
HEIGHT = AXIS_Y + 40
PLOT_WIDTH = WIDTH - LEFT - RIGHT

TIME_STEPS = (
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    2 * 3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86400,
    2 * 86400,
    7 * 86400,
    14 * 86400,
    30 * 86400,
    91 * 86400,
    182 * 86400,
    365 * 86400,
)


# ---------------------------------------------------------------- public API


def render_html(series: Mapping[str, Any]) -> str:
    """The plot page for ``series``.

    Parameters
    ----------
    series
        ``title`` (str); ``t`` (unix seconds, strictly increasing, shape (n,));
        ``price`` (n,); ``tier`` (n,) of 0, 1 or 2; ``equity`` mapping each of
        ``regime_aware``, ``symmetric`` and ``buy_and_hold`` to (n,) values in the
        quote currency; ``summary`` mapping the same keys to ``net_pnl_usd``,
        ``max_drawdown_pct``, ``cycles`` and ``fees_usd``. Optional ``quote``
        names the quote currency (default ``USD``).

    Raises
    ------
    ValueError
        Missing keys, empty or too short arrays, mismatched lengths, times not
        increasing, tiers other than 0/1/2, or a value that is not a finite number.
    """
    data = _validated(series)
    return _page(data)


def write_plot(path: str | Path, series: Mapping[str, Any]) -> Path:
    """Render ``series`` and write it to ``path`` atomically (temp file + ``os.replace``).

    Bad input raises ``ValueError`` before anything is written; an existing file
    at ``path`` is replaced only by a complete page.
    """
    path = Path(path)
    page = render_html(series)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def downsample_indices(values: Sequence[float] | np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices of the points to draw from ``values``, ascending, at most ``max_points`` of them.

    The series is cut into equal windows; each keeps its minimum and maximum (in
    their order), and the first and last points are always kept, so every spike
    and the overall range survive.
    """
    v = np.asarray(values, dtype=float)
    n = len(v)
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    windows = (max_points - 2) // 2
    edges = np.linspace(0, n, windows + 1).astype(int)
    keep = [0, n - 1]
    for lo, hi in pairwise(edges):
        if hi > lo:
            chunk = v[lo:hi]
            keep.append(lo + int(np.argmin(chunk)))
            keep.append(lo + int(np.argmax(chunk)))
    return np.unique(np.asarray(keep))


# ---------------------------------------------------------------- validation


def _validated(series: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(series, Mapping):
        raise ValueError(f"series must be a mapping, got {type(series).__name__}")
    missing = [k for k in ("t", "price", "tier", "equity", "summary") if k not in series]
    if missing:
        raise ValueError(f"series is missing {', '.join(missing)}")
    title = series.get("title", "Replay")
    if not isinstance(title, str):
        raise ValueError(f"title must be a string, got {type(title).__name__}")
    quote = series.get("quote", "USD")
    if not isinstance(quote, str) or not quote:
        raise ValueError("quote must be a non-empty string")

    t = _array("t", series["t"])
    n = len(t)
    if n < 2:
        raise ValueError(f"t has {n} point(s): the plot needs at least two")
    if np.any(np.diff(t) <= 0):
        i = int(np.flatnonzero(np.diff(t) <= 0)[0])
        raise ValueError(f"t must be strictly increasing: t[{i}]={t[i]:.15g} is followed by t[{i + 1}]={t[i + 1]:.15g}")
    price = _array("price", series["price"], n)
    tier = _array("tier", series["tier"], n)
    bad = np.flatnonzero(~np.isin(tier, (0, 1, 2)))
    if bad.size:
        raise ValueError(f"tier must be 0, 1 or 2: tier[{int(bad[0])}]={tier[bad[0]]:g}")

    equity_in = series["equity"]
    summary_in = series["summary"]
    for name, block in (("equity", equity_in), ("summary", summary_in)):
        if not isinstance(block, Mapping):
            raise ValueError(f"{name} must be a mapping of strategy to values")
        keys = set(block)
        expected = {key for key, _, _ in STRATEGIES}
        if keys != expected:
            parts = []
            if expected - keys:
                parts.append("missing " + ", ".join(sorted(expected - keys)))
            if keys - expected:
                parts.append("unknown " + ", ".join(sorted(map(str, keys - expected))))
            raise ValueError(
                f"{name} must have exactly the strategies {', '.join(sorted(expected))}: {'; '.join(parts)}"
            )
    equity = {key: _array(f"equity.{key}", equity_in[key], n) for key, _, _ in STRATEGIES}
    summary = {key: _summary(key, summary_in[key]) for key, _, _ in STRATEGIES}
    return {
        "title": title,
        "quote": quote,
        "t": t,
        "price": price,
        "tier": tier.astype(int),
        "equity": equity,
        "summary": summary,
    }


def _array(name: str, values: Any, length: int | None = None) -> np.ndarray:
    if isinstance(values, (str, bytes, Mapping)) or values is None:
        raise ValueError(f"{name} must be a sequence of numbers")
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if length is not None and len(arr) != length:
        raise ValueError(f"{name} has {len(arr)} values but t has {length}: all arrays must be the same length")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is {arr[bad[0]]}: every value must be a finite number")
    return arr


def _summary(key: str, row: Any) -> dict[str, float]:
    if not isinstance(row, Mapping):
        raise ValueError(f"summary.{key} must be a mapping")
    out: dict[str, float] = {}
    for field in SUMMARY_FIELDS:
        value = row.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"summary.{key}.{field} must be a finite number, got {value!r}")
        out[field] = float(value)
    return out


# ---------------------------------------------------------------- drawing


def _page(d: dict[str, Any]) -> str:
    t = d["t"]
    title = html.escape(d["title"])
    period = f"{_stamp(t[0])} → {_stamp(t[-1])} UTC"
    n = len(t)
    drawn = min(n, MAX_POINTS)
    note = f"{n:,} samples" + (
        f", drawn with at most {drawn:,} points per line (window min/max kept)" if n > drawn else ""
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ margin: 0; padding: 16px; background: #f3f5f8; color: #1e2833;
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }}
  main {{ max-width: 1100px; margin: 0 auto; background: #fff; border: 1px solid #e2e7ed;
          border-radius: 10px; padding: 14px 16px; }}
  h1 {{ font-size: 18px; margin: 0 0 2px; }}
  .sub {{ color: #6a7683; margin: 0 0 10px; }}
  svg {{ display: block; width: 100%; height: auto; }}
  svg text {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }}
  table {{ border-collapse: collapse; margin-top: 14px; width: 100%; font-variant-numeric: tabular-nums; }}
  th, td {{ padding: 5px 10px 5px 0; text-align: right; border-top: 1px solid #e2e7ed; }}
  th:first-child, td:first-child {{ text-align: left; }}
  thead th {{ color: #6a7683; font-weight: 500; border-top: 0; }}
  .sw {{ display: inline-block; width: 12px; height: 3px; margin-right: 6px; vertical-align: 3px; }}
  .pos {{ color: #2e9a56; }}
  .neg {{ color: #c8453f; }}
  .table-box {{ overflow-x: auto; }}
</style>
</head>
<body>
<main>
<h1>{title}</h1>
<p class="sub">{html.escape(period)} · {html.escape(note)}</p>
{_svg(d)}
<div class="table-box">{_summary_table(d)}</div>
</main>
</body>
</html>
"""


def _svg(d: dict[str, Any]) -> str:
    t, quote = d["t"], d["quote"]
    t0, t1 = float(t[0]), float(t[-1])

    def x(ts: float) -> float:
        return LEFT + (ts - t0) / (t1 - t0) * PLOT_WIDTH

    parts: list[str] = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="equity curves, price and tier over time">',
        f"<title>{html.escape(d['title'])}</title>",
    ]

    # Equity panel: grid lines and y ticks, then one polyline per strategy.
    all_equity = np.concatenate(list(d["equity"].values()))
    lo, hi = _padded_range(float(all_equity.min()), float(all_equity.max()))
    y_eq = _scale(lo, hi, EQUITY_TOP, EQUITY_HEIGHT)
    parts.extend(_y_axis("equity-axis", lo, hi, 6, y_eq, "#e2e7ed"))
    parts.append(
        f'<text x="14" y="{EQUITY_TOP + EQUITY_HEIGHT / 2:.0f}" font-size="11" fill="#6a7683" text-anchor="middle" '
        f'transform="rotate(-90 14 {EQUITY_TOP + EQUITY_HEIGHT / 2:.0f})">equity ({html.escape(quote)})</text>'
    )
    parts.append(_frame(EQUITY_TOP, EQUITY_HEIGHT))
    for key, label, colour in STRATEGIES:
        values = d["equity"][key]
        dash = ' stroke-dasharray="5 3"' if key == "buy_and_hold" else ""
        parts.append(
            f'<polyline class="equity" data-strategy="{key}" fill="none" stroke="{colour}" stroke-width="1.6" '
            f'stroke-linejoin="round"{dash} points="{_points(t, values, x, y_eq)}"><title>{label}</title></polyline>'
        )
    parts.append(_legend())

    # Price panel.
    plo, phi = _padded_range(float(d["price"].min()), float(d["price"].max()))
    y_px = _scale(plo, phi, PRICE_TOP, PRICE_HEIGHT)
    parts.extend(_y_axis("price-axis", plo, phi, 3, y_px, "#eef1f4"))
    parts.append(_frame(PRICE_TOP, PRICE_HEIGHT))
    parts.append(f'<text x="{LEFT + 4}" y="{PRICE_TOP - 4}" font-size="11" fill="#6a7683">price</text>')
    parts.append(
        f'<polyline class="price" fill="none" stroke="#1e2833" stroke-opacity=".6" stroke-width="1" '
        f'points="{_points(t, d["price"], x, y_px)}"><title>price</title></polyline>'
    )

    # Tier strip: one band per run of equal tier, from its first sample to the next run's.
    parts.append(f'<text x="{LEFT + 4}" y="{TIER_TOP - 4}" font-size="11" fill="#6a7683">regime-aware tier</text>')
    parts.append('<g class="tiers">')
    tier = d["tier"]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(tier)) + 1))
    ends = np.concatenate((starts[1:], [len(tier) - 1]))
    for s, e in zip(starts, ends, strict=True):
        ts, te = float(t[s]), float(t[e])
        xs, xe = round(x(ts), 2), round(x(te), 2)
        level = int(tier[s])
        parts.append(
            f'<rect class="tier tier-{level}" data-tier="{level}" data-start="{ts:.15g}" data-end="{te:.15g}" '
            f'x="{xs:.2f}" y="{TIER_TOP}" width="{xe - xs:.2f}" height="{TIER_HEIGHT}" '
            f'fill="{TIER_COLOURS[level]}"/>'
        )
    parts.append("</g>")
    parts.append(_frame(TIER_TOP, TIER_HEIGHT))
    parts.append(_tier_legend())

    # Time axis (UTC).
    parts.append('<g class="x-axis" font-size="11" fill="#6a7683" text-anchor="middle">')
    step, ticks = _time_ticks(t0, t1)
    fmt = "%Y-%m-%d" if step >= 86400 else "%m-%d %H:%M"
    for tick in ticks:
        xt = x(tick)
        parts.append(
            f'<line x1="{xt:.2f}" x2="{xt:.2f}" y1="{EQUITY_TOP}" y2="{TIER_TOP + TIER_HEIGHT + 4}" '
            f'stroke="#000" stroke-opacity=".06"/>'
        )
        label = datetime.fromtimestamp(tick, UTC).strftime(fmt)
        anchor = ' text-anchor="end"' if xt > WIDTH - RIGHT - 36 else ""  # keep the last label inside
        parts.append(f'<text x="{xt:.2f}" y="{AXIS_Y}"{anchor}>{label}</text>')
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{AXIS_Y + 18}" text-anchor="end">time (UTC)</text>')
    parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _y_axis(name: str, lo: float, hi: float, count: int, y_of: Callable[[float], float], grid: str) -> list[str]:
    """A panel's y ticks: a grid line and a label at each nice value in [lo, hi]."""
    out = [f'<g class="y-axis {name}" font-size="11" fill="#6a7683" text-anchor="end">']
    step, ticks = _nice_ticks(lo, hi, count)
    for tick in ticks:
        y = y_of(tick)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.2f}" y2="{y:.2f}" stroke="{grid}"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.2f}">{_tick_label(tick, step)}</text>')
    out.append("</g>")
    return out


def _frame(top: float, height: float) -> str:
    return f'<rect x="{LEFT}" y="{top}" width="{PLOT_WIDTH}" height="{height}" fill="none" stroke="#cfd6de"/>'


def _legend() -> str:
    items, xpos = [], LEFT
    for key, label, colour in STRATEGIES:
        dash = ' stroke-dasharray="5 3"' if key == "buy_and_hold" else ""
        items.append(
            f'<line x1="{xpos}" x2="{xpos + 22}" y1="14" y2="14" stroke="{colour}" stroke-width="2.5"{dash}/>'
            f'<text x="{xpos + 28}" y="18">{label}</text>'
        )
        xpos += 40 + 7 * len(label)
    return f'<g class="legend" font-size="12" fill="#1e2833">{"".join(items)}</g>'


def _tier_legend() -> str:
    items, xpos = [], LEFT
    y = TIER_TOP + TIER_HEIGHT + 36
    for level, label, colour in TIERS:
        items.append(
            f'<rect class="tier-key" data-tier="{level}" x="{xpos}" y="{y - 9}" width="12" height="10" '
            f'fill="{colour}"/>'
            f'<text x="{xpos + 17}" y="{y}">{label}</text>'
        )
        xpos += 40 + 6 * len(label)
    return f'<g class="tier-legend" data-tiers="0 1 2" font-size="11" fill="#1e2833">{"".join(items)}</g>'


def _summary_table(d: dict[str, Any]) -> str:
    quote = html.escape(d["quote"])
    head = (
        "<thead><tr><th>strategy</th><th>final equity</th>"
        f"<th>net P&amp;L ({quote})</th><th>max drawdown</th><th>cycles</th><th>fees ({quote})</th></tr></thead>"
    )
    rows = []
    for key, label, colour in STRATEGIES:
        s = d["summary"][key]
        net = s["net_pnl_usd"]
        cls = "pos" if net > 0 else "neg" if net < 0 else ""
        final = float(d["equity"][key][-1])
        rows.append(
            f'<tr data-strategy="{key}"><td><span class="sw" style="background:{colour}"></span>{label}</td>'
            f"<td>{final:,.2f}</td>"
            f'<td class="{cls}">{_signed(net)}</td>'
            f"<td>{s['max_drawdown_pct']:.2f}%</td>"
            f"<td>{round(s['cycles']):,}</td>"
            f"<td>{s['fees_usd']:,.2f}</td></tr>"
        )
    return f'<table class="summary">{head}<tbody>{"".join(rows)}</tbody></table>'


# ---------------------------------------------------------------- helpers


def _points(t: np.ndarray, values: np.ndarray, x, y) -> str:
    idx = downsample_indices(values)
    return " ".join(f"{x(float(t[i])):.2f},{y(float(values[i])):.2f}" for i in idx)


def _scale(lo: float, hi: float, top: float, height: float):
    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * height

    return y


def _padded_range(lo: float, hi: float) -> tuple[float, float]:
    span = hi - lo
    pad = span * 0.06 if span > 0 else max(abs(hi) * 0.01, 1e-9)
    return lo - pad, hi + pad


def _nice_step(lo: float, hi: float, target: int) -> float:
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (m * mag) <= target:
            return m * mag
    return 10 * mag


def _nice_ticks(lo: float, hi: float, target: int) -> tuple[float, list[float]]:
    """A round step and the ticks at its multiples within [lo, hi]."""
    step = _nice_step(lo, hi, target)
    first = math.ceil(lo / step)
    last = math.floor(hi / step)
    return step, [k * step for k in range(first, last + 1)]


def _tick_label(v: float, step: float) -> str:
    """``v`` with as many decimals as the tick step needs (a step of 0.0025 needs 4)."""
    decimals = next((d for d in range(12) if abs(round(step, d) - step) <= step * 1e-6), 12)
    v = round(v, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = f"{abs(v):,.{decimals}f}"
    return ("−" if v < 0 else "") + text


def _time_ticks(t0: float, t1: float) -> tuple[int, list[float]]:
    span = t1 - t0
    step = next((s for s in TIME_STEPS if span / s <= 8), TIME_STEPS[-1])
    first = math.ceil(t0 / step) * step
    ticks, k = [], 0
    while first + k * step <= t1:
        ticks.append(float(first + k * step))
        k += 1
    return step, ticks


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M")


def _signed(v: float) -> str:
    text = f"{abs(v):,.2f}"
    if text.strip("0.,") == "":
        return text
    return ("+" if v > 0 else "−") + text
