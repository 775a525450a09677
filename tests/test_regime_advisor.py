"""The advisor's runtime: worker, scheduling, opinions, operator actions, override lifetime, persistence.

The LLM is the local OpenAI-compatible server of ``fake_llm``, reached by the
real ``openai`` client from the advisor's worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SIM_START, StepClock, make_settings, make_sim_bot, run_ticks
from fake_llm import FakeLLM, Reply

from advisor.runtime import RegimeAdvisor
from ai_advisor import Panel
from bot import build_bot
from clock import SimClock
from errors import ActionRefused, ConfigError
from loop.cycle import Bot
from market.sim import SimulatedMarket
from store.sqlite import SQLiteStore
from vocabulary import TierState

LOCAL = "local-test"
PAIR = "XDGUSD"
T0 = 1_800_000_000.0
SYM, LONG, SHORT = "symmetric", "long_bias", "short_bias"
MECH0 = TierState(0, SYM, T0 - 1000)


def advisor_settings(llm: FakeLLM, **overrides):
    values = {
        "AI_REGIME_ADVISOR_ENABLED": True,
        "AI_BASE_URL": llm.url,
        "AI_MODEL": LOCAL,
        "AI_INSTRUCT_TIMEOUT_SEC": 10.0,
    }
    return make_settings(**{**values, **overrides})


def wait_idle(advisor: RegimeAdvisor, timeout: float = 10.0) -> None:
    """Wait (wall time) until the worker has answered what it was given."""
    deadline = time.monotonic() + timeout
    while advisor.worker.busy:
        assert time.monotonic() < deadline, "the advisor worker never answered"
        threading.Event().wait(0.005)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        threading.Event().wait(0.005)


class Harness:
    """A RegimeAdvisor with a real store, a real worker and a controlled mechanical tier."""

    def __init__(self, settings, tmp_path: Path, panel_clock: StepClock | None = None) -> None:
        self.store = SQLiteStore(tmp_path / "advisor.sqlite3")
        self.errors: list[tuple[str, str, float]] = []
        panel = Panel.from_settings(settings, monotonic=panel_clock) if panel_clock else None
        self.advisor = RegimeAdvisor(
            settings, store=self.store, record_error=lambda *e: self.errors.append(e), panel=panel
        )
        self.advisor.start()
        self.now = T0
        self.mech = MECH0
        self.price = 0.10
        self.capacity = "normal"
        self.contexts = 0

    def step(self, dt: float = 0.0, **kwargs) -> None:
        self.now += dt
        args = {"mech": self.mech, "agreement": "full", "capacity_band": self.capacity, "price": self.price}
        args.update(kwargs)
        self.advisor.step(self.now, ready=True, make_context=self._context, **args)

    def _context(self) -> dict:
        self.contexts += 1
        return {"n": self.contexts}

    def opinion_round(self, dt: float = 0.0) -> dict | None:
        """Step (maybe submitting), let the LLM answer, step again to consume."""
        self.step(dt)
        wait_idle(self.advisor)
        self.step()
        return self.advisor.opinion

    def status(self) -> dict:
        return self.advisor.status_block(
            self.now, mech=self.mech, capacity_band=self.capacity, directional_enabled=True, ready=True
        )

    def apply(self, **payload):
        return self.advisor.apply(
            {"action": "ai_regime_override", **payload},
            self.now,
            mech=self.mech,
            capacity_band=self.capacity,
            directional_enabled=True,
        )

    def revert(self, **payload):
        return self.advisor.revert({"action": "ai_regime_revert", **payload}, self.now, mech=self.mech)

    def dismiss(self, **payload):
        return self.advisor.dismiss({"action": "ai_regime_dismiss", **payload}, self.now, mech=self.mech)

    def close(self) -> None:
        self.advisor.stop()
        self.store.close()


@pytest.fixture
def harness(llm, tmp_path) -> Iterator[Harness]:
    h = Harness(advisor_settings(llm), tmp_path)
    yield h
    h.close()


def refused(call, kind: str = "refused") -> str:
    with pytest.raises(ActionRefused) as exc:
        call()
    assert exc.value.kind == kind
    return str(exc.value)


# ---------------------------------------------------------------- opinions


def test_opinion_is_classified_recorded_with_the_price_and_scored_later(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=2, direction=LONG, conviction=77, rationale="trend", watch_for="a break"))
    opinion = harness.opinion_round()
    assert opinion is not None and harness.advisor.last_run_reason == "first run"
    block = harness.status()
    shown = block["opinion"]
    assert (shown["recommended_tier"], shown["recommended_direction"], shown["conviction"]) == (2, LONG, 77)
    assert shown["agreement"] == "ai_upgrade" and shown["panelist"] == "custom" and shown["applicable"] is True
    assert shown["apply_preview"] == {"tier": 1, "direction": LONG, "clamped": True}
    assert block["history"][0]["action"] == "pending" and block["history"][0]["agreement"] == "ai_upgrade"
    (row,) = harness.store.ai_opinions(PAIR)
    assert (row["ts"], row["price"], row["mechanical_tier"], row["ai_tier"]) == (T0, 0.10, 0, 2)
    assert (row["rationale"], row["watch_for"], row["hit"]) == ("trend", "a break", None)

    harness.price = 0.102  # up 2%: the long_bias call was right
    harness.step(1799.0)
    assert harness.store.ai_opinions(PAIR)[0]["hit"] is None
    harness.step(1.0)
    row = harness.store.ai_opinions(PAIR)[0]
    assert (row["price_after"], row["hit"]) == (0.102, True)
    card = harness.status()["scorecard"]
    assert card["by_panelist"] == {"custom": {"scored": 1, "hits": 1, "hit_rate": 1.0}}
    assert card["by_agreement"] == {"ai_upgrade": {"scored": 1, "hits": 1, "hit_rate": 1.0}}


def test_a_failed_run_keeps_the_previous_opinion_and_reports_the_error(harness, llm):
    llm.script(LOCAL, [Reply.opinion(tier=0, direction=SYM), Reply.error(500, "down")])
    first = harness.opinion_round()
    assert harness.status()["opinion"]["agreement"] == "agree"
    assert harness.status()["history"][0]["action"] == "none"
    harness.opinion_round(300.0)
    assert harness.advisor.opinion is first
    assert harness.status()["last_error"].startswith("HTTP 500")
    assert len(harness.store.ai_opinions(PAIR)) == 1


def test_a_new_opinion_supersedes_a_pending_one_and_clears_a_dismissal(harness, llm):
    llm.script(LOCAL, [Reply.opinion(tier=1, direction=LONG), Reply.opinion(tier=1, direction=SHORT)])
    harness.opinion_round()
    harness.dismiss()
    assert harness.status()["dismissed"] is True
    harness.opinion_round(300.0)
    block = harness.status()
    assert block["dismissed"] is False and block["opinion"]["recommended_direction"] == SHORT
    assert [e["action"] for e in block["history"]] == ["pending", "dismissed"]
    harness.opinion_round(300.0)
    assert [e["action"] for e in harness.status()["history"]] == ["pending", "none", "dismissed"]


def test_history_is_bounded(llm, tmp_path):
    h = Harness(advisor_settings(llm, AI_REGIME_HISTORY_SIZE=3), tmp_path)
    try:
        for _ in range(5):
            h.opinion_round(300.0)
        assert len(h.status()["history"]) == 3 and len(h.store.ai_opinions(PAIR)) == 5
    finally:
        h.close()


# ---------------------------------------------------------------- scheduling through the worker


def test_periodic_and_event_runs_respect_the_debounce(harness, llm):
    harness.opinion_round()
    assert len(llm.calls()) == 1
    harness.opinion_round(299.0)
    assert len(llm.calls()) == 1  # not yet periodic
    harness.opinion_round(1.0)
    assert len(llm.calls()) == 2 and harness.advisor.last_run_reason == "periodic"
    harness.mech = TierState(1, LONG, harness.now)
    harness.opinion_round(10.0)
    assert len(llm.calls()) == 2  # the tier changed, but the last run was 10 s ago
    assert harness.status()["next_run_in_sec"] == 50.0
    harness.opinion_round(50.0)
    assert len(llm.calls()) == 3 and harness.advisor.last_run_reason == "mechanical tier change"
    harness.step(60.0, agreement="conflict")
    wait_idle(harness.advisor)
    assert len(llm.calls()) == 4 and harness.advisor.last_run_reason == "consensus agreement change"


def test_no_run_while_every_panelist_cools_down(llm, tmp_path):
    clock = StepClock()
    settings = advisor_settings(llm, AI_PANELIST_MAX_FAILURES=1, AI_PANELIST_COOLDOWN_SEC=900)
    h = Harness(settings, tmp_path, panel_clock=clock)
    try:
        llm.script(LOCAL, Reply.error(500))
        h.opinion_round()
        assert len(llm.calls()) == 1 and h.advisor.panel.all_cooling()
        h.opinion_round(600.0)  # periodic time, but nobody to ask
        assert len(llm.calls()) == 1 and h.advisor.skipped_cooling >= 1
        assert h.status()["next_run_in_sec"] == 900.0
        clock.t += 900
        llm.script(LOCAL, Reply.opinion())
        h.opinion_round(1.0)
        assert len(llm.calls()) == 2 and h.advisor.opinion is not None
    finally:
        h.close()


def test_nothing_is_asked_before_the_models_are_ready(harness, llm):
    harness.advisor.step(T0, mech=MECH0, agreement="full", capacity_band="normal", price=0.1, ready=False,
                         make_context=lambda: {})  # fmt: skip
    wait_idle(harness.advisor)
    assert llm.calls() == [] and harness.status()["next_run_in_sec"] is not None


# ---------------------------------------------------------------- actions and rails


def test_apply_clamps_to_one_tier_and_becomes_the_effective_tier(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=2, direction=LONG, conviction=80))
    harness.opinion_round()
    result = harness.apply()
    assert result["clamped"] is True and "recommended tier 2" in result["message"]
    assert result["override"]["tier"] == 1 and result["override"]["remaining_sec"] == 1800.0
    state, source = harness.advisor.effective(harness.mech)
    assert (state.tier, state.direction, source) == (1, LONG, "ai_override")
    block = harness.status()
    assert block["override"] == {
        "active": True,
        "tier": 1,
        "direction": LONG,
        "applied_at": T0,
        "expires_at": T0 + 1800,
        "remaining_sec": 1800.0,
        "source_conviction": 80,
    }
    assert block["history"][0]["action"] == "applied"
    assert block["opinion"]["applicable"] is True  # the same opinion may be re-applied (a new TTL)
    again = harness.apply(ttl_sec=99_999)
    assert again["ttl_clamped"] is True and again["override"]["expires_at"] == T0 + 3600
    assert again["replaced_override"] is True


def test_every_refusal_changes_nothing(harness, llm):
    assert refused(harness.apply).startswith("there is no current opinion")
    llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG, conviction=30))
    harness.opinion_round()
    before = harness.status()
    assert refused(harness.apply) == "conviction 30 is below the floor of 50"
    assert harness.status()["opinion"]["blocked_reason"] == "conviction 30 is below the floor of 50"
    assert (
        refused(lambda: harness.apply(ttl_sec="600"), "malformed") == "'ttl_sec' must be a number of seconds, got '600'"
    )
    assert refused(lambda: harness.apply(ttl_sec=True), "malformed").startswith("'ttl_sec' must be a number")
    assert refused(lambda: harness.apply(ttl=600), "malformed") == "unknown field(s) 'ttl' for ai_regime_override"
    assert refused(lambda: harness.revert(ttl_sec=5), "malformed").startswith("unknown field(s) 'ttl_sec'")
    assert refused(harness.revert) == "no override is active"
    assert harness.status() == before


def test_an_opinion_older_than_the_limit_is_refused_with_its_age_and_shown_stale(llm, tmp_path):
    h = Harness(advisor_settings(llm, AI_REGIME_INTERVAL_SEC=3600, AI_OPINION_MAX_AGE_SEC=600), tmp_path)
    try:
        llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG, conviction=80))
        h.opinion_round()
        received = h.advisor.opinion["ts"]
        h.now = received + 240
        fresh = h.status()
        assert fresh["opinion_max_age_sec"] == 600
        assert fresh["opinion"]["age_sec"] == 240 and fresh["opinion"]["stale"] is False
        assert fresh["opinion"]["stale_in_sec"] == 360 and fresh["opinion"]["applicable"] is True
        h.now = received + 900
        before = h.status()
        assert before["opinion"]["stale"] is True and before["opinion"]["stale_in_sec"] == 0
        assert before["opinion"]["applicable"] is False
        reason = "the opinion is 15 min old (limit 10 min); wait for a fresh one"
        assert before["opinion"]["blocked_reason"] == reason
        assert refused(h.apply) == reason
        assert h.status() == before and h.advisor.override is None  # the refusal changed nothing
        h.opinion_round(3600.0)  # a fresh opinion may be applied again
        assert h.status()["opinion"]["stale"] is False
        assert h.apply()["override"]["tier"] == 1
    finally:
        h.close()


def test_the_headline_names_a_direction_flip(harness, llm):
    harness.mech = TierState(1, LONG, T0 - 500)
    llm.script(LOCAL, [Reply.opinion(tier=1, direction=SHORT), Reply.opinion(tier=2, direction=SHORT)])
    harness.opinion_round()
    opinion = harness.status()["opinion"]
    assert opinion["agreement"] == "ai_flip"
    assert opinion["headline"] == "AI disagrees: it would flip the direction from long_bias to short_bias"
    harness.opinion_round(300.0)
    assert harness.status()["opinion"]["headline"] == (
        "AI disagrees: it would raise the tier and flip the direction from long_bias to short_bias"
    )
    harness.mech = TierState(2, SHORT, T0)  # the headline follows the mechanical tier as it moves
    assert harness.status()["opinion"]["headline"] == "AI agrees with the mechanical tier"


def test_a_provider_error_echoing_the_key_is_recorded_without_it(llm, tmp_path, caplog):
    key = "sk-test-4f9d2c7b1e8a6f3d5c0b9a7e"
    h = Harness(advisor_settings(llm, AI_API_KEY=key), tmp_path)
    try:
        echo = f"Incorrect API key provided: {key}. Sent header: Authorization: Bearer {key}"
        llm.script(LOCAL, Reply.error(401, echo))
        with caplog.at_level("DEBUG"):
            h.opinion_round()
        assert llm.calls()[0].headers["authorization"] == f"Bearer {key}"  # the real client sent it
        block = h.status()
        assert block["last_error"].startswith("HTTP 401: ")
        assert "Incorrect API key provided: ***" in block["last_error"]
        text = repr(block)
        assert key not in text and key[:12] not in text
        assert block["panel"][0]["last_error"] == block["last_error"]
        assert key not in caplog.text and "Incorrect API key provided: ***" in caplog.text
    finally:
        h.close()


def test_capacity_stop_blocks_an_upgrade_and_ends_an_upgrading_override(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=1, direction=SHORT, conviction=90))
    harness.opinion_round()
    harness.capacity = "stop"
    assert refused(harness.apply) == "capacity band is stop: upgrades are blocked"
    harness.capacity = "normal"
    harness.apply()
    harness.capacity = "stop"
    harness.step(15.0)
    block = harness.status()
    assert block["override"]["active"] is False and block["history"][0]["action"] == "reverted"


def test_an_override_expires_by_itself(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG))
    harness.opinion_round()
    harness.apply(ttl_sec=60)
    harness.step(59.0)
    assert harness.status()["override"]["remaining_sec"] == 1.0
    harness.step(1.0)
    block = harness.status()
    assert block["override"]["active"] is False and block["history"][0]["action"] == "expired"
    assert harness.advisor.effective(harness.mech) == (harness.mech, "mechanical")


def test_revert_ends_the_override_at_once(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG))
    harness.opinion_round()
    harness.apply()
    result = harness.revert()
    assert result["message"].startswith("override tier 1 long_bias reverted")
    block = harness.status()
    assert block["override"]["active"] is False and block["history"][0]["action"] == "reverted"
    assert refused(harness.revert) == "no override is active"


def test_dismiss_rules(harness, llm):
    assert refused(harness.dismiss) == "there is no current opinion to dismiss"
    llm.script(LOCAL, [Reply.opinion(tier=0, direction=SYM), Reply.opinion(tier=1, direction=LONG)])
    harness.opinion_round()
    assert refused(harness.dismiss).startswith("the current opinion agrees")
    harness.opinion_round(300.0)
    harness.apply()
    assert refused(harness.dismiss).startswith("the current opinion is applied as an override")
    harness.revert()
    assert harness.dismiss()["message"].startswith("opinion dismissed (ai_upgrade)")
    assert refused(harness.dismiss) == "the current opinion is already dismissed"
    assert refused(harness.apply) == "the current opinion was dismissed; wait for the next one"
    assert harness.status()["opinion"]["applicable"] is False


def test_agreement_follows_the_mechanical_tier_as_it_moves(harness, llm):
    llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG))
    harness.opinion_round()
    harness.mech = TierState(1, LONG, harness.now)
    block = harness.status()
    assert block["opinion"]["agreement"] == "agree" and block["opinion"]["agreement_when_received"] == "ai_upgrade"
    assert block["opinion"]["applicable"] is False and block["opinion"]["apply_preview"] is None


def test_a_disabled_advisor_refuses_actions_and_never_asks(llm, tmp_path):
    h = Harness(make_settings(), tmp_path)
    try:
        h.step()
        assert refused(h.apply) == "the AI advisor is disabled (AI_REGIME_ADVISOR_ENABLED=false)"
        assert h.status()["enabled"] is False and h.status()["opinion"] is None and llm.calls() == []
    finally:
        h.close()


# ---------------------------------------------------------------- the bot: effective tier, persistence


def make_bot(db: Path, llm: FakeLLM, at: float | None = None, **overrides) -> Bot:
    """A sim bot whose mechanical tier cannot move for a day (dwell), so opinions disagree predictably."""
    settings = advisor_settings(llm, REGIME_MIN_DWELL_SEC=86_400, **overrides)
    clock = SimClock(at if at is not None else SIM_START)
    market = SimulatedMarket(clock, seed=7, start=SIM_START)
    bot = build_bot(settings, mode="sim", clock=clock, market=market, store=SQLiteStore(db))
    bot.start()
    return bot


def consume_opinion(bot: Bot) -> None:
    bot.tick()
    wait_idle(bot.advisor)
    bot.tick()
    assert bot.advisor.opinion is not None


def test_the_bot_keeps_cycling_while_the_llm_hangs(tmp_path, llm):
    llm.script(LOCAL, [Reply.opinion(hang=True), Reply.opinion(tier=0, direction=SYM)])
    bot = make_sim_bot(
        tmp_path / "db.sqlite3",
        AI_REGIME_ADVISOR_ENABLED=True,
        AI_BASE_URL=llm.url,
        AI_MODEL=LOCAL,
        AI_INSTRUCT_TIMEOUT_SEC=120,
    )
    try:
        run_ticks(bot, 1)
        assert bot.advisor.last_run_ts is not None
        run_ticks(bot, 200)  # 50 simulated minutes: several periodic runs are due meanwhile
        wait_until(lambda: llm.calls())  # the worker's first call has reached the (hanging) server
        status = bot.status()
        assert status["health"]["cycles"] == 201
        assert status["ai_regime_advisor"]["in_flight"] is True and status["ai_regime_advisor"]["opinion"] is None
        assert len(llm.calls()) == 1 and bot.advisor.worker.replaced >= 5  # newest context wins, no backlog
        llm.release()
        wait_idle(bot.advisor)
        run_ticks(bot, 1)
        assert bot.advisor.opinion is not None
        assert len(llm.calls()) == 2  # then the one queued (newest) context was asked
    finally:
        bot.shutdown()
        bot.store.close()


def test_an_override_drives_the_effective_tier_while_the_mechanical_one_is_still_shown(tmp_path, llm):
    llm.script(LOCAL, Reply.opinion(tier=1, direction=SHORT, conviction=66))
    bot = make_bot(tmp_path / "db.sqlite3", llm)
    try:
        consume_opinion(bot)
        result = bot.ai_regime_override({"action": "ai_regime_override", "ttl_sec": 900})
        assert result["saved"] is True
        tier = bot.status()["regime_tier"]
        assert tier["mechanical"]["tier"] == 0 and tier["mechanical"]["direction"] == SYM
        assert tier["effective"] == {"tier": 1, "direction": SHORT, "source": "ai_override"}
        assert tier["suppressed_side"] is None
        applied = bot.advisor.override.opinion_ts
        run_ticks(bot, 61)  # 915 simulated seconds
        tier = bot.status()["regime_tier"]
        assert tier["effective"]["source"] == "mechanical"
        # The applied opinion's row (newer opinions may have arrived meanwhile, as the worker answers).
        history = bot.status()["ai_regime_advisor"]["history"]
        assert next(h["action"] for h in history if h["ts"] == applied) == "expired"
    finally:
        bot.shutdown()
        bot.store.close()


def test_override_survives_a_restart_while_live_and_is_cleared_once_expired(tmp_path, llm):
    db = tmp_path / "db.sqlite3"
    llm.script(LOCAL, Reply.opinion(tier=1, direction=LONG, conviction=70))
    bot = make_bot(db, llm)
    consume_opinion(bot)
    bot.ai_regime_override({"action": "ai_regime_override", "ttl_sec": 1200})
    applied_at = bot.clock.now()
    bot.advisor.stop()
    bot.store.close()  # a crash: no shutdown snapshot, only what the action saved

    live = make_bot(db, llm, at=applied_at + 600)
    try:
        block = live.status()["ai_regime_advisor"]["override"]
        assert block["active"] is True and block["remaining_sec"] == 600.0 and block["tier"] == 1
        assert live.status()["regime_tier"]["effective"]["source"] == "ai_override"
        assert live.status()["ai_regime_advisor"]["history"] == []  # opinion history is in memory only
    finally:
        live.advisor.stop()
        live.store.close()

    expired = make_bot(db, llm, at=applied_at + 1200)
    try:
        assert expired.status()["ai_regime_advisor"]["override"]["active"] is False
        expired.save_snapshot(expired.clock.now())
        assert expired.store.load_state(f"snapshot:{PAIR}")["advisor"]["override"] is None
    finally:
        expired.advisor.stop()
        expired.store.close()

    disabled = build_bot(
        make_settings(),
        mode="sim",
        clock=SimClock(applied_at + 1210),
        market=SimulatedMarket(SimClock(applied_at), seed=7, start=SIM_START),
        store=SQLiteStore(db),
    )
    disabled.store.save_state(
        f"snapshot:{PAIR}",
        {**disabled.store.load_state(f"snapshot:{PAIR}"), "advisor": {"override": {"tier": 1}}},
        applied_at,
    )
    with pytest.raises(ConfigError, match=r"advisor\.override\.direction = None"):
        disabled.start()  # a malformed override record stops the start (fail closed), not a crash
    disabled.store.close()
