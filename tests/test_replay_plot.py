"""The replay plot page (``replay_plot``): self-contained HTML with inline SVG, downsampled lines,
exact tier bands, input validation and an atomic write; one test opens it in headless Chromium."""

from __future__ import annotations

import itertools
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium.webdriver.common.by import By

from market import replay_plot
from market.replay_plot import MAX_POINTS, TIER_COLOURS, downsample_indices, render_html, write_plot

T0 = 1_767_225_600
STRATEGIES = ("regime_aware", "symmetric", "buy_and_hold")


def make_series(n: int = 600, *, seed: int = 3) -> dict[str, Any]:
    """``n`` one-minute samples: random-walk equities and price, tiers 0 → 1 → 2 → 0 → 1."""
    rng = np.random.default_rng(seed)
    price = 0.1 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    tier = np.zeros(n, dtype=int)
    tier[n // 5 : 2 * n // 5] = 1
    tier[2 * n // 5 : n // 2] = 2
    tier[4 * n // 5 :] = 1
    equity = {k: (1000 + np.cumsum(rng.normal(0, 0.3, n))).tolist() for k in STRATEGIES[:2]}
    equity["buy_and_hold"] = (1000 * price / price[0]).tolist()
    return {
        "title": "XDGUSD replay",
        "t": [T0 + 60 * i for i in range(n)],
        "price": price.tolist(),
        "tier": tier.tolist(),
        "equity": equity,
        "summary": {
            k: {"net_pnl_usd": v[-1] - 1000, "max_drawdown_pct": 2.5, "cycles": 40, "fees_usd": 3.2}
            for k, v in equity.items()
        },
    }


def svg_of(page: str) -> ET.Element:
    match = re.search(r"<svg\b.*?</svg>", page, re.S)
    assert match, "no inline SVG in the page"
    return ET.fromstring(match.group(0))


def polyline_points(line: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def tier_rects(svg: ET.Element) -> list[ET.Element]:
    return [r for r in svg.iter("rect") if "tier" in (r.get("class") or "").split()]


# ---------------------------------------------------------------- the page


def test_page_is_self_contained():
    page = render_html(make_series())
    assert page.startswith("<!doctype html>")
    lowered = page.lower()
    for external in ("http://", "https://", "src=", "<script", "<link", "@import", "url("):
        assert external not in lowered, external


def test_svg_parses_and_has_one_polyline_per_strategy():
    svg = svg_of(render_html(make_series()))
    assert svg.tag == "svg"
    equity = [p for p in svg.iter("polyline") if p.get("class") == "equity"]
    assert [p.get("data-strategy") for p in equity] == list(STRATEGIES)
    assert len({p.get("stroke") for p in equity}) == 3
    assert len([p for p in svg.iter("polyline") if p.get("class") == "price"]) == 1
    assert all(len(polyline_points(p)) == 600 for p in equity)  # short series: every point drawn


def test_axes_have_ticks_and_utc_dates():
    svg = svg_of(render_html(make_series(3 * 1440)))
    y_labels = [t.text for g in svg.iter("g") if "equity-axis" in (g.get("class") or "") for t in g.iter("text")]
    assert len(y_labels) >= 3 and all(re.fullmatch(r"−?[\d,]+(\.\d+)?", s) for s in y_labels)
    x_labels = [t.text for g in svg.iter("g") if g.get("class") == "x-axis" for t in g.iter("text")]
    assert "01-01 12:00" in x_labels and "01-02 00:00" in x_labels and "time (UTC)" in x_labels


def test_summary_table_lists_the_three_strategies():
    series = make_series()
    series["summary"]["symmetric"]["net_pnl_usd"] = -12.345
    page = render_html(series)
    rows = re.findall(r'<tr data-strategy="(\w+)">(.*?)</tr>', page, re.S)
    assert [k for k, _ in rows] == list(STRATEGIES)
    symmetric = dict(rows)["symmetric"]
    assert "−12.35" in symmetric and "2.50%" in symmetric and ">40<" in symmetric and "3.20" in symmetric


def test_title_is_escaped():
    series = make_series()
    series["title"] = '<script>alert("x")</script> & co'
    page = render_html(series)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    svg_of(page)  # still well-formed


# ---------------------------------------------------------------- downsampling


def test_long_series_is_downsampled_and_keeps_spikes():
    n = 60_000
    series = make_series(n)
    eq = series["equity"]["regime_aware"]
    eq[33_333] = 5000.0  # a one-sample spike up
    eq[44_444] = -2000.0  # and one down
    svg = svg_of(render_html(series))
    line = next(p for p in svg.iter("polyline") if p.get("data-strategy") == "regime_aware")
    pts = polyline_points(line)
    assert len(pts) <= MAX_POINTS
    assert [x for x, _ in pts] == sorted(x for x, _ in pts)
    # The plot's x span, read from the tier bands: the spikes sit where their times say.
    rects = tier_rects(svg)
    left = float(rects[0].get("x"))
    right = float(rects[-1].get("x")) + float(rects[-1].get("width"))
    top = min(pts, key=lambda p: p[1])
    bottom = max(pts, key=lambda p: p[1])
    assert top[0] == pytest.approx(left + (right - left) * 33_333 / (n - 1), abs=0.02)
    assert bottom[0] == pytest.approx(left + (right - left) * 44_444 / (n - 1), abs=0.02)
    others = sorted(y for _, y in pts)
    assert others[1] - others[0] > 50 and others[-1] - others[-2] > 50  # real outliers, drawn as such


def test_downsample_indices_keep_every_window_extreme():
    rng = np.random.default_rng(0)
    v = rng.normal(size=10_000)
    idx = downsample_indices(v, 200)
    assert len(idx) <= 200
    assert idx[0] == 0 and idx[-1] == len(v) - 1
    assert np.all(np.diff(idx) > 0)
    assert v.argmin() in idx and v.argmax() in idx
    edges = np.linspace(0, len(v), (200 - 2) // 2 + 1).astype(int)
    for lo, hi in itertools.pairwise(edges):
        assert lo + v[lo:hi].argmin() in idx and lo + v[lo:hi].argmax() in idx
    assert list(downsample_indices([1.0, 2.0, 3.0], 200)) == [0, 1, 2]


# ---------------------------------------------------------------- tier bands


def test_tier_bands_cover_the_whole_span_exactly():
    series = make_series(600)
    svg = svg_of(render_html(series))
    rects = tier_rects(svg)
    assert [int(r.get("data-tier")) for r in rects] == [0, 1, 2, 0, 1]
    assert [r.get("fill") for r in rects] == [TIER_COLOURS[int(r.get("data-tier"))] for r in rects]
    assert len(set(TIER_COLOURS.values())) == 3
    # Times: the first band starts at t[0], each ends where the next starts, the last ends at t[-1].
    assert float(rects[0].get("data-start")) == series["t"][0]
    assert float(rects[-1].get("data-end")) == series["t"][-1]
    for a, b in itertools.pairwise(rects):
        assert a.get("data-end") == b.get("data-start")
        assert float(a.get("x")) + float(a.get("width")) == pytest.approx(float(b.get("x")), abs=1e-6)
    assert float(rects[1].get("data-start")) == series["t"][120]  # tier 1 from sample n/5 on
    frame = next(r for r in svg.iter("rect") if r.get("fill") == "none")
    span = float(rects[-1].get("x")) + float(rects[-1].get("width")) - float(rects[0].get("x"))
    assert span == pytest.approx(float(frame.get("width")), abs=0.02)
    legend = {int(r.get("data-tier")): r.get("fill") for r in svg.iter("rect") if r.get("class") == "tier-key"}
    assert legend == TIER_COLOURS


def test_tier_bands_are_not_downsampled():
    n = 60_000
    series = make_series(n)
    tier = np.zeros(n, dtype=int)
    tier[1::2000] = 2  # 30 one-sample excursions: each one is its own band
    series["tier"] = tier.tolist()
    rects = tier_rects(svg_of(render_html(series)))
    assert len(rects) == 61
    assert sum(r.get("data-tier") == "2" for r in rects) == 30


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["price"].pop(), "price has 599 values but t has 600"),
        (lambda s: s["equity"]["symmetric"].append(1.0), "equity.symmetric has 601 values"),
        (lambda s: s.update(t=[], price=[], tier=[]), "t is empty"),
        (lambda s: s["equity"].update(regime_aware=[]), "equity.regime_aware is empty"),
        (lambda s: s["equity"]["regime_aware"].__setitem__(5, math.nan), "equity.regime_aware[5] is nan"),
        (lambda s: s["price"].__setitem__(7, math.inf), "price[7] is inf"),
        (lambda s: s["t"].__setitem__(3, s["t"][2]), "t must be strictly increasing"),
        (lambda s: s["tier"].__setitem__(9, 3), "tier must be 0, 1 or 2: tier[9]=3"),
        (lambda s: s["equity"].pop("symmetric"), "missing symmetric"),
        (lambda s: s["summary"]["buy_and_hold"].update(fees_usd=math.nan), "summary.buy_and_hold.fees_usd"),
        (lambda s: s.pop("summary"), "series is missing summary"),
        (lambda s: s.update(price="0.1"), "price must be a sequence of numbers"),
    ],
)
def test_bad_input_is_a_clear_value_error(edit, message):
    series = make_series()
    edit(series)
    with pytest.raises(ValueError, match=re.escape(message)):
        render_html(series)


# ---------------------------------------------------------------- writing


def test_write_is_atomic_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "report.plot.html"
    assert write_plot(str(target), make_series()) == target
    first = target.read_text(encoding="utf-8")
    svg_of(first)
    assert os.listdir(tmp_path) == [target.name]

    # Bad input: nothing is written, the old plot stays.
    bad = make_series()
    bad["price"][0] = math.nan
    with pytest.raises(ValueError):
        write_plot(target, bad)
    assert target.read_text(encoding="utf-8") == first

    # A failure at the rename leaves the old plot whole and no temp file behind.
    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(replay_plot.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_plot(target, make_series(seed=9))
    assert target.read_text(encoding="utf-8") == first
    assert os.listdir(tmp_path) == [target.name]
    monkeypatch.undo()

    write_plot(target, make_series(seed=9))
    assert target.read_text(encoding="utf-8") != first


@pytest.mark.browser
def test_written_plot_renders_in_chromium(driver, tmp_path: Path):
    target = write_plot(tmp_path / "plot.html", make_series(5000))
    driver.get(target.as_uri())
    svg = driver.find_element(By.CSS_SELECTOR, "svg")
    size = svg.size
    assert size["width"] > 300 and size["height"] > 150
    for line in driver.find_elements(By.CSS_SELECTOR, "polyline.equity"):
        box = driver.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height];", line)
        assert box[0] > 0 and box[1] > 0
    assert len(driver.find_elements(By.CSS_SELECTOR, "rect.tier")) == 5
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
