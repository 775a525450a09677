"""Shared pieces of the dashboard's browser tests: one headless Chromium per module,
sites serving a status board through the real ApiServer, a real status payload, page helpers.

Loaded as a pytest plugin by ``conftest.py``, so its fixtures are available to every test module.
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
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

import dashboard
from clock import iso_utc
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard

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
    router: ActionRouter

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/"


HEALTHY = {"ok": True, "reasons": []}  # /healthz here (the page reads health from the status)


def start_site(token: str = "", router: ActionRouter | None = None) -> Site:
    board = StatusBoard()
    router = ActionRouter() if router is None else router
    ctx = ApiContext(board, router, dashboard.assets(), token, lambda: HEALTHY)
    server = ApiServer("127.0.0.1", 0, ctx)
    server.start()
    return Site(board, server, router)


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
def action_site() -> Iterator[Site]:
    """A token-protected site whose action router each advisor-action test registers its handlers on."""
    s = start_site(TOKEN, ActionRouter())
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
    tiers["suppressed_side"] = "sell"
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


# ---------------------------------------------------------------- API token helpers


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
