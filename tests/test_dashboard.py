"""The dashboard page (SPEC section 11) in a real headless Chromium.

The page is served by the real :class:`http_api.ApiServer` from a status dict
built by a real simulated bot and then edited per case; the last test drives
a real ``python bot.py`` subprocess end to end. One browser serves the module.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_sim_bot, run_ticks
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import dashboard
from clock import iso_utc
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WAIT_SEC = 10.0
TOKEN = "s3cret"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        reason = f"the browser tests need Debian's chromium and chromium-driver; missing: {', '.join(missing)}"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path means selenium-manager is never consulted (nothing is downloaded).
    drv = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@dataclass
class Site:
    board: StatusBoard
    server: ApiServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"


def start_site(token: str = "") -> Site:
    board = StatusBoard()
    server = ApiServer("127.0.0.1", 0, ApiContext(board, ActionRouter(), dashboard.render_page(), token, 45.0))
    server.start()
    return Site(board, server)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = start_site()
    yield s
    s.server.stop()


@pytest.fixture(scope="module")
def locked_site() -> Iterator[Site]:
    s = start_site(TOKEN)
    yield s
    s.server.stop()


@pytest.fixture(scope="module")
def base_status(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real status payload from a simulated bot after a few cycles."""
    bot = make_sim_bot(tmp_path_factory.mktemp("dashboard") / "db.sqlite3")
    try:
        run_ticks(bot, 5)
        return bot.status()
    finally:
        bot.store.close()


# ---------------------------------------------------------------- payload edits


def rich_status(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` edited into a state that exercises every part of the page."""
    s = copy.deepcopy(base)
    now = s["now"]
    primary = s["hmm"]["primary"]
    primary.update(
        trained=True,
        regime="BULLISH",
        confidence=0.8,
        bias_signal=0.62,
        probabilities={"bearish": 0.05, "ranging": 0.1, "bullish": 0.85},
        last_trained_at=now - 7200,
    )
    primary["training_depth"].update(
        current_candles=2400,
        target_candles=4000,
        quality_tier="baseline",
        confidence_modifier=0.85,
        pct_complete=60.0,
        estimated_full_at=iso_utc(now + 8 * 3600),
    )
    secondary = s["hmm"]["secondary"]
    secondary.update(
        trained=False,
        regime="RANGING",
        confidence=0.0,
        bias_signal=0.0,
        probabilities=None,
        transition_matrix=None,
        last_trained_at=None,
    )
    secondary["training_depth"].update(
        current_candles=150,
        target_candles=1440,
        quality_tier=None,
        confidence_modifier=0.0,
        pct_complete=10.4,
        estimated_full_at=iso_utc(now + 1290 * 900),
    )
    tiers = s["regime_tier"]
    tiers["mechanical"].update(
        tier=2, direction="long_bias", since=now - 725, shadow=False, would_be=None, held_because=None
    )
    tiers["effective"] = {"tier": 2, "direction": "long_bias", "source": "mechanical"}
    tiers["suppressed_side"] = "A"
    tiers["recent_transitions"] = [
        {
            "ts": now - 725,
            "pair": s["pair"],
            "from_tier": 1,
            "to_tier": 2,
            "from_direction": "long_bias",
            "to_direction": "long_bias",
            "reason": "upgrade to tier 2 long_bias: effective confidence 0.680 >= 0.50, |bias| 0.620 >= 0.25",
            "regime": "BULLISH",
            "raw_confidence": 0.8,
            "effective_confidence": 0.68,
            "bias_signal": 0.62,
            "shadow": 0,
        }
    ]
    regimes = ("RANGING", "BULLISH", "BULLISH", "BEARISH", "RANGING")
    confs = (0.5, 1.0, 0.25, 0.75, 0.0)
    s["regime_history_30m"] = [
        {"ts": now - 1800 + 60 * i, "regime": regimes[i % 5], "conf": confs[i % 5]} for i in range(30)
    ]
    # Three runs of regimes: RANGING, BULLISH, BEARISH.
    s["price_history"] = [
        {
            "ts": int(now) - 60 * (240 - i),
            "close": 0.05 + 0.0004 * ((i % 37) - 18) / 18 + 0.00001 * i,
            "regime": "RANGING" if i < 100 else "BULLISH" if i < 180 else "BEARISH",
        }
        for i in range(240)
    ]
    s["hmm_data_pipeline"]["15m"].update(status="stale", freshness_sec=4000.0)
    s["health"]["ok"] = False
    s["health"]["errors"] = [
        {"ts": now - 400, "source": "pipeline", "message": "older error"},
        {"ts": now - 30, "source": "kraken", "message": "<b>x</b> answered 520"},
    ]
    return s


def shadow_status(base: dict[str, Any]) -> dict[str, Any]:
    s = rich_status(base)
    now = s["now"]
    s["regime_tier"]["mechanical"].update(
        tier=0,
        direction="symmetric",
        since=now - (3 * 3600 + 10 * 60 + 7),
        shadow=True,
        would_be={"tier": 2, "direction": "short_bias", "since": now - 300},
        held_because="min dwell: 120s of 300s",
    )
    s["regime_tier"]["effective"] = {"tier": 0, "direction": "symmetric", "source": "mechanical"}
    s["regime_tier"]["suppressed_side"] = None
    return s


def full_status(base: dict[str, Any]) -> dict[str, Any]:
    s = rich_status(base)
    s["hmm"]["primary"]["training_depth"].update(
        current_candles=4000,
        target_candles=4000,
        quality_tier="full",
        confidence_modifier=1.0,
        pct_complete=100.0,
        estimated_full_at=None,
    )
    return s


# ---------------------------------------------------------------- page helpers


def by_testid(driver: WebDriver, testid: str):
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def text_of(driver: WebDriver, testid: str) -> str:
    try:
        return by_testid(driver, testid).text
    except NoSuchElementException:
        return ""


def wait(driver: WebDriver, condition, timeout: float = WAIT_SEC, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def severe_console_messages(driver: WebDriver) -> list[str]:
    """SEVERE browser-console entries since the last call (reading drains the log)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver: WebDriver, site: Site, status: dict[str, Any]) -> None:
    """Publish ``status``, load the page fresh and wait until it has drawn that status."""
    site.board.publish(status)
    site.board.beat()
    severe_console_messages(driver)
    driver.get(site.url)
    wait(
        driver,
        lambda d: text_of(d, "bot-time") == status["now_iso"],
        message=f"the page never showed bot time {status['now_iso']}",
    )


def assert_clean_console(driver: WebDriver) -> None:
    assert severe_console_messages(driver) == []


def rect(driver: WebDriver, element) -> dict[str, float]:
    return driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, height: r.height};",
        element,
    )


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


def open_locked(driver: WebDriver, site: Site, status: dict[str, Any]) -> None:
    """Load the token-protected page with no token stored and wait for the token form."""
    site.board.publish(status)
    site.board.beat()
    driver.get(site.url)
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait(driver, lambda d: by_testid(d, "token-form").is_displayed(), message="no token form")


def assert_only_unauthorised_console_errors(driver: WebDriver) -> None:
    assert [m for m in severe_console_messages(driver) if "401" not in m] == []


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
