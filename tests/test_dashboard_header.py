"""The dashboard's header and health display in a real headless Chromium: the tier the grid
trades (with an AI override beside the mechanical tier), equity and net P&L, and why health
is not ok (pill and Errors card)."""

from __future__ import annotations

import pytest
from dashboard_page import assert_clean_console, by_testid, open_page, rich_status, text_of
from selenium.webdriver.common.by import By

pytestmark = pytest.mark.browser


def override_status(base):
    status = rich_status(base)
    tiers = status["regime_tier"]
    tiers["mechanical"].update(tier=2, direction="long_bias")
    tiers["effective"] = {"tier": 2, "direction": "short_bias", "source": "ai_override"}
    grid = status["grid"]
    assert grid is not None, "the simulated bot's status has a grid block"
    grid["quote_asset"] = "USD"
    grid["balances"]["equity_quote"] = 1012.5
    grid["pnl"].update(start_equity_quote=1000.0, net_quote=12.5)
    return status


def test_header_shows_the_effective_tier_and_an_ai_override_beside_the_mechanical(driver, site, base_status):
    status = override_status(base_status)
    open_page(driver, site, status)
    assert text_of(driver, "header-tier") == "tier 2 · short_bias"
    assert by_testid(driver, "header-override").is_displayed() and text_of(driver, "header-override") == "AI override"
    assert text_of(driver, "header-mech") == "mechanical: tier 2 · long_bias"
    assert text_of(driver, "header-equity") == "1,012.50 USD"
    assert text_of(driver, "header-pnl") == "net +12.50 (+1.25%)"
    assert "pos" in by_testid(driver, "header-pnl").get_attribute("class").split()

    status["regime_tier"]["effective"] = {"tier": 2, "direction": "long_bias", "source": "mechanical"}
    status["grid"]["pnl"]["net_quote"] = -3.0
    open_page(driver, site, status)
    assert text_of(driver, "header-tier") == "tier 2 · long_bias"
    assert not by_testid(driver, "header-override").is_displayed()
    assert not by_testid(driver, "header-mech").is_displayed()
    assert text_of(driver, "header-pnl") == "net −3.00 (−0.30%)"
    assert_clean_console(driver)


def test_health_reasons_lead_the_errors_card_and_title_the_pill(driver, site, base_status):
    reason = "cycles are failing: 3 in a row"
    status = rich_status(base_status)
    status["health"].update(ok=False, reasons=[reason, "the candle store is degraded"])
    newest = max(status["health"]["errors"], key=lambda e: e["ts"])
    newest["count"] = 4  # the same problem four times: one row
    open_page(driver, site, status)
    pill = by_testid(driver, "health")
    assert pill.text == "health NOT OK" and pill.get_attribute("title") == reason
    items = [li.text for li in by_testid(driver, "errors").find_elements(By.CSS_SELECTOR, "li")]
    assert len(items) == 4  # two reasons, then the two recent errors (newest first)
    assert reason in items[0] and "the candle store is degraded" in items[1]
    assert "answered 520" in items[2] and "older error" in items[3]
    assert items[2].endswith("×4") and text_of(driver, "error-count").strip() == "×4"

    status["health"].update(ok=False, errors=[])
    del status["health"]["reasons"]  # a status without the list: health is still not ok
    open_page(driver, site, status)
    assert "No errors." not in text_of(driver, "errors")
    assert "health is not ok" in text_of(driver, "errors")

    status["health"].update(ok=True, reasons=[], errors=[])
    open_page(driver, site, status)
    assert text_of(driver, "health") == "health ok" and text_of(driver, "errors") == "No errors."
    assert_clean_console(driver)
