"""The dashboard's store block on the Candle pipeline card (SPEC section 11) in a real headless Chromium.

The ``store`` block is built by ``store.store_status``; each test edits a copy of the real status from
``rich_status`` (whose sqlite block the simulated bot wrote) and loads it through the shared test site.
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
    wait,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from clock import iso_utc
from store.interface import store_status

pytestmark = pytest.mark.browser

BAD_RGB = "rgb(200, 69, 63)"  # --bad: the degraded badge and the card border
HOSTILE = '<img src=x onerror="window.__xss = 1">'
ERROR = "store: writing candles failed: Supabase answered 503"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def supabase_block(now: float, **edits: Any) -> dict[str, Any]:
    """A healthy Supabase store with its local mirror; ``edits`` go to :func:`store.store_status`."""
    fields: dict[str, Any] = {"last_remote_write_at": now - 12, **edits}
    return store_status("supabase", "data/bot.sqlite3", **fields)


def degraded_block(now: float, **edits: Any) -> dict[str, Any]:
    """Supabase down for 5m 10s, 37 writes waiting in the local mirror."""
    fields: dict[str, Any] = {
        "degraded": True,
        "pending_writes": 37,
        "last_error": ERROR,
        "last_error_at": now - 20,
        "degraded_since": now - 310,
        "last_remote_write_at": now - 315,
        **edits,
    }
    return supabase_block(now, **fields)


def store_page_status(base: dict[str, Any], block=None) -> dict[str, Any]:
    """``rich_status(base)`` with its ``store`` block replaced by ``block(now)`` (kept as is when None)."""
    s = rich_status(base)
    if block is not None:
        s["store"] = block(s["now"])
    return s


def css(driver: WebDriver, testid: str, prop: str) -> str:
    return driver.execute_script(f"return getComputedStyle(arguments[0]).{prop}", by_testid(driver, testid))


def present(driver: WebDriver, testid: str) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]'))


# ---------------------------------------------------------------- tests


def test_sqlite_store_is_one_ok_line(driver, site, base_status):
    status = store_page_status(base_status)
    assert status["store"]["backend"] == "sqlite"  # what the simulated bot reports
    open_page(driver, site, status)
    assert by_testid(driver, "store").is_displayed()
    assert text_of(driver, "store-backend") == "sqlite"
    assert text_of(driver, "store-state") == "ok"
    assert text_of(driver, "store-path") == status["store"]["local_path"]
    assert css(driver, "store-state", "backgroundColor") != BAD_RGB
    for testid in ("store-pending", "store-rejected", "store-last-write", "store-since", "store-error"):
        assert not present(driver, testid), testid
    assert not by_testid(driver, "store-alert").is_displayed()
    assert by_testid(driver, "pipeline-card").get_attribute("data-store") == "ok"
    assert_clean_console(driver)


def test_supabase_ok_with_nothing_pending(driver, site, base_status):
    open_page(driver, site, store_page_status(base_status, supabase_block))
    assert text_of(driver, "store-backend") == "supabase"
    assert text_of(driver, "store-state") == "ok"
    assert text_of(driver, "store-path") == "local mirror data/bot.sqlite3"
    assert text_of(driver, "store-pending") == "0"
    assert text_of(driver, "store-last-write") == "12s ago"
    for testid in ("store-rejected", "store-since", "store-error"):
        assert not present(driver, testid), testid
    assert css(driver, "store-state", "backgroundColor") != BAD_RGB
    assert css(driver, "pipeline-card", "borderTopColor") != BAD_RGB
    assert not by_testid(driver, "store-alert").is_displayed()
    assert_clean_console(driver)


def test_supabase_degraded_shows_since_error_and_pending(driver, site, base_status):
    status = store_page_status(base_status, degraded_block)
    now = status["now"]
    open_page(driver, site, status)
    assert text_of(driver, "store-state") == "DEGRADED"
    assert css(driver, "store-state", "backgroundColor") == BAD_RGB
    assert css(driver, "pipeline-card", "borderTopColor") == BAD_RGB
    assert by_testid(driver, "pipeline-card").get_attribute("data-store") == "degraded"
    assert text_of(driver, "store-pending") == "37"
    assert "kept locally, not yet in Supabase" in text_of(driver, "store")
    assert text_of(driver, "store-since") == f"since {clock(now - 310)} (5m 10s ago)"
    assert text_of(driver, "store-error") == f"{ERROR} · 20s ago"
    assert text_of(driver, "store-last-write") == "5m 15s ago"
    assert not present(driver, "store-rejected")  # none rejected
    alert = by_testid(driver, "store-alert")
    assert alert.is_displayed() and alert.text == "store degraded"  # seen at a glance, in the header
    assert ERROR in alert.get_attribute("title")
    assert_clean_console(driver)


def test_rejected_writes_show_only_when_there_are_some(driver, site, base_status):
    open_page(driver, site, store_page_status(base_status, lambda now: degraded_block(now, rejected_writes=3)))
    assert text_of(driver, "store-rejected") == "3"
    assert "refused by Supabase, kept locally only" in text_of(driver, "store")
    assert_clean_console(driver)


def test_hostile_error_text_is_text_never_markup(driver, site, base_status):
    def block(now: float) -> dict[str, Any]:
        b = degraded_block(now, last_error=HOSTILE)
        b.update(backend="<b>supabase</b>", local_path="<script>window.__xss = 2</script>")
        return b

    open_page(driver, site, store_page_status(base_status, block))
    assert text_of(driver, "store-error") == f"{HOSTILE} · 20s ago"
    assert text_of(driver, "store-backend") == "<b>supabase</b>"
    assert text_of(driver, "store-path") == "<script>window.__xss = 2</script>"
    assert HOSTILE in by_testid(driver, "store-alert").get_attribute("title")
    assert by_testid(driver, "store").find_elements(By.CSS_SELECTOR, "img, script, b b, dd b") == []
    assert driver.execute_script("return window.__xss === undefined")
    assert_clean_console(driver)


@pytest.mark.parametrize("missing", ["absent", "null"])
def test_status_without_store_renders_nothing(driver, site, base_status, missing):
    status = rich_status(base_status)
    if missing == "absent":
        del status["store"]
    else:
        status["store"] = None
    open_page(driver, site, status)
    assert not by_testid(driver, "store").is_displayed()
    assert text_of(driver, "store") == ""
    assert not by_testid(driver, "store-alert").is_displayed()
    assert by_testid(driver, "pipeline-15m").is_displayed()  # the rest of the card is untouched
    assert text_of(driver, "render-error") == ""
    assert_clean_console(driver)


def test_recovery_between_two_refreshes_updates_the_card(driver, site, base_status):
    first = store_page_status(base_status, degraded_block)
    open_page(driver, site, first)
    assert text_of(driver, "store-state") == "DEGRADED"
    later = store_page_status(base_status, lambda now: supabase_block(now, last_remote_write_at=now + 10))
    later["now"] = first["now"] + 15
    later["now_iso"] = iso_utc(later["now"])
    site.board.publish(later)
    site.board.beat()
    wait(driver, lambda d: text_of(d, "bot-time") == later["now_iso"], message="the page did not poll again")
    assert text_of(driver, "store-state") == "ok"
    assert css(driver, "store-state", "backgroundColor") != BAD_RGB
    assert css(driver, "pipeline-card", "borderTopColor") != BAD_RGB
    assert text_of(driver, "store-pending") == "0"
    assert text_of(driver, "store-last-write") == "5s ago"
    assert not present(driver, "store-since") and not present(driver, "store-error")
    assert not by_testid(driver, "store-alert").is_displayed()
    assert_clean_console(driver)


def test_degraded_store_fits_a_phone(driver, site, base_status):
    long_error = "store: writing candles failed: " + "x" * 300
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 400, "height": 860, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        open_page(driver, site, store_page_status(base_status, lambda now: degraded_block(now, last_error=long_error)))
        assert rect(driver, by_testid(driver, "pipeline-card"))["right"] <= 400
        assert by_testid(driver, "store-alert").is_displayed()
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert_clean_console(driver)
