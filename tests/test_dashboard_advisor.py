"""The dashboard's AI regime advisor card (SPEC sections 7 and 11) in a real headless Chromium:
its three states, confirmations and actions against a test site, and one run against a real bot.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from dashboard_page import (
    TOKEN,
    Site,
    assert_clean_console,
    assert_only_unauthorised_console_errors,
    by_testid,
    open_page,
    rect,
    rich_status,
    severe_console_messages,
    start_site,
    text_of,
    wait,
)
from fake_llm import FakeLLM, Reply
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from clock import iso_utc
from http_api import ActionRefused, ActionRouter

pytestmark = pytest.mark.browser

# ---------------------------------------------------------------- AI regime advisor

FLOOR = 50
KIMI = {"name": "kimi", "model": "moonshotai/kimi-k2", "kind": "reasoning"}
LLAMA = {"name": "llama-70b", "model": "llama-3.3-70b-versatile", "kind": "instruct"}
WARN_RGB = "rgb(201, 138, 20)"  # --warn: the disagreement border
OVERRIDE_RGB = "rgb(224, 102, 28)"  # --override: the active-override border
ACTION_NAMES = ("ai_regime_override", "ai_regime_dismiss", "ai_regime_revert")


def advisor_opinion(
    now: float,
    *,
    tier: int = 2,
    direction: str = "long_bias",
    conviction: int = 72,
    agreement: str = "ai_upgrade",
    age_sec: float = 130,
    applicable: bool | None = None,
    blocked_reason: str | None = None,
    preview: dict[str, Any] | None = None,
    rationale: str = "Momentum is building and both models lean bullish.",
    watch_for: str = "a close back under the 30-minute low",
    panelist: str = "kimi",
) -> dict[str, Any]:
    """One opinion as the status carries it; ``applicable`` defaults to the conviction floor rail alone."""
    if applicable is None:
        applicable = agreement != "agree" and conviction >= FLOOR
    return {
        "ts": now - age_sec,
        "recommended_tier": tier,
        "recommended_direction": direction,
        "conviction": conviction,
        "rationale": rationale,
        "watch_for": watch_for,
        "panelist": panelist,
        "latency_sec": 4.2,
        "agreement": agreement,
        "applicable": applicable,
        "blocked_reason": blocked_reason,
        "apply_preview": preview,
    }


def active_override(
    now: float, *, tier: int = 1, direction: str = "long_bias", remaining_sec: float = 754, conviction: int = 72
) -> dict[str, Any]:
    ttl = 1800
    return {
        "active": True,
        "tier": tier,
        "direction": direction,
        "applied_at": now + remaining_sec - ttl,
        "expires_at": now + remaining_sec,
        "remaining_sec": remaining_sec,
        "source_conviction": conviction,
    }


NO_OVERRIDE = {
    "active": False,
    "tier": None,
    "direction": None,
    "applied_at": None,
    "expires_at": None,
    "remaining_sec": None,
    "source_conviction": None,
}


def advisor_history(now: float) -> list[dict[str, Any]]:
    """Three past opinions, deliberately not in time order."""
    rows = [
        (400, 0, 1, "long_bias", 64, "ai_upgrade", "expired", "llama-70b"),
        (130, 0, 2, "long_bias", 72, "ai_upgrade", "pending", "kimi"),
        (700, 0, 0, "symmetric", 55, "agree", "none", "kimi"),
    ]
    return [
        {
            "ts": now - age,
            "mechanical_tier": mech,
            "ai_tier": ai,
            "ai_direction": direction,
            "conviction": conviction,
            "agreement": agreement,
            "action": action,
            "panelist": panelist,
        }
        for age, mech, ai, direction, conviction, agreement, action, panelist in rows
    ]


def advisor_scorecard() -> dict[str, Any]:
    return {
        "horizon_sec": 1800,
        "scored": 12,
        "pending": 3,
        "by_panelist": {
            "kimi": {"scored": 8, "hits": 5, "hit_rate": 0.625},
            "llama-70b": {"scored": 0, "hits": 0, "hit_rate": None},
        },
        "by_agreement": {
            "ai_upgrade": {"scored": 4, "hits": 2, "hit_rate": 0.5},
            "agree": {"scored": 8, "hits": 6, "hit_rate": 0.75},
        },
    }


def advisor_block(
    now: float,
    *,
    enabled: bool = True,
    opinion: dict[str, Any] | None = None,
    dismissed: bool = False,
    override: dict[str, Any] | None = None,
    in_flight: bool = False,
    last_error: str | None = None,
    next_run_in_sec: float | None = 250,
    last_run_age_sec: float | None = 130,
    default_ttl_sec: int = 1800,
    panel: list[dict[str, Any]] | None = None,
    history: list[dict[str, Any]] | None = None,
    scorecard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``ai_regime_advisor`` block of the status contract."""
    if panel is None:
        panel = [
            {**KIMI, "cooldown_remaining_sec": 0, "consecutive_failures": 0},
            {**LLAMA, "cooldown_remaining_sec": 0, "consecutive_failures": 0},
        ]
    return {
        "enabled": enabled,
        "panel": panel,
        "last_run_ts": None if last_run_age_sec is None else now - last_run_age_sec,
        "last_run_age_sec": last_run_age_sec,
        "next_run_in_sec": next_run_in_sec,
        "in_flight": in_flight,
        "last_error": last_error,
        "conviction_floor": FLOOR,
        "default_ttl_sec": default_ttl_sec,
        "max_ttl_sec": 3600,
        "opinion": opinion,
        "dismissed": dismissed,
        "override": NO_OVERRIDE if override is None else override,
        "history": advisor_history(now) if history is None else history,
        "scorecard": advisor_scorecard() if scorecard is None else scorecard,
    }


def advisor_status(
    base: dict[str, Any], make_block, *, mech: tuple[int, str] = (0, "symmetric"), later_sec: float = 0
) -> dict[str, Any]:
    """``rich_status(base)`` with mechanical tier ``mech`` and the block ``make_block(now)``.

    ``later_sec`` moves the bot clock on, so the page sees a newly published status.
    """
    s = rich_status(base)
    s["now"] += later_sec
    s["now_iso"] = iso_utc(s["now"])
    s["regime_tier"]["mechanical"].update(tier=mech[0], direction=mech[1])
    block = make_block(s["now"])
    ov = block["override"] if block else NO_OVERRIDE
    s["regime_tier"]["effective"] = (
        {"tier": ov["tier"], "direction": ov["direction"], "source": "ai_override"}
        if ov["active"]
        else {"tier": mech[0], "direction": mech[1], "source": "mechanical"}
    )
    s["ai_regime_advisor"] = block
    return s


def clamped_disagreement(now: float, **opinion: Any) -> dict[str, Any]:
    """Mechanical tier 0 against an AI tier 2 long_bias, which Apply would clamp to tier 1."""
    opinion.setdefault("preview", {"tier": 1, "direction": "long_bias", "clamped": True})
    return advisor_block(now, opinion=advisor_opinion(now, **opinion))


def running_override(now: float) -> dict[str, Any]:
    return advisor_block(now, opinion=advisor_opinion(now, age_sec=1100), override=active_override(now))


def card_state(driver: WebDriver) -> str:
    return by_testid(driver, "advisor-card").get_attribute("data-state")


def border_colour(driver: WebDriver, testid: str) -> str:
    return driver.execute_script("return getComputedStyle(arguments[0]).borderTopColor", by_testid(driver, testid))


def displayed(driver: WebDriver, testid: str) -> bool:
    return by_testid(driver, testid).is_displayed()


def clock(ts: float) -> str:
    """``ts`` as the page writes a time of day (UTC)."""
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def seconds_of(text: str) -> int:
    """``45s``, ``12m 05s`` or ``3h 10m`` (as the page writes durations) in seconds."""
    total = 0
    for part in text.split():
        value, unit = int(part[:-1]), part[-1]
        total += value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return total


def test_advisor_missing_or_disabled_reads_not_enabled(driver, site, base_status):
    for status in (
        advisor_status(base_status, lambda now: advisor_block(now, enabled=False)),
        {k: v for k, v in rich_status(base_status).items() if k != "ai_regime_advisor"},
    ):
        open_page(driver, site, status)
        assert card_state(driver) == "disabled"
        assert text_of(driver, "advisor") == "not enabled"
        assert "muted" in by_testid(driver, "advisor").find_element(By.CSS_SELECTOR, "div").get_attribute("class")
        assert not displayed(driver, "advisor-apply")
        assert not displayed(driver, "advisor-scorecard")
        assert text_of(driver, "render-error") == ""
    assert_clean_console(driver)


def test_advisor_waiting_for_the_first_opinion(driver, site, base_status):
    status = advisor_status(base_status, lambda now: advisor_block(now, last_run_age_sec=None, history=[]))
    open_page(driver, site, status)
    assert card_state(driver) == "waiting"
    assert text_of(driver, "advisor-headline") == "waiting for the first opinion"
    next_run = text_of(driver, "advisor-next-run")
    assert next_run.startswith("next check in ")
    assert 245 <= seconds_of(next_run.removeprefix("next check in ")) <= 250
    assert text_of(driver, "advisor-last-run") == "no run yet"
    for absent in ("advisor-mech", "advisor-ai", "advisor-rationale", "advisor-apply", "advisor-revert"):
        assert not displayed(driver, absent), absent
    assert text_of(driver, "advisor-history") == "No opinions yet."
    assert border_colour(driver, "advisor-card") == border_colour(driver, "hmm-primary")
    assert_clean_console(driver)


def test_advisor_without_a_next_check_shows_a_dash(driver, site, base_status):
    open_page(driver, site, advisor_status(base_status, lambda now: advisor_block(now, next_run_in_sec=None)))
    assert text_of(driver, "advisor-next-run") == "next check —"


def test_advisor_agreement_is_neutral(driver, site, base_status):
    status = advisor_status(
        base_status,
        lambda now: advisor_block(now, opinion=advisor_opinion(now, agreement="agree")),
        mech=(2, "long_bias"),
    )
    open_page(driver, site, status)
    assert card_state(driver) == "agree"
    assert text_of(driver, "advisor-headline") == "AI agrees with the mechanical tier"
    assert text_of(driver, "advisor-ai") == "AI: Tier 2 long_bias"
    assert not displayed(driver, "advisor-mech")
    assert text_of(driver, "advisor-conviction") == "72"
    panelist = text_of(driver, "advisor-panelist")
    assert panelist.startswith("kimi · moonshotai/kimi-k2 (reasoning) · answered in 4.2 s")
    assert "2m 10s ago" in panelist
    assert text_of(driver, "advisor-rationale") == "Momentum is building and both models lean bullish."
    assert text_of(driver, "advisor-watch") == "a close back under the 30-minute low"
    assert not displayed(driver, "advisor-dismissed")
    for absent in ("advisor-apply", "advisor-dismiss", "advisor-revert", "advisor-confirm", "advisor-result"):
        assert not displayed(driver, absent), absent
    assert border_colour(driver, "advisor-card") == border_colour(driver, "hmm-primary")
    assert_clean_console(driver)


def test_dismissed_disagreement_is_neutral_with_a_note(driver, site, base_status):
    status = advisor_status(
        base_status,
        lambda now: advisor_block(now, opinion=advisor_opinion(now, tier=1, agreement="ai_downgrade"), dismissed=True),
        mech=(2, "long_bias"),
    )
    open_page(driver, site, status)
    assert card_state(driver) == "agree"
    assert text_of(driver, "advisor-dismissed").startswith("dismissed")
    assert text_of(driver, "advisor-mech") == "Mechanical: Tier 2 long_bias"
    assert text_of(driver, "advisor-ai") == "AI: Tier 1 long_bias"
    assert not displayed(driver, "advisor-apply")
    assert not displayed(driver, "advisor-dismiss")
    assert border_colour(driver, "advisor-card") == border_colour(driver, "hmm-primary")


def test_advisor_disagreement_shows_both_tiers_and_the_buttons(driver, site, base_status):
    open_page(driver, site, advisor_status(base_status, clamped_disagreement))
    assert card_state(driver) == "disagree"
    assert text_of(driver, "advisor-headline") == "AI disagrees: it would raise the tier"
    assert text_of(driver, "advisor-mech") == "Mechanical: Tier 0 symmetric"
    assert text_of(driver, "advisor-ai") == "AI: Tier 2 long_bias"
    assert text_of(driver, "advisor-conviction") == "72 (floor 50)"
    assert text_of(driver, "advisor-clamp") == "applies tier 1 long_bias (one step from mechanical)"
    assert text_of(driver, "advisor-rationale") == "Momentum is building and both models lean bullish."
    assert text_of(driver, "advisor-watch") == "a close back under the 30-minute low"
    assert text_of(driver, "advisor-panelist").startswith("kimi")
    apply = by_testid(driver, "advisor-apply")
    assert apply.text == "Apply Override (30m)"
    assert apply.is_displayed() and apply.is_enabled()
    assert displayed(driver, "advisor-dismiss")
    assert not displayed(driver, "advisor-revert")
    assert not displayed(driver, "advisor-blocked")
    assert not displayed(driver, "advisor-confirm")
    assert border_colour(driver, "advisor-card") == WARN_RGB
    assert_clean_console(driver)


@pytest.mark.parametrize(("ttl_sec", "label"), [(3600, "Apply Override (1h)"), (2700, "Apply Override (45m)")])
def test_apply_label_follows_the_default_ttl(driver, site, base_status, ttl_sec, label):
    status = advisor_status(
        base_status, lambda now: advisor_block(now, opinion=advisor_opinion(now), default_ttl_sec=ttl_sec)
    )
    open_page(driver, site, status)
    assert text_of(driver, "advisor-apply") == label


def test_apply_is_disabled_under_the_conviction_floor(driver, site, base_status):
    reason = "conviction 35 is below the floor of 50"
    status = advisor_status(base_status, lambda now: clamped_disagreement(now, conviction=35, blocked_reason=reason))
    open_page(driver, site, status)
    assert card_state(driver) == "disagree"
    apply = by_testid(driver, "advisor-apply")
    assert apply.is_displayed() and not apply.is_enabled()
    assert text_of(driver, "advisor-blocked") == reason
    assert text_of(driver, "advisor-conviction") == "35 (below the floor of 50)"
    apply.click()
    assert not displayed(driver, "advisor-confirm")
    assert displayed(driver, "advisor-dismiss") and by_testid(driver, "advisor-dismiss").is_enabled()


def test_apply_blocked_by_another_rail_shows_that_reason(driver, site, base_status):
    reason = "capacity is at stop: upgrades are refused"
    status = advisor_status(base_status, lambda now: clamped_disagreement(now, applicable=False, blocked_reason=reason))
    open_page(driver, site, status)
    assert not by_testid(driver, "advisor-apply").is_enabled()
    assert text_of(driver, "advisor-blocked") == reason
    assert text_of(driver, "advisor-conviction") == "72 (floor 50)"


def test_override_shows_what_mechanical_would_be_and_counts_down(driver, site, base_status):
    status = advisor_status(base_status, running_override)
    open_page(driver, site, status)
    assert card_state(driver) == "override"
    assert text_of(driver, "advisor-override") == "Override: Tier 1 long_bias"
    assert text_of(driver, "advisor-mech") == "Mechanical would be: Tier 0 symmetric"
    assert not displayed(driver, "advisor-ai")
    assert text_of(driver, "advisor-conviction") == "72"
    assert text_of(driver, "effective-tier") == "tier 1 · long_bias (ai_override)"
    revert = by_testid(driver, "advisor-revert")
    assert revert.text == "Revert to Mechanical" and revert.is_enabled()
    assert not displayed(driver, "advisor-apply")
    assert not displayed(driver, "advisor-dismiss")
    assert not displayed(driver, "advisor-newer")  # the opinion shown is the one that was applied
    assert border_colour(driver, "advisor-card") == OVERRIDE_RGB

    first = seconds_of(text_of(driver, "advisor-override-remaining"))
    assert 750 <= first <= 754
    wait(
        driver,
        lambda d: seconds_of(text_of(d, "advisor-override-remaining")) < first,
        timeout=4,
        message="the override countdown did not move",
    )
    # A newer status re-syncs the countdown to its remaining time.
    later = advisor_status(
        base_status,
        lambda now: advisor_block(now, override=active_override(now, remaining_sec=900)),
        later_sec=5,
    )
    site.board.publish(later)
    wait(driver, lambda d: text_of(d, "bot-time") == later["now_iso"], message="the page did not poll again")
    assert 896 <= seconds_of(text_of(driver, "advisor-override-remaining")) <= 900
    assert_clean_console(driver)


def test_override_shows_a_newer_opinion_compactly(driver, site, base_status):
    status = advisor_status(
        base_status,
        lambda now: advisor_block(
            now,
            opinion=advisor_opinion(now, tier=0, direction="symmetric", conviction=61, agreement="agree", age_sec=20),
            override=active_override(now),
        ),
    )
    open_page(driver, site, status)
    assert card_state(driver) == "override"
    newer = text_of(driver, "advisor-newer")
    assert newer.startswith("Newer opinion, 20s ago: Tier 0 symmetric · conviction 61 · agree")
    assert not displayed(driver, "advisor-rationale")


def test_advisor_status_line_panel_scorecard_and_history(driver, site, base_status):
    def block(now: float) -> dict[str, Any]:
        panel = [
            {**KIMI, "cooldown_remaining_sec": 290, "consecutive_failures": 3},
            {**LLAMA, "cooldown_remaining_sec": 0, "consecutive_failures": 0},
        ]
        return advisor_block(
            now,
            opinion=advisor_opinion(now, agreement="agree"),
            panel=panel,
            in_flight=True,
            last_error="all panelists failed: kimi timed out after 30 s",
        )

    status = advisor_status(base_status, block, mech=(2, "long_bias"))
    open_page(driver, site, status)
    assert text_of(driver, "advisor-inflight") == "asking llama-70b…"  # kimi is cooling down
    assert text_of(driver, "advisor-error") == "last error: all panelists failed: kimi timed out after 30 s"
    last_run = text_of(driver, "advisor-last-run")
    assert last_run.startswith("last run ") and last_run.endswith(" ago")
    assert 130 <= seconds_of(last_run.removeprefix("last run ").removesuffix(" ago")) <= 133
    panel = text_of(driver, "advisor-panel")
    assert "kimi · reasoning · cooling down 4m" in panel and "3 failures" in panel
    assert "llama-70b · instruct" in panel

    scorecard = by_testid(driver, "advisor-scorecard")
    assert scorecard.text.startswith("12 scored · 3 pending · 30m horizon")
    rows = [r.text for r in scorecard.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert rows == [
        "by panelist",
        "kimi 5 / 8 63%",
        "llama-70b 0 / 0 —",
        "by agreement",
        "agree 6 / 8 75%",
        "AI upgrade 2 / 4 50%",
    ]

    history = by_testid(driver, "advisor-history")
    assert [c.text for c in history.find_elements(By.CSS_SELECTOR, "thead th")] == [
        "time",
        "mech → AI",
        "conv.",
        "agreement",
        "action",
    ]
    rows = [
        [c.text for c in r.find_elements(By.CSS_SELECTOR, "td")]
        for r in history.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    now = status["now"]
    assert rows == [  # newest first
        [clock(now - 130), "0 → 2 long_bias", "72", "AI upgrade", "pending"],
        [clock(now - 400), "0 → 1 long_bias", "64", "AI upgrade", "expired"],
        [clock(now - 700), "0 → 0 symmetric", "55", "agree", "—"],
    ]
    assert_clean_console(driver)


def test_advisor_texts_are_never_markup(driver, site, base_status):
    hostile = '<img src=x onerror="window.__xss = 1">'

    def block(now: float) -> dict[str, Any]:
        b = advisor_block(
            now,
            opinion=advisor_opinion(
                now,
                rationale=hostile,
                watch_for="<script>window.__xss = 2</script>",
                panelist="<em>kimi</em>",
                blocked_reason="<u>no</u>",
                applicable=False,
            ),
            last_error='<img src=y onerror="window.__xss = 3">',
        )
        b["history"][0]["ai_direction"] = "<s>long_bias</s>"
        b["scorecard"]["by_panelist"] = {"<mark>kimi</mark>": {"scored": 1, "hits": 1, "hit_rate": 1.0}}
        return b

    open_page(driver, site, advisor_status(base_status, block))
    assert text_of(driver, "advisor-rationale") == hostile
    assert text_of(driver, "advisor-watch") == "<script>window.__xss = 2</script>"
    assert text_of(driver, "advisor-panelist").startswith("<em>kimi</em>")
    assert text_of(driver, "advisor-blocked") == "<u>no</u>"
    assert text_of(driver, "advisor-error") == 'last error: <img src=y onerror="window.__xss = 3">'
    assert "<s>long_bias</s>" in text_of(driver, "advisor-history")
    assert "<mark>kimi</mark>" in text_of(driver, "advisor-scorecard")
    card = by_testid(driver, "advisor-card")
    assert card.find_elements(By.CSS_SELECTOR, "img, script, em, u, s, mark") == []
    assert driver.execute_script("return window.__xss === undefined")
    assert_clean_console(driver)


def test_advisor_card_fits_a_phone(driver, site, base_status):
    long_word = "x" * 300
    status = advisor_status(
        base_status, lambda now: clamped_disagreement(now, rationale=long_word, watch_for=long_word)
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 400, "height": 860, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        open_page(driver, site, status)
        card = by_testid(driver, "advisor-card")
        main = rect(driver, card.find_element(By.CSS_SELECTOR, ".advisor-main"))
        side = rect(driver, card.find_element(By.CSS_SELECTOR, ".advisor-side"))
        assert side["top"] >= main["bottom"]
        assert rect(driver, card)["right"] <= 400
        assert displayed(driver, "advisor-apply") and displayed(driver, "advisor-dismiss")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert_clean_console(driver)


# ------------------------------------------------ advisor actions (token-protected site)


def open_with_token(driver: WebDriver, site: Site, status: dict[str, Any]) -> None:
    """Store the token for ``site``'s origin, then load the page and wait until it drew ``status``."""
    site.board.publish(status)
    site.board.beat()
    driver.get(site.url + "healthz")  # same origin, no API call: nothing is refused
    driver.execute_script("localStorage.setItem('apiToken', arguments[0])", TOKEN)
    severe_console_messages(driver)
    driver.get(site.url)
    wait(driver, lambda d: text_of(d, "bot-time") == status["now_iso"], message="the page did not unlock")


def record_actions(
    site: Site, *, message: str = "done", refuse: tuple[str, str] | None = None, then=None
) -> list[dict[str, Any]]:
    """Register the three advisor actions on ``site``; the returned list collects every body received."""
    calls: list[dict[str, Any]] = []

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(dict(body))
        if refuse is not None:
            raise ActionRefused(*refuse)
        if then is not None:
            then()
        return {"message": message}

    for name in ACTION_NAMES:
        site.router.register(name, handle)
    return calls


def refused_console_errors(driver: WebDriver, code: int) -> list[str]:
    return [m for m in severe_console_messages(driver) if f"status of {code}" not in m]


def test_cancelled_confirmation_sends_nothing(driver, action_site, base_status):
    calls = record_actions(action_site)
    open_with_token(driver, action_site, advisor_status(base_status, clamped_disagreement))
    assert not displayed(driver, "advisor-confirm")
    by_testid(driver, "advisor-apply").click()
    wait(driver, lambda d: displayed(d, "advisor-confirm"), message="no confirmation asked")
    question = text_of(driver, "advisor-confirm")
    assert "Apply an AI override of Tier 1 long_bias for 30m?" in question
    assert "mechanical Tier 0 symmetric" in question
    assert not displayed(driver, "advisor-apply")  # the dialog stands in for the buttons
    by_testid(driver, "advisor-confirm-no").click()
    assert not displayed(driver, "advisor-confirm")
    assert displayed(driver, "advisor-apply")

    by_testid(driver, "advisor-dismiss").click()
    wait(driver, lambda d: displayed(d, "advisor-confirm"))
    assert text_of(driver, "advisor-confirm").startswith("Dismiss this disagreement?")
    by_testid(driver, "advisor-confirm-no").send_keys(Keys.ESCAPE)
    assert not displayed(driver, "advisor-confirm")
    assert calls == []
    assert text_of(driver, "advisor-result") == ""
    assert_clean_console(driver)


@pytest.mark.parametrize(
    ("button", "action", "make_block"),
    [
        ("advisor-apply", "ai_regime_override", clamped_disagreement),
        ("advisor-dismiss", "ai_regime_dismiss", clamped_disagreement),
        ("advisor-revert", "ai_regime_revert", running_override),
    ],
)
def test_confirmed_action_posts_once_with_the_token(driver, action_site, base_status, button, action, make_block):
    after = advisor_status(base_status, running_override if action == "ai_regime_override" else clamped_disagreement)
    after["now"] += 1
    after["now_iso"] = iso_utc(after["now"])
    message = f"{action} done: tier 1 long_bias (clamped from tier 2)"
    calls = record_actions(action_site, message=message, then=lambda: action_site.board.publish(after))
    open_with_token(driver, action_site, advisor_status(base_status, make_block))
    by_testid(driver, button).click()
    wait(driver, lambda d: displayed(d, "advisor-confirm"))
    yes = by_testid(driver, "advisor-confirm-yes")
    driver.execute_script("arguments[0].click(); arguments[0].click();", yes)  # a double click sends one POST
    wait(driver, lambda d: text_of(d, "advisor-result") == message, message="no result shown")
    # The site wants the bearer token: the handler ran, so the POST carried it.
    assert calls == [{"action": action}]
    assert not displayed(driver, "advisor-confirm")
    wait(driver, lambda d: text_of(d, "bot-time") == after["now_iso"], message="no status after the action")
    assert text_of(driver, "advisor-result") == message  # the redraw keeps the outcome
    assert "good" in by_testid(driver, "advisor-result").get_attribute("class").split()
    assert calls == [{"action": action}]
    assert_clean_console(driver)


def test_refused_action_shows_the_reason(driver, action_site, base_status):
    calls = record_actions(action_site, refuse=("refused", "conviction 35 is below the floor of 50"))
    open_with_token(driver, action_site, advisor_status(base_status, clamped_disagreement))
    by_testid(driver, "advisor-apply").click()
    by_testid(driver, "advisor-confirm-yes").click()
    wait(driver, lambda d: text_of(d, "advisor-result") != "" and text_of(d, "advisor-result") != "sending…")
    assert text_of(driver, "advisor-result") == "refused (409): conviction 35 is below the floor of 50"
    assert "bad" in by_testid(driver, "advisor-result").get_attribute("class").split()
    assert calls == [{"action": "ai_regime_override"}]
    assert displayed(driver, "advisor-apply")  # nothing changed: the operator can try again
    assert refused_console_errors(driver, 409) == []


def test_confirmation_survives_redraws_and_is_withdrawn_when_the_opinion_changes(driver, action_site, base_status):
    calls = record_actions(action_site)
    open_with_token(driver, action_site, advisor_status(base_status, clamped_disagreement))
    by_testid(driver, "advisor-apply").click()
    wait(driver, lambda d: displayed(d, "advisor-confirm"))
    question = text_of(driver, "advisor-confirm")

    same = advisor_status(base_status, clamped_disagreement, later_sec=1)
    same["ai_regime_advisor"]["opinion"]["ts"] -= 1  # the same opinion, seen one second later
    action_site.board.publish(same)
    wait(driver, lambda d: text_of(d, "bot-time") == same["now_iso"], message="the page did not poll again")
    assert displayed(driver, "advisor-confirm")
    assert text_of(driver, "advisor-confirm") == question

    newer = advisor_status(base_status, lambda now: clamped_disagreement(now, age_sec=5, conviction=80), later_sec=2)
    action_site.board.publish(newer)
    wait(driver, lambda d: not displayed(d, "advisor-confirm"), message="the stale confirmation stayed open")
    assert "nothing was sent" in text_of(driver, "advisor-result")
    assert text_of(driver, "advisor-conviction") == "80 (floor 50)"
    assert displayed(driver, "advisor-apply")
    assert calls == []
    assert_clean_console(driver)


def test_action_without_an_answer_says_so(driver, action_site, base_status):
    calls = record_actions(action_site)
    open_with_token(driver, action_site, advisor_status(base_status, running_override))
    by_testid(driver, "advisor-revert").click()
    wait(driver, lambda d: displayed(d, "advisor-confirm"))
    assert text_of(driver, "advisor-confirm").startswith("End the override (Tier 1 long_bias, 12m")
    driver.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    try:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
        by_testid(driver, "advisor-confirm-yes").click()
        wait(driver, lambda d: text_of(d, "advisor-result").startswith("no answer from the bot"))
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        driver.execute_cdp_cmd("Network.disable", {})
    assert calls == []
    assert displayed(driver, "advisor-revert")  # the operator can try again
    wait(driver, lambda d: text_of(d, "connection").startswith("live"))
    severe_console_messages(driver)  # the failed fetches are logged as errors, by design


def test_unauthorised_action_brings_back_the_token_form(driver, base_status):
    site = start_site(TOKEN, ActionRouter())
    try:
        calls = record_actions(site)
        status = advisor_status(base_status, clamped_disagreement)
        open_with_token(driver, site, status)
        by_testid(driver, "advisor-dismiss").click()
        wait(driver, lambda d: displayed(d, "advisor-confirm"))
        # Rotate the API token right after a poll, so that the POST is the first request to meet it.
        later = advisor_status(base_status, clamped_disagreement, later_sec=1)
        later["ai_regime_advisor"]["opinion"]["ts"] -= 1
        site.board.publish(later)
        wait(driver, lambda d: text_of(d, "bot-time") == later["now_iso"])
        object.__setattr__(site.server.ctx, "token", "rotated")
        by_testid(driver, "advisor-confirm-yes").click()
        wait(driver, lambda d: displayed(d, "token-form"), message="a refused token did not bring the form back")
        assert "no longer accepted" in text_of(driver, "token-error")
        assert not displayed(driver, "main")
        assert calls == []

        by_testid(driver, "token-input").send_keys("rotated", Keys.ENTER)
        wait(driver, lambda d: displayed(d, "main"), message="the new token did not unlock")
        assert text_of(driver, "advisor-result") == "refused (401): missing or wrong bearer token"
        assert calls == []
        assert_only_unauthorised_console_errors(driver)
    finally:
        site.server.stop()


# ---------------------------------------------------------------- end to end


def test_advisor_card_drives_a_running_bot(driver, bot_process, tmp_path):
    """Apply, confirm, Revert and Dismiss on the card change the real bot's state (``/api/status``)."""
    with FakeLLM(Reply.opinion(tier=2, direction="long_bias", conviction=80, rationale="clean uptrend")) as llm:
        env = {
            "AI_REGIME_ADVISOR_ENABLED": "true",
            "AI_BASE_URL": llm.url,
            "AI_MODEL": "local-test",
            "AI_REGIME_INTERVAL_SEC": "1800",
            "REGIME_MIN_DWELL_SEC": "86400",  # mechanical tier 0 all along: the opinion is an upgrade
        }
        args = ["--market", "sim", "--speed", "20", "--port", "0", "--db", str(tmp_path / "card.sqlite3")]
        bot = bot_process(args, env=env)
        port = bot.wait_ready()
        bot.wait_status(lambda s: s["ai_regime_advisor"]["opinion"] is not None)
        severe_console_messages(driver)
        driver.get(f"http://127.0.0.1:{port}/")

        def card_state(d: WebDriver) -> str:
            return by_testid(d, "advisor-card").get_attribute("data-state")

        def advisor_now() -> dict:
            return bot.get_json("/api/status")[1]["ai_regime_advisor"]

        def act(button: str, state: str) -> None:
            by_testid(driver, button).click()
            wait(driver, lambda d: displayed(d, "advisor-confirm"), message=f"{button}: no confirmation")
            by_testid(driver, "advisor-confirm-yes").click()
            wait(driver, lambda d: card_state(d) == state, timeout=15, message=f"{button}: card never showed {state}")

        wait(driver, lambda d: card_state(d) == "disagree", timeout=15, message="no disagreement shown")
        assert text_of(driver, "advisor-ai").endswith("Tier 2 long_bias")
        assert "clean uptrend" in text_of(driver, "advisor-rationale")

        act("advisor-apply", "override")
        override = advisor_now()["override"]
        assert override["active"] is True and (override["tier"], override["direction"]) == (1, "long_bias")
        assert "override applied" in text_of(driver, "advisor-result")

        act("advisor-revert", "disagree")
        block = advisor_now()
        assert block["override"]["active"] is False and block["history"][0]["action"] == "reverted"

        act("advisor-dismiss", "agree")  # a dismissed disagreement is shown neutral
        block = advisor_now()
        assert block["dismissed"] is True and block["history"][0]["action"] == "dismissed"
        assert_clean_console(driver)
        assert bot.terminate() == 0


def test_the_headline_names_a_direction_flip(driver, site, base_status):
    """The server words the headline (a long to short flip is not "raising the tier"); the page shows it."""
    headline = "AI disagrees: it would raise the tier and flip the direction from long_bias to short_bias"

    def block(now):
        opinion = advisor_opinion(now, tier=2, direction="short_bias", agreement="ai_upgrade")
        return advisor_block(now, opinion={**opinion, "headline": headline})

    open_page(driver, site, advisor_status(base_status, block, mech=(1, "long_bias")))
    assert card_state(driver) == "disagree"
    assert text_of(driver, "advisor-headline") == headline
    assert text_of(driver, "advisor-ai") == "AI: Tier 2 short_bias"
    assert_clean_console(driver)
