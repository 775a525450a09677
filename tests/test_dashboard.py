"""The dashboard page (SPEC section 11) in a real headless Chromium.

The page is served by the real :class:`http_api.ApiServer` from a status dict
built by a real simulated bot and then edited per case; the last test drives
a real ``python bot.py`` subprocess end to end. One browser serves the module.
"""

from __future__ import annotations

import copy

import pytest
from dashboard_page import (
    TOKEN,
    assert_clean_console,
    assert_only_unauthorised_console_errors,
    by_testid,
    full_status,
    open_locked,
    open_page,
    rect,
    rich_status,
    severe_console_messages,
    shadow_status,
    text_of,
    wait,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from clock import iso_utc

pytestmark = pytest.mark.browser

# ---------------------------------------------------------------- in-process tests


def test_header_shows_pair_mode_price_time_and_health(driver, site, base_status):
    status = rich_status(base_status)
    open_page(driver, site, status)
    assert text_of(driver, "pair") == status["pair"]
    assert text_of(driver, "mode").lower() == "sim"
    assert text_of(driver, "price") not in ("", "—")
    assert text_of(driver, "health") == "health NOT OK"
    assert "live" in text_of(driver, "connection")
    assert_clean_console(driver)


def test_training_progress_label_bar_and_eta(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    assert text_of(driver, "depth-label-primary") == "2,400/4,000 (60%) — Baseline"
    bar = by_testid(driver, "depth-bar-primary")
    assert "tier-baseline" in bar.get_attribute("class").split()
    fill = bar.find_element(By.CSS_SELECTOR, ".fill")
    assert rect(driver, fill)["width"] == pytest.approx(0.6 * rect(driver, bar)["width"], abs=2)
    assert text_of(driver, "depth-eta-primary") == "est. full: ~8h"
    assert_clean_console(driver)


@pytest.mark.parametrize(("to_go_sec", "eta"), [(45 * 60, "~45m"), (8 * 3600, "~8h"), (3 * 86400, "~3d")])
def test_eta_is_counted_from_the_bot_clock(driver, site, base_status, to_go_sec, eta):
    status = rich_status(base_status)
    status["hmm"]["primary"]["training_depth"]["estimated_full_at"] = iso_utc(status["now"] + to_go_sec)
    open_page(driver, site, status)
    assert text_of(driver, "depth-eta-primary") == f"est. full: {eta}"


def test_full_training_depth_has_no_eta(driver, site, base_status):
    open_page(driver, site, full_status(base_status))
    assert text_of(driver, "depth-label-primary") == "4,000/4,000 — Full"
    assert "tier-full" in by_testid(driver, "depth-bar-primary").get_attribute("class").split()
    assert not by_testid(driver, "depth-eta-primary").is_displayed()
    assert text_of(driver, "depth-eta-primary") == ""
    assert_clean_console(driver)


def test_untrained_secondary_is_muted_and_error_free(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    label = by_testid(driver, "depth-label-secondary")
    assert label.text == "150/1,440 (10%) — Untrained"
    assert "untrained" in label.get_attribute("class").split()
    assert "tier-none" in by_testid(driver, "depth-bar-secondary").get_attribute("class").split()
    assert text_of(driver, "depth-eta-secondary") == "est. full: ~13d"
    assert text_of(driver, "trained-secondary") == "not trained"
    assert text_of(driver, "probs-secondary") == "—"
    assert text_of(driver, "render-error") == ""
    assert_clean_console(driver)


def test_model_card_confidences_and_probabilities(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    assert text_of(driver, "regime-primary") == "BULLISH"
    assert text_of(driver, "conf-raw-primary") == "0.800"
    assert text_of(driver, "conf-eff-primary") == "0.680"  # 0.8 raw x 0.85 baseline modifier
    assert text_of(driver, "bias-primary") == "+0.620"
    assert text_of(driver, "probs-primary") == "bear 5.0% · range 10.0% · bull 85.0%"
    assert text_of(driver, "trained-primary") == "trained"
    assert "2h 00m ago" in text_of(driver, "last-trained-primary")


def test_policy_line(driver, site, base_status):
    status = rich_status(base_status)
    status["hmm"]["policy"].update(
        raw_confidence=0.8,
        confidence_modifier=0.85,
        effective_confidence=0.68,
        regime="BULLISH",
        bias_signal=0.62,
        source="consensus",
        agreement="full",
    )
    open_page(driver, site, status)
    line = text_of(driver, "policy")
    for part in ("consensus", "full", "BULLISH", "0.800", "× 0.85", "0.680", "+0.620"):
        assert part in line


def test_mechanical_tier_direction_and_time_since_change(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    assert text_of(driver, "mech-tier") == "Tier 2"
    assert text_of(driver, "mech-direction") == "long_bias"
    assert text_of(driver, "mech-since") == "12m 05s"
    assert not by_testid(driver, "mech-shadow").is_displayed()
    assert text_of(driver, "suppressed-side") == "A (sell entries)"
    assert text_of(driver, "effective-tier") == "tier 2 · long_bias (mechanical)"
    assert text_of(driver, "capacity-band") == "normal"
    transitions = text_of(driver, "transitions")
    assert "tier 1 → 2" in transitions and "upgrade to tier 2 long_bias" in transitions


def test_entry_size_and_direction_skill(driver, site, base_status):
    status = rich_status(base_status)
    tiers = status["regime_tier"]
    tiers["entry_size"] = 0.5
    tiers["direction_skill"] = {
        "gate": True, "horizon_sec": 3600.0, "scored": 120, "weight": 101.3, "hit_rate": 0.5333,
        "lower_bound": 0.4361, "tier2_hit_rate": 0.7, "earned": 0.0, "pending_since": None,
    }  # fmt: skip
    open_page(driver, site, status)
    assert text_of(driver, "entry-size") == "50 % (larger moves likely: the grid trades smaller)"
    assert text_of(driver, "direction-skill") == "right 53.3 % of 120 calls (at least 43.6 %): earned 0 %"
    tiers["entry_size"] = 1.0
    tiers["direction_skill"] = {**tiers["direction_skill"], "scored": 0, "hit_rate": None, "lower_bound": None}
    open_page(driver, site, status)
    assert text_of(driver, "entry-size") == "100 %"
    assert text_of(driver, "direction-skill") == "no direction call scored yet: directional tiers wait"
    tiers["direction_skill"]["gate"] = False
    open_page(driver, site, status)
    assert text_of(driver, "direction-skill") == "gate off: tiers act on confidence alone"


def test_shadow_mode_shows_what_the_tier_would_be(driver, site, base_status):
    open_page(driver, site, shadow_status(base_status))
    assert text_of(driver, "mech-tier") == "Tier 0"
    assert text_of(driver, "mech-direction") == "symmetric"
    assert text_of(driver, "mech-since") == "3h 10m"
    assert text_of(driver, "mech-shadow") == "shadow mode — would be: tier 2 short_bias"
    assert text_of(driver, "mech-held") == "held: min dwell: 120s of 300s"
    assert text_of(driver, "suppressed-side") == "none"


def test_regime_history_chart_has_one_bar_per_evaluation(driver, site, base_status):
    status = rich_status(base_status)
    open_page(driver, site, status)
    chart = by_testid(driver, "history-chart")
    bars = chart.find_elements(By.CSS_SELECTOR, ".hist-entry")
    assert len(bars) == len(status["regime_history_30m"]) == 30
    # Colour by regime, height by confidence, x from now-1800 to now.
    classes = [b.get_attribute("class").split() for b in bars[:4]]
    assert ["r-ranging" in classes[0], "r-bullish" in classes[1], "r-bearish" in classes[3]] == [True] * 3
    full, half = rect(driver, bars[1])["height"], rect(driver, bars[0])["height"]
    assert full == pytest.approx(2 * half, rel=0.05)
    svg = rect(driver, chart.find_element(By.CSS_SELECTOR, "svg"))
    assert rect(driver, bars[0])["left"] == pytest.approx(svg["left"], abs=2)
    assert rect(driver, bars[-1])["right"] == pytest.approx(svg["right"], abs=2)
    assert_clean_console(driver)


def test_price_chart_has_line_and_regime_bands(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    chart = by_testid(driver, "price-chart")
    line = chart.find_element(By.CSS_SELECTOR, "polyline.price-line")
    assert len(line.get_attribute("points").split()) == 240
    bands = chart.find_elements(By.CSS_SELECTOR, ".regime-band")
    assert [b.get_attribute("class").split()[-1] for b in bands] == ["r-ranging", "r-bullish", "r-bearish"]
    assert rect(driver, line)["width"] > 0.9 * rect(driver, chart)["width"]


def test_pipeline_health_shows_stale_feed(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    stale = by_testid(driver, "pipeline-15m")
    assert "stale" in stale.text
    assert "st-stale" in by_testid(driver, "pipeline-status-15m").get_attribute("class").split()
    assert "1h 06m" in stale.text  # freshness 4000 s, over its 45m limit
    fresh = by_testid(driver, "pipeline-1m")
    assert "ok" in by_testid(driver, "pipeline-status-1m").text
    assert "st-ok" in by_testid(driver, "pipeline-status-1m").get_attribute("class").split()
    assert "4,000" in fresh.text


def test_error_messages_are_literal_text_newest_first(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    errors = by_testid(driver, "errors")
    items = errors.find_elements(By.CSS_SELECTOR, "li")
    assert "<b>x</b> answered 520" in items[0].text
    assert "older error" in items[1].text
    assert errors.find_elements(By.CSS_SELECTOR, "b") == []
    assert_clean_console(driver)


def test_page_follows_new_publishes(driver, site, base_status):
    first = rich_status(base_status)
    open_page(driver, site, first)
    assert text_of(driver, "regime-primary") == "BULLISH"
    later = rich_status(base_status)
    later["now"] = first["now"] + 15
    later["now_iso"] = iso_utc(later["now"])
    later["hmm"]["primary"]["regime"] = "BEARISH"
    later["regime_tier"]["mechanical"].update(tier=1, direction="short_bias")
    site.board.publish(later)
    site.board.beat()
    wait(driver, lambda d: text_of(d, "bot-time") == later["now_iso"], message="the page did not poll again")
    assert text_of(driver, "regime-primary") == "BEARISH"
    assert text_of(driver, "mech-tier") == "Tier 1"
    assert text_of(driver, "mech-since") == "12m 20s"
    assert_clean_console(driver)


def test_connection_loss_is_visible_and_recovers(driver, site, base_status):
    open_page(driver, site, rich_status(base_status))
    driver.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    try:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
        wait(driver, lambda d: "connection lost — last update" in text_of(d, "connection"))
        assert "lost" in by_testid(driver, "connection").get_attribute("class").split()
        assert by_testid(driver, "main").is_displayed()  # the last good data stays on screen
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        driver.execute_cdp_cmd("Network.disable", {})
    wait(driver, lambda d: text_of(d, "connection").startswith("live"))
    severe_console_messages(driver)  # the failed fetches are logged as errors, by design


def test_phone_width_is_a_single_column_without_overflow(driver, site, base_status):
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 400, "height": 860, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        open_page(driver, site, rich_status(base_status))
        primary = rect(driver, by_testid(driver, "hmm-primary"))
        secondary = rect(driver, by_testid(driver, "hmm-secondary"))
        assert secondary["top"] >= primary["bottom"]
        assert primary["left"] == pytest.approx(secondary["left"], abs=1)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert_clean_console(driver)


def test_null_sections_render_without_errors(driver, site, base_status):
    status = copy.deepcopy(base_status)
    status.update(price=None, sim=None, grid=None, ai_regime_advisor=None, regime_history_30m=[], price_history=[])
    status["hmm"]["secondary"] = None
    status["health"]["errors"] = []
    open_page(driver, site, status)
    assert text_of(driver, "price") == "—"
    assert by_testid(driver, "hmm-secondary").text.endswith("Model not enabled.")
    assert driver.find_elements(By.CSS_SELECTOR, ".hist-entry") == []
    assert text_of(driver, "advisor") == "not enabled"
    assert text_of(driver, "grid") == "not enabled"
    assert text_of(driver, "errors") == "No errors."
    assert text_of(driver, "render-error") == ""
    assert_clean_console(driver)


# ---------------------------------------------------------------- API token


def test_token_form_appears_when_the_api_wants_a_token(driver, locked_site, base_status):
    open_locked(driver, locked_site, base_status)
    assert not by_testid(driver, "main").is_displayed()
    assert text_of(driver, "bot-time") == ""
    assert "token" in text_of(driver, "connection")
    assert not by_testid(driver, "forget-token").is_displayed()
    assert_only_unauthorised_console_errors(driver)


def test_wrong_token_keeps_the_form_with_an_error(driver, locked_site, base_status):
    open_locked(driver, locked_site, base_status)
    by_testid(driver, "token-input").send_keys("not-it", Keys.ENTER)
    wait(driver, lambda d: by_testid(d, "token-error").is_displayed(), message="no token error shown")
    assert "not accepted" in text_of(driver, "token-error")
    assert by_testid(driver, "token-form").is_displayed()
    assert not by_testid(driver, "main").is_displayed()
    assert driver.execute_script("return localStorage.getItem('apiToken')") is None
    assert_only_unauthorised_console_errors(driver)


def test_right_token_unlocks_is_remembered_and_can_be_forgotten(driver, locked_site, base_status):
    open_locked(driver, locked_site, base_status)
    by_testid(driver, "token-input").send_keys(TOKEN, Keys.ENTER)
    wait(driver, lambda d: text_of(d, "bot-time") == base_status["now_iso"], message="the token did not unlock")
    assert not by_testid(driver, "token-form").is_displayed()
    assert driver.execute_script("return localStorage.getItem('apiToken')") == TOKEN

    driver.refresh()  # the stored token is sent from the start
    wait(driver, lambda d: text_of(d, "bot-time") == base_status["now_iso"])
    assert not by_testid(driver, "token-form").is_displayed()

    by_testid(driver, "forget-token").click()
    wait(driver, lambda d: by_testid(d, "token-form").is_displayed(), message="forgetting did not lock the page")
    assert driver.execute_script("return localStorage.getItem('apiToken')") is None
    assert not by_testid(driver, "token-error").is_displayed()
    assert_only_unauthorised_console_errors(driver)


# ---------------------------------------------------------------- end to end


def test_page_agrees_with_a_running_bot(driver, bot_process, tmp_path):
    db = str(tmp_path / "e2e.sqlite3")
    bot = bot_process(["--market", "sim", "--speed", "max", "--port", "0", "--db", db, "--log-level", "INFO"])
    port = bot.wait_ready()
    bot.wait_status(lambda s: s["hmm"]["primary"] is not None)
    severe_console_messages(driver)
    driver.get(f"http://127.0.0.1:{port}/")
    wait(driver, lambda d: text_of(d, "bot-time") not in ("", "—"), timeout=15, message="no status drawn")
    first_time = text_of(driver, "bot-time")

    def shown(d: WebDriver) -> tuple[str, str, str]:
        return text_of(d, "regime-primary"), text_of(d, "mech-tier"), text_of(d, "mech-direction")

    def agrees_with_api(d: WebDriver):
        before = shown(d)
        code, status = bot.get_json("/api/status")
        if code != 200 or shown(d) != before:
            return False  # the page redrew meanwhile: compare again
        mech = status["regime_tier"]["mechanical"]
        expected = (status["hmm"]["primary"]["regime"], f"Tier {mech['tier']}", mech["direction"])
        return status if before == expected else False

    status = WebDriverWait(driver, 30, poll_frequency=0.2).until(
        agrees_with_api, "the page never showed the bot's primary regime and mechanical tier"
    )
    assert text_of(driver, "pair") == status["pair"]
    assert text_of(driver, "mode").lower() == "sim"
    # The bot keeps running at full speed: the page keeps polling it.
    wait(driver, lambda d: text_of(d, "bot-time") != first_time, message="the page stopped polling the bot")
    assert_clean_console(driver)
    assert bot.terminate() == 0
