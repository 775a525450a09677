"""The dashboard's Grid card and trades-backfill progress (SPEC sections 8, 11, 12) in a real headless Chromium.

The ``grid`` and ``trades_backfill`` blocks follow the status contract of issue 4; each test edits
a copy of the real status from ``rich_status`` and loads it through the shared test site.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from dashboard_page import (
    assert_clean_console,
    by_testid,
    open_page,
    rect,
    rich_status,
    text_of,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.browser

BAD_RGB = "rgb(200, 69, 63)"  # --bad: the capacity-stop border and badge
HOSTILE = '<img src=x onerror="window.__xss = 1">'


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def order(now: float, i: int, **edits: Any) -> dict[str, Any]:
    o = {
        "id": f"g1-{20 - i}",
        "slot": i % 3,
        "leg": "AB"[i % 2],
        "role": "entry",
        "side": "sell" if i % 2 == 0 else "buy",
        "price": 0.10456,
        "volume": 190.0,
        "placed_at": now - 100 - 60 * i,
        "regime_at_entry": "RANGING",
        "recovery": False,
    }
    return {**o, **edits}


def grid_block(now: float) -> dict[str, Any]:
    """The ``grid`` block of the status contract, as in its example."""
    return {
        "exchange": "paper",
        "pair": "XDGUSD",
        "base_asset": "DOGE",
        "quote_asset": "USD",
        "posture": {
            "tier": 1,
            "direction": "long_bias",
            "source": "mechanical",
            "strength": 0.42,
            "suppressed_side": None,
            "since": now - 725,
        },
        "balances": {
            "quote": 512.31,
            "base": 4801.5,
            "quote_reserved": 40.0,
            "base_reserved": 120.0,
            "quote_free": 472.31,
            "base_free": 4681.5,
            "price": 0.1042,
            "equity_quote": 1012.63,
        },
        "pnl": {
            "start_equity_quote": 1000.0,
            "net_quote": 12.63,
            "realized_quote": 3.10,
            "fees_quote": 1.84,
            "cycles": 11,
            "max_drawdown_pct": 1.7,
        },
        "capacity": {"open_orders": 6, "max_open_orders": 20, "headroom": 14, "band": "normal"},
        "exposure": {"quote": 310.5, "cap_quote": 1000.0},
        "signals": {
            "fills_last_hour": 3,
            "recovery_orders": 1,
            "trend": {"state": "bullish", "since": now - 903, "ema_fast": 0.1043, "ema_slow": 0.1031},
            "kelly": {
                "RANGING": {
                    "samples": 25,
                    "win_rate": 0.84,
                    "avg_win_pct": 0.49,
                    "avg_loss_pct": 1.2,
                    "kelly_fraction": 0.43,
                },
                "BULLISH": None,
                "BEARISH": None,
            },
            "kelly_min_samples": 20,
        },
        "slots": [
            {"slot": 0, "A": "entry", "B": "exit"},
            {"slot": 1, "A": "exit", "B": "entry"},
            {"slot": 2, "A": "suppressed", "B": "idle"},
        ],
        "open_orders": [order(now, i, recovery=i == 4, role="exit" if i == 4 else "entry") for i in range(6)],
        "recent_fills": [
            {
                "ts": now - 40 - 60 * i,
                "id": f"g1-{15 - i}",
                "slot": 1,
                "leg": "B",
                "role": "entry",
                "side": "buy",
                "price": 0.1031,
                "volume": 193.9,
                "fee_quote": 0.05,
            }
            for i in range(3)
        ],
        "recent_cycles": [
            {
                "closed_at": now - 300,
                "slot": 1,
                "leg": "B",
                "entry_side": "buy",
                "entry_price": 0.1031,
                "exit_price": 0.10413,
                "volume": 193.9,
                "gross_quote": 0.2,
                "fees_quote": 0.1,
                "net_quote": 0.1,
                "regime_at_entry": "RANGING",
            },
            {
                "closed_at": now - 900,
                "slot": 0,
                "leg": "A",
                "entry_side": "sell",
                "entry_price": 0.1044,
                "exit_price": 0.10436,
                "volume": 190.0,
                "gross_quote": 0.0076,
                "fees_quote": 0.0116,
                "net_quote": -0.004,
                "regime_at_entry": "BULLISH",
            },
        ],
        "notes": [
            {"ts": now - 600, "kind": "reconciled", "message": "2 open orders reconciled at start"},
            {
                "ts": now - 20,
                "kind": "unfunded",
                "message": "slot 2 B buy entry not placed: needs 20.05 USD, 4.10 free",
            },
        ],
    }


def backfill_block(**edits: Any) -> dict[str, Any]:
    """The ``trades_backfill`` block, running, as in the contract's example."""
    b = {
        "enabled": True,
        "state": "running",
        "phase": "1m",
        "from_ts": 1766000000.0,
        "to_ts": 1767225600.0,
        "cursor_ts": 1766500000.0,
        "pct": 41.2,
        "requests": 120,
        "trades": 118000,
        "candles_written": {"1": 2500, "15": 170},
        "eta_sec": 95.0,
        "last_error": None,
        "last_error_at": None,
    }
    return {**b, **edits}


def grid_status(base: dict[str, Any], edit=None, *, backfill: dict[str, Any] | None = None) -> dict[str, Any]:
    """``rich_status(base)`` with a grid block (``edit(grid, now)`` may change it) and a backfill block."""
    s = rich_status(base)
    grid = grid_block(s["now"])
    if edit is not None:
        grid = edit(grid, s["now"]) or grid
    s["grid"] = grid
    s["trades_backfill"] = backfill_block() if backfill is None else backfill
    return s


def classes(driver: WebDriver, testid: str) -> list[str]:
    return by_testid(driver, testid).get_attribute("class").split()


def table_rows(driver: WebDriver, testid: str) -> list[list[str]]:
    box = by_testid(driver, testid)
    return [
        [c.text for c in r.find_elements(By.CSS_SELECTOR, "td")] for r in box.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


# ---------------------------------------------------------------- grid card


def test_posture_balances_and_pnl(driver, site, base_status):
    open_page(driver, site, grid_status(base_status))
    assert "grid-off" not in classes(driver, "grid-card")
    assert text_of(driver, "grid-sub") == "paper · XDGUSD · DOGE/USD"
    assert text_of(driver, "grid-posture-tier") == "Tier 1"
    assert text_of(driver, "grid-posture-direction") == "long_bias"
    assert text_of(driver, "grid-posture-source") == "mechanical"
    assert "strength 0.42" in text_of(driver, "grid-posture") and "for 12m 05s" in text_of(driver, "grid-posture")
    assert text_of(driver, "grid-suppressed") == "no side suppressed"
    balances = text_of(driver, "grid-balances")
    assert "free 472.31 · reserved 40.00" in balances and "free 4,681.5 · reserved 120" in balances
    assert text_of(driver, "grid-quote") == "512.31"
    assert text_of(driver, "grid-base") == "4,801.5"
    assert text_of(driver, "grid-price") == "0.10420"  # the pair's 5 decimals, learnt from the order prices
    assert text_of(driver, "grid-equity") == "1,012.63 USD"
    assert text_of(driver, "grid-pnl-net") == "+12.63 USD (+1.26%)"
    assert "pos" in classes(driver, "grid-pnl-net")
    assert text_of(driver, "grid-pnl-realized") == "+3.10 USD"
    assert text_of(driver, "grid-fees") == "1.84 USD"
    assert text_of(driver, "grid-cycles-count") == "11"
    assert text_of(driver, "grid-drawdown") == "1.70%"
    assert_clean_console(driver)


def test_losses_are_signed_and_red_and_ai_posture_is_marked(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> None:
        g["pnl"].update(net_quote=-5.5, realized_quote=-0.2)
        g["posture"].update(tier=2, source="ai_override", suppressed_side="buy")

    open_page(driver, site, grid_status(base_status, edit))
    assert text_of(driver, "grid-pnl-net") == "−5.50 USD (−0.55%)"
    assert "neg" in classes(driver, "grid-pnl-net")
    assert text_of(driver, "grid-pnl-realized") == "−0.20 USD"
    assert "neg" in classes(driver, "grid-pnl-realized")
    assert text_of(driver, "grid-posture-source") == "AI override"
    assert text_of(driver, "grid-suppressed") == "buy entries suppressed"


@pytest.mark.parametrize(
    ("band", "open_orders", "badge"),
    [("normal", 6, "capacity normal"), ("caution", 16, "capacity caution"), ("stop", 20, "CAPACITY STOP")],
)
def test_capacity_band_badge(driver, site, base_status, band, open_orders, badge):
    def edit(g: dict[str, Any], now: float) -> None:
        g["capacity"] = {"open_orders": open_orders, "max_open_orders": 20, "headroom": 20 - open_orders, "band": band}

    open_page(driver, site, grid_status(base_status, edit))
    assert text_of(driver, "grid-capacity-band") == badge
    assert f"cap-{band}" in classes(driver, "grid-capacity-band")
    assert by_testid(driver, "grid-card").get_attribute("data-band") == band
    assert text_of(driver, "grid-capacity") == f"{open_orders} / 20 open · headroom {20 - open_orders}"
    alert = by_testid(driver, "grid-alert")
    border = driver.execute_script(
        "return getComputedStyle(arguments[0]).borderTopColor", by_testid(driver, "grid-card")
    )
    if band == "stop":
        assert alert.is_displayed() and alert.text.startswith("Capacity STOP: 20 of 20 open orders, headroom 0")
        assert border == BAD_RGB
        badge_bg = driver.execute_script(
            "return getComputedStyle(arguments[0]).backgroundColor", by_testid(driver, "grid-capacity-band")
        )
        assert badge_bg == BAD_RGB
    else:
        assert not alert.is_displayed()
        assert border != BAD_RGB
    assert_clean_console(driver)


def test_exposure_against_its_cap(driver, site, base_status):
    open_page(driver, site, grid_status(base_status))
    assert text_of(driver, "grid-exposure") == "310.50 / 1,000.00 USD (31%)"


def test_signals_trend_and_kelly(driver, site, base_status):
    status = grid_status(base_status)
    open_page(driver, site, status)
    assert text_of(driver, "grid-fills-hour") == "3"
    assert text_of(driver, "grid-recovery") == "1"
    trend = text_of(driver, "grid-trend")
    assert trend.startswith(f"bullish since {clock(status['now'] - 903)} (15m 03s ago)")
    assert "EMA fast 0.10430 · slow 0.10310" in trend
    assert text_of(driver, "grid-kelly-RANGING") == "RANGING 0.43 · 25 samples · win 84% · avg +0.49% / −1.20%"
    assert text_of(driver, "grid-kelly-BULLISH") == "BULLISH — · needs 20 samples"
    assert text_of(driver, "grid-kelly-BEARISH") == "BEARISH — · needs 20 samples"


def test_trend_warming_up_and_kelly_without_a_minimum(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> None:
        g["signals"]["trend"] = {"state": "neutral", "since": None, "ema_fast": None, "ema_slow": None}
        g["signals"]["kelly"] = {"RANGING": None, "BULLISH": None, "BEARISH": None}
        del g["signals"]["kelly_min_samples"]

    open_page(driver, site, grid_status(base_status, edit))
    assert text_of(driver, "grid-trend") == "neutral warming up"
    assert text_of(driver, "grid-kelly-RANGING") == "RANGING — · needs more samples"
    assert text_of(driver, "render-error") == ""


def test_slots_show_both_legs_compactly(driver, site, base_status):
    open_page(driver, site, grid_status(base_status))
    chips = by_testid(driver, "grid-slots").find_elements(By.CSS_SELECTOR, '[data-testid="grid-slot"]')
    assert [c.text for c in chips] == ["#0 A entry B exit", "#1 A exit B entry", "#2 A suppressed B idle"]
    assert chips[2].find_elements(By.CSS_SELECTOR, ".leg-suppressed")
    assert rect(driver, chips[0])["height"] < 40  # one line each


def test_open_orders_table_newest_first_with_recovery_flag(driver, site, base_status):
    status = grid_status(base_status)
    status["grid"]["open_orders"][1]["open"] = False
    status["grid"]["open_orders"].reverse()  # the page orders them itself
    open_page(driver, site, status)
    rows = table_rows(driver, "grid-orders")
    assert len(rows) == 6
    assert rows[0] == ["#0 A", "sell", "entry", "0.10456", "190", "1m 40s", "RANGING", "", "g1-20"]
    assert rows[4][2] == "exit" and rows[4][7] == "recovery"
    assert rows[1][7] == "pending"  # open: false, from the engine: not on the book yet
    recovery = by_testid(driver, "grid-orders").find_elements(By.CSS_SELECTOR, "tbody tr")[4]
    assert "recovery" in recovery.get_attribute("class").split()
    assert [c.text for c in by_testid(driver, "grid-orders").find_elements(By.CSS_SELECTOR, "thead th")] == [
        "slot",
        "side",
        "role",
        "price",
        "volume",
        "age",
        "regime",
        "",
        "id",
    ]


def test_tables_show_at_most_what_the_status_promises(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> None:
        g["open_orders"] = [order(now, i) for i in range(45)]
        g["recent_fills"] = g["recent_fills"] * 8
        g["recent_cycles"] = g["recent_cycles"] * 6
        g["notes"] = g["notes"] * 6

    open_page(driver, site, grid_status(base_status, edit))
    assert len(table_rows(driver, "grid-orders")) == 40
    assert len(table_rows(driver, "grid-fills")) == 20
    assert len(table_rows(driver, "grid-cycles")) == 10
    assert len(by_testid(driver, "grid-notes").find_elements(By.CSS_SELECTOR, "li")) == 10


def test_recent_fills_and_cycles(driver, site, base_status):
    status = grid_status(base_status)
    open_page(driver, site, status)
    fills = table_rows(driver, "grid-fills")
    assert fills[0] == [clock(status["now"] - 40), "#1 B", "buy", "entry", "0.10310", "193.9", "0.05"]
    assert len(fills) == 3
    cycles = table_rows(driver, "grid-cycles")
    assert cycles == [
        [clock(status["now"] - 300), "#1 B", "buy", "0.10310 → 0.10413", "193.9", "+0.10", "RANGING"],
        [clock(status["now"] - 900), "#0 A", "sell", "0.10440 → 0.10436", "190", "−0.0040", "BULLISH"],
    ]
    nets = by_testid(driver, "grid-cycles").find_elements(By.CSS_SELECTOR, "tbody td:nth-child(6) span")
    assert "pos" in nets[0].get_attribute("class").split()
    assert "neg" in nets[1].get_attribute("class").split()


def test_notes_newest_first_with_their_kind(driver, site, base_status):
    open_page(driver, site, grid_status(base_status))
    notes = by_testid(driver, "grid-notes").find_elements(By.CSS_SELECTOR, "li")
    now = grid_status(base_status)["now"]
    assert notes[0].text == f"{clock(now - 20)} unfunded slot 2 B buy entry not placed: needs 20.05 USD, 4.10 free"
    assert notes[1].text == f"{clock(now - 600)} reconciled 2 open orders reconciled at start"


def test_untrusted_strings_are_text_never_markup(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> None:
        g["notes"][0]["message"] = HOSTILE
        g["notes"][1]["kind"] = "<b>rejected</b>"
        g["open_orders"][0]["id"] = "<script>window.__xss = 2</script>"
        g["open_orders"][0]["regime_at_entry"] = "<i>RANGING</i>"
        g["base_asset"] = "<u>DOGE</u>"
        g["signals"]["kelly"]["<em>X</em>"] = None
        g["slots"][0]["A"] = "<s>entry</s>"
        g["capacity"]["band"] = "constructor"  # names that are also properties of every JS object
        g["notes"].append({"ts": now - 900, "kind": "toString", "message": "odd kind"})

    open_page(driver, site, grid_status(base_status, edit))
    card = by_testid(driver, "grid-card")
    assert HOSTILE in text_of(driver, "grid-notes")
    assert "<b>rejected</b>" in text_of(driver, "grid-notes")
    assert table_rows(driver, "grid-orders")[0][-1] == "<script>window.__xss = 2</script>"
    assert "<i>RANGING</i>" in text_of(driver, "grid-orders")
    assert "<u>DOGE</u>" in text_of(driver, "grid-sub")
    assert "<em>X</em>" in text_of(driver, "grid-kelly")
    assert "<s>entry</s>" in text_of(driver, "grid-slots")
    assert text_of(driver, "grid-capacity-band") == "capacity constructor"
    assert by_testid(driver, "grid-capacity-band").get_attribute("class") == "cap-badge"
    assert "toString odd kind" in text_of(driver, "grid-notes")
    assert card.find_elements(By.CSS_SELECTOR, "img, script, b b, i, u, em, s") == []
    assert driver.execute_script("return window.__xss === undefined")
    assert_clean_console(driver)


def test_grid_null_keeps_the_short_off_text(driver, site, base_status):
    status = rich_status(base_status)
    status["grid"] = None
    open_page(driver, site, status)
    assert text_of(driver, "grid") == "not enabled"
    assert text_of(driver, "grid-sub") == "engine off"
    assert "grid-off" in classes(driver, "grid-card")
    assert not by_testid(driver, "grid-capacity-band").is_displayed()
    assert text_of(driver, "render-error") == ""


def test_null_and_missing_optional_fields_still_render(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> dict[str, Any]:
        return {
            "exchange": "paper",
            "pair": "XDGUSD",
            "posture": None,
            "balances": {"quote": None, "base": None, "price": None, "equity_quote": None},
            "pnl": {"net_quote": None, "cycles": None},
            "capacity": {"band": None},
            "exposure": None,
            "signals": {"fills_last_hour": None, "trend": None, "kelly": None},
            "slots": None,
            "open_orders": [{"id": "g1-1", "price": None, "placed_at": None}],
            "recent_fills": None,
            "notes": [{"message": None}],
        }

    open_page(driver, site, grid_status(base_status, edit, backfill={"enabled": True}))
    assert text_of(driver, "render-error") == ""
    assert text_of(driver, "grid-pnl-net") == "—"
    assert text_of(driver, "grid-capacity-band") == "capacity —"
    assert text_of(driver, "grid-exposure") == "—"
    assert text_of(driver, "grid-posture") == "No posture yet."
    assert text_of(driver, "grid-slots") == "No slots."
    assert len(table_rows(driver, "grid-orders")) == 1
    assert text_of(driver, "grid-fills") == "No fills yet."
    assert text_of(driver, "grid-cycles") == "No completed cycles yet."
    assert text_of(driver, "grid-kelly-BULLISH") == "BULLISH — · needs more samples"
    assert_clean_console(driver)


def test_grid_card_fits_a_phone(driver, site, base_status):
    def edit(g: dict[str, Any], now: float) -> None:
        g["notes"][0]["message"] = "x" * 300
        g["open_orders"][0]["id"] = "y" * 120

    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 400, "height": 860, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        open_page(driver, site, grid_status(base_status, edit))
        card = rect(driver, by_testid(driver, "grid-card"))
        assert card["right"] <= 400
        balances = rect(driver, by_testid(driver, "grid-balances"))
        pnl = rect(driver, by_testid(driver, "grid-pnl"))
        assert pnl["top"] >= balances["bottom"]  # stacked, one column
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert_clean_console(driver)


# ---------------------------------------------------------------- trades backfill


def test_backfill_running_shows_progress(driver, site, base_status):
    open_page(driver, site, grid_status(base_status))
    assert text_of(driver, "backfill-state") == "running"
    assert text_of(driver, "backfill-pct") == "41.2%"
    assert text_of(driver, "backfill-phase") == "1m"
    assert text_of(driver, "backfill-eta") == "~2m"
    assert text_of(driver, "backfill-requests") == "120 · 118,000 trades"
    assert text_of(driver, "backfill-written") == "2,500 × 1m · 170 × 15m"
    assert "2025-12-17 19:33 UTC → 2026-01-01 00:00 UTC" in text_of(driver, "backfill")
    bar = by_testid(driver, "backfill-bar")
    fill = bar.find_element(By.CSS_SELECTOR, ".fill")
    assert rect(driver, fill)["width"] == pytest.approx(0.412 * rect(driver, bar)["width"], abs=2)
    assert "none" in text_of(driver, "backfill")  # no last error
    assert_clean_console(driver)


def test_backfill_error_shows_the_message_and_retries(driver, site, base_status):
    status = grid_status(base_status)
    status["trades_backfill"] = backfill_block(
        state="error", phase="15m", eta_sec=None, last_error="<b>Kraken</b> 520", last_error_at=status["now"] - 75
    )
    open_page(driver, site, status)
    assert text_of(driver, "backfill-state") == "error · will retry"
    assert text_of(driver, "backfill-error") == "<b>Kraken</b> 520 · 1m 15s ago"
    assert text_of(driver, "backfill-eta") == "unknown"
    assert by_testid(driver, "backfill").find_elements(By.CSS_SELECTOR, "dd b") == []


@pytest.mark.parametrize(
    ("edits", "line"),
    [
        (
            {"state": "done", "pct": 100.0, "phase": None},
            "Trades backfill done: 2,670 candles written (2,500 × 1m · 170 × 15m).",
        ),
        ({"state": "disabled", "enabled": False}, "Trades backfill: disabled."),
        ({"state": "unavailable"}, "Trades backfill: not available (this market has no trade history)."),
    ],
)
def test_backfill_finished_or_off_is_one_line(driver, site, base_status, edits, line):
    status = grid_status(base_status, backfill=backfill_block(**edits))
    open_page(driver, site, status)
    assert text_of(driver, "backfill") == line
    assert by_testid(driver, "backfill").find_elements(By.CSS_SELECTOR, ".bar") == []


def test_backfill_missing_is_hidden(driver, site, base_status):
    status = rich_status(base_status)
    status.pop("trades_backfill", None)
    open_page(driver, site, status)
    assert not by_testid(driver, "backfill").is_displayed()
    assert text_of(driver, "render-error") == ""
