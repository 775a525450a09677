"""The wired bot on the simulator and a simulated clock: the cycle end to end."""

import json

import pytest
from conftest import make_sim_bot, run_ticks

from errors import BadData, ConfigError, RetryLater
from hmm_regime_detector import RegimeDetector
from regime.direction_skill import DirectionSkill
from store.sqlite import SQLiteStore
from vocabulary import BULLISH, RANGING, RegimeSignal


def depth(bot, model="primary"):
    return bot.status()["hmm"][model]["training_depth"]


def test_cold_start_trains_shallow_then_climbs_to_full_by_itself(tmp_path):
    bot = make_sim_bot(tmp_path / "cold.sqlite3", LOOP_INTERVAL_SEC=60)
    assert bot.store.count_candles("XDGUSD", 1) == 0
    bot.tick()
    # The store was empty: the 720-candle window Kraken (here the simulator) serves.
    first = depth(bot)
    assert (first["current_candles"], first["quality_tier"], first["confidence_modifier"]) == (720, "shallow", 0.70)
    assert depth(bot, "secondary")["quality_tier"] == "baseline"  # 720 of 1440 fifteen-minute candles
    seen = [first["quality_tier"]]
    for i in range(3300):  # 55 simulated hours, one cycle a minute
        bot.clock.advance(60)
        bot.tick()
        if i % 10 == 0 or i == 3299:
            tier = depth(bot)["quality_tier"]
            if tier != seen[-1]:
                seen.append(tier)
    assert seen == ["shallow", "baseline", "deep", "full"]
    final = depth(bot)
    assert final["current_candles"] == 4000 and final["estimated_full_at"] is None
    reasons = [(r["model"], r["reason"], r["quality_tier"], r["candles"]) for r in bot.stats.retrains]
    primary = [r for r in reasons if r[0] == "primary"]
    assert primary[0] == ("primary", "initial", "shallow", 720)
    assert ("primary", "tier_improvement", "baseline", 1000) in primary
    assert ("primary", "tier_improvement", "deep", 2500) in primary
    assert ("primary", "tier_improvement", "full", 4000) in primary
    assert ("secondary", "tier_improvement", "deep", 900) in reasons
    bot.store.close()


def fixed_signal(bot, signal):
    bot.primary.detector.infer_rows = lambda rows: signal


def test_modifier_changes_the_tier_while_raw_confidence_is_reported_unchanged(tmp_path, monkeypatch):
    bot = make_sim_bot(tmp_path / "m.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_MIN_DWELL_SEC=0)
    # The fixed signal from the first evaluation on, so the model's own first signal moves no tier.
    signal = RegimeSignal(BULLISH, 0.55, 0.6, (0.05, 0.35, 0.60))
    monkeypatch.setattr(RegimeDetector, "infer_rows", lambda self, rows: signal)
    bot.tick()
    assert bot.primary.confidence_modifier == 0.70  # shallow
    run_ticks(bot, 8, 15)
    st = bot.status()
    assert st["hmm"]["primary"]["confidence"] == 0.55  # raw, unchanged
    assert st["hmm"]["policy"]["raw_confidence"] == 0.55
    assert st["hmm"]["policy"]["confidence_modifier"] == 0.70
    assert st["hmm"]["policy"]["effective_confidence"] == pytest.approx(0.385)
    assert st["regime_tier"]["mechanical"]["tier"] == 1  # 0.385 < 0.50: not tier 2
    assert st["regime_tier"]["mechanical"]["direction"] == "long_bias"
    row = bot.store.tier_transitions("XDGUSD")[0]
    assert (row["to_tier"], row["raw_confidence"], row["effective_confidence"]) == (1, 0.55, pytest.approx(0.385))
    assert "to tier 1" in row["reason"]
    bot.store.close()


def test_consensus_modifier_is_the_smaller_of_the_two(tmp_path):
    bot = make_sim_bot(tmp_path / "c.sqlite3", CONSENSUS_RULE="table")
    bot.tick()
    st = bot.status()
    assert st["hmm"]["policy"]["source"] == "consensus"
    assert st["hmm"]["consensus"]["rule"] == st["hmm"]["policy"]["rule"] == "table"
    assert st["hmm"]["policy"]["confidence_modifier"] == min(0.70, 0.85)
    bot.store.close()


def test_default_rule_gates_on_the_primary_alone_and_says_so(tmp_path):
    bot = make_sim_bot(tmp_path / "p.sqlite3")
    bot.tick()
    st = bot.status()
    assert st["hmm"]["secondary"]["trained"]  # trained and shown, but not gating
    assert st["hmm"]["consensus"]["rule"] == "primary" and not st["hmm"]["consensus"]["active"]
    assert st["hmm"]["policy"]["source"] == "primary"
    assert st["hmm"]["policy"]["confidence_modifier"] == bot.primary.confidence_modifier
    bot.store.close()


def test_regime_history_is_appended_each_evaluation_and_trimmed_to_30_minutes(tmp_path):
    bot = make_sim_bot(tmp_path / "h.sqlite3")
    run_ticks(bot, 4 * 60 * 2, 15)  # two simulated hours, four cycles a minute
    history = bot.status()["regime_history_30m"]
    now = bot.clock.now()
    assert all(now - 1800 <= e["ts"] <= now for e in history)
    # One evaluation per new 1-minute candle: about 30 entries in 30 minutes.
    assert 29 <= len(history) <= 32
    assert set(history[-1]) == {"ts", "regime", "conf"}
    assert history[-1]["regime"] == bot.status()["hmm"]["policy"]["regime"]
    bot.store.close()


def test_shadow_mode_pins_tier_0_and_shows_what_would_be(tmp_path):
    bot = make_sim_bot(
        tmp_path / "s.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_DIRECTIONAL_ENABLED=False, REGIME_MIN_DWELL_SEC=0
    )
    bot.tick()
    fixed_signal(bot, RegimeSignal(BULLISH, 0.95, 0.9, (0.0, 0.05, 0.95)))
    run_ticks(bot, 8, 15)
    tier = bot.status()["regime_tier"]
    assert tier["mechanical"]["tier"] == 0 and tier["mechanical"]["direction"] == "symmetric"
    assert tier["mechanical"]["shadow"] is True
    assert tier["mechanical"]["would_be"]["tier"] == 2  # shallow: 0.95 * 0.70 = 0.665 >= 0.50
    assert tier["effective"] == {"tier": 0, "direction": "symmetric", "source": "mechanical"}
    assert bot.stats.tier_changes == 0
    row = bot.store.tier_transitions("XDGUSD")[0]
    assert row["shadow"] == 1  # stored as an integer
    assert bot.status()["regime_tier"]["recent_transitions"][0]["shadow"] is True


def test_capacity_stop_from_the_grid_blocks_upgrades(tmp_path):
    # One slot and room for two orders: the grid's two entries fill its capacity (band "stop").
    bot = make_sim_bot(
        tmp_path / "cap.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_MIN_DWELL_SEC=0, GRID_SLOTS=1, MAX_OPEN_ORDERS=2
    )
    bot.tick()
    fixed_signal(bot, RegimeSignal(RANGING, 0.9, 0.0, (0.05, 0.9, 0.05)))
    run_ticks(bot, 8, 15)
    assert bot.status()["regime_tier"]["mechanical"]["tier"] == 0
    cap = bot.status()["grid"]["capacity"]
    assert (cap["open_orders"], cap["max_open_orders"], cap["headroom"], cap["band"]) == (2, 2, 0, "stop")
    fixed_signal(bot, RegimeSignal(BULLISH, 0.95, 0.9, (0.0, 0.05, 0.95)))
    run_ticks(bot, 8, 15)
    st = bot.status()["regime_tier"]
    assert st["mechanical"]["tier"] == 0
    assert "capacity stop blocks upgrade" in st["mechanical"]["held_because"]
    assert st["capacity_band"] == "stop"


def test_tier_2_suppresses_the_grids_against_trend_entries_after_the_grace(tmp_path):
    bot = make_sim_bot(tmp_path / "t2.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_MIN_DWELL_SEC=0)
    bot.tick()
    fixed_signal(bot, RegimeSignal(BULLISH, 0.95, 0.9, (0.0, 0.05, 0.95)))
    run_ticks(bot, 8, 15)
    status = bot.status()
    assert status["regime_tier"]["mechanical"]["tier"] == 2
    assert status["regime_tier"]["suppressed_side"] == "sell"
    grid = status["grid"]
    assert grid["posture"]["tier"] == 2 and grid["posture"]["suppressed_side"] == "sell"
    run_ticks(bot, 6, 15)  # past REGIME_SUPPRESSION_GRACE_SEC (60 s)
    grid = bot.status()["grid"]
    entries = [o for o in grid["open_orders"] if o["role"] == "entry"]
    assert entries and all(o["side"] == "buy" for o in entries)
    assert all(row["A"] in ("suppressed", "exit") for row in grid["slots"])


def test_restart_restores_tier_state_and_models_without_retraining(tmp_path):
    db = tmp_path / "r.sqlite3"
    bot = make_sim_bot(db)
    run_ticks(bot, 400, 15)
    before = bot.status()
    bot.shutdown()
    bot.store.close()

    again = make_sim_bot(db, start=int(bot.clock.now()))
    assert again.primary.trained and again.secondary.trained
    assert again.primary.trained_at == before["hmm"]["primary"]["last_trained_at"]
    assert again.primary.detector.transition_matrix() == bot.primary.detector.transition_matrix()
    assert again.tier_state == bot.tier_state
    again.tick()
    assert again.stats.retrains == []  # nothing retrained on start
    after = again.status()
    assert (
        after["hmm"]["primary"]["training_depth"]["current_candles"]
        == before["hmm"]["primary"]["training_depth"]["current_candles"]
    )
    assert after["regime_history_30m"][: len(before["regime_history_30m"]) - 2]  # restored, not empty
    again.store.close()


def test_an_untrustworthy_snapshot_stops_the_start_and_an_older_model_version_retrains(tmp_path):
    db = tmp_path / "u.sqlite3"
    bot = make_sim_bot(db)
    bot.tick()
    bot.shutdown()
    good = bot.store.load_state("snapshot:XDGUSD")
    bad = {**good, "tier": {"tier": 7, "direction": "sideways", "since": 0}}
    bot.store.save_state("snapshot:XDGUSD", bad, 0)
    bot.store.close()
    with pytest.raises(ConfigError, match=r"tier\.tier = 7: must be one of 0, 1, 2.*--restore-previous"):
        make_sim_bot(db)
    store = SQLiteStore(db)
    assert store.load_state("snapshot:XDGUSD") == bad  # refused, not changed
    malformed = json.loads(json.dumps(good))
    malformed["models"]["primary"]["model"]["covars"] = {"shape": [1], "f64": "AAAAAAAAAAA="}
    store.save_state("snapshot:XDGUSD", malformed, 0)
    store.close()
    with pytest.raises(ConfigError, match=r"primary model: model snapshot field covars is malformed"):
        make_sim_bot(db)

    older = json.loads(json.dumps(good))  # a model of another version is retrained, not reinterpreted
    older["models"]["primary"]["model"]["version"] = -1
    store = SQLiteStore(db)
    store.save_state("snapshot:XDGUSD", older, 0)
    store.close()
    again = make_sim_bot(db)
    assert not again.primary.trained and again.secondary.trained
    assert again.tier_state == bot.tier_state
    again.tick()
    assert [r["model"] for r in again.stats.retrains] == ["primary"]
    again.store.close()


def test_training_failure_keeps_the_last_good_model_and_is_reported(tmp_path):
    bot = make_sim_bot(tmp_path / "f.sqlite3", HMM_SECONDARY_ENABLED=False)
    bot.tick()
    good = bot.primary.detector

    def broken_fit(*args, **kwargs):
        raise BadData("every initialisation of the HMM failed")

    bot.primary._make_detector = lambda: type("D", (), {"fit": broken_fit})()
    bot.clock.advance(86400)
    bot.tick()
    assert bot.primary.detector is good
    st = bot.status()
    assert "training failed" in st["hmm"]["primary"]["last_error"]
    assert st["health"]["errors"][0]["source"] == "primary model"
    assert bot.stats.retrains[-1]["ok"] is False
    bot.clock.advance(60)
    bot.tick()
    assert len(bot.stats.retrains) == 2  # no retry storm: failures back off
    bot.store.close()


def test_market_outage_keeps_the_loop_cycling(tmp_path):
    bot = make_sim_bot(tmp_path / "o.sqlite3")
    run_ticks(bot, 10, 15)
    real = bot.market.fetch_ohlc

    def down(*args, **kwargs):
        raise RetryLater("Kraken: EService:Unavailable")

    bot.market.fetch_ohlc = down
    cycles = bot.cycles
    run_ticks(bot, 40, 15)  # ten minutes of outage
    assert bot.cycles == cycles + 40
    st = bot.status()
    assert "EService:Unavailable" in st["hmm_data_pipeline"]["1m"]["last_error"]
    assert st["hmm_data_pipeline"]["1m"]["status"] == "stale"
    assert st["health"]["ok"] is False
    assert st["hmm"]["primary"]["trained"]
    bot.market.fetch_ohlc = real
    run_ticks(bot, 8, 15)
    st = bot.status()
    assert st["hmm_data_pipeline"]["1m"]["status"] == "ok"
    assert st["hmm_data_pipeline"]["1m"]["rows_available"] == 720 + 2 + 12  # the gap was filled
    bot.store.close()


def test_deep_decay_reports_raw_and_effective_samples(tmp_path, caplog):
    caplog.set_level("INFO")
    bot = make_sim_bot(
        tmp_path / "d.sqlite3", HMM_SECONDARY_ENABLED=False, HMM_DEEP_DECAY_ENABLED=True, HMM_DEEP_DECAY_HALFLIFE=200
    )
    bot.tick()
    d = depth(bot)
    assert d["effective_samples"] > d["raw_samples"] > 0
    record = bot.stats.retrains[0]
    assert record["effective_samples"] == d["effective_samples"]
    assert f"samples raw {d['raw_samples']} / effective {d['effective_samples']}" in caplog.text


def test_decay_is_off_by_default(tmp_path):
    bot = make_sim_bot(tmp_path / "nd.sqlite3", HMM_SECONDARY_ENABLED=False)
    bot.tick()
    d = depth(bot)
    assert d["effective_samples"] == d["raw_samples"] == 720 - 35


def test_status_payload_has_the_documented_shape(tmp_path):
    bot = make_sim_bot(tmp_path / "st.sqlite3")
    run_ticks(bot, 5, 15)
    st = json.loads(json.dumps(bot.status(), allow_nan=False))
    assert {
        "mode",
        "pair",
        "now",
        "price",
        "hmm",
        "hmm_data_pipeline",
        "regime_tier",
        "regime_history_30m",
        "ai_regime_advisor",
        "grid",
        "health",
    } <= set(st)
    assert set(st["hmm"]) == {"primary", "secondary", "consensus", "policy"}
    for model in ("primary", "secondary"):
        assert {
            "trained",
            "regime",
            "confidence",
            "bias_signal",
            "probabilities",
            "transition_matrix",
            "last_trained_at",
            "training_depth",
        } <= set(st["hmm"][model])
    assert set(st["hmm"]["policy"]) >= {
        "raw_confidence",
        "confidence_modifier",
        "effective_confidence",
        "regime",
        "bias_signal",
        "source",
    }
    assert set(st["regime_tier"]) >= {"mechanical", "effective", "suppressed_side"}
    assert set(st["regime_tier"]["mechanical"]) >= {"tier", "direction", "since"}
    assert st["regime_tier"]["effective"]["source"] == "mechanical"
    assert set(st["hmm_data_pipeline"]) == {"1m", "15m"}
    assert "training_depth" not in st["hmm_data_pipeline"]["1m"]
    assert st["sim"]["true_regime"] in ("BEARISH", "RANGING", "BULLISH")
    assert st["settings"]["API_TOKEN"] == ""
    cycle = st["health"]["cycle_ms"]
    assert cycle["p99"] >= cycle["p50"] > 0 and cycle["last"] > 0
    bot.store.close()


def test_store_faults_are_reported_and_the_loop_goes_on(tmp_path):
    import sqlite3

    db = tmp_path / "sf.sqlite3"
    bot = make_sim_bot(db)
    run_ticks(bot, 4, 15)
    other = sqlite3.connect(db)
    other.execute("DROP TABLE bot_state")
    other.execute("DROP TABLE ohlcv_candles")
    other.commit()
    other.close()
    cycles = bot.cycles
    run_ticks(bot, 12, 15)  # three minutes: syncs and snapshots fail
    assert bot.cycles == cycles + 12
    st = bot.status()
    messages = [e["message"] for e in st["health"]["errors"]]
    assert any("store: saving the state failed" in m for m in messages)
    assert "store: writing candles failed" in st["hmm_data_pipeline"]["1m"]["last_error"]
    assert st["hmm"]["primary"]["trained"]  # the model in memory carries on
    bot.store.close()


def test_directional_tiers_wait_for_the_direction_calls_to_earn_them(tmp_path):
    bot = make_sim_bot(
        tmp_path / "skill.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_MIN_DWELL_SEC=0, REGIME_SKILL_GATE=True
    )
    bot.tick()
    fixed_signal(bot, RegimeSignal(BULLISH, 0.95, 0.9, (0.0, 0.05, 0.95)))
    run_ticks(bot, 4 * 65, 15)  # a little over an hour: the first call is scored
    st = bot.status()["regime_tier"]
    assert st["mechanical"]["tier"] == 0 and st["mechanical"]["wanted_tier"] == 2
    assert st["mechanical"]["held_because"] == "direction calls have not earned tier 2"
    skill = st["direction_skill"]
    assert skill["gate"] is True and skill["scored"] == 1 and skill["earned"] == 0.0
    assert skill["pending_since"] is not None  # the next call, an hour after the first

    # A record of calls that were right 90 times in 100 earns tier 2; the grid skews with it.
    bot.skill = DirectionSkill(hits=90.0, misses=10.0, scored=100, last_call_at=bot.clock.now())
    run_ticks(bot, 4, 15)
    st = bot.status()
    assert st["regime_tier"]["mechanical"]["tier"] == 2
    assert st["regime_tier"]["direction_skill"]["earned"] == 1.0
    assert st["grid"]["posture"]["strength"] == pytest.approx(0.9)

    # The record survives a restart with the snapshot.
    bot.save_snapshot(bot.clock.now())
    again = make_sim_bot(
        tmp_path / "skill.sqlite3", start=int(bot.clock.now()), HMM_SECONDARY_ENABLED=False, REGIME_SKILL_GATE=True
    )
    assert again.skill.hits == pytest.approx(bot.skill.hits) and again.skill.scored == bot.skill.scored
    bot.store.close()
    again.store.close()


def test_the_grid_trades_smaller_while_the_primary_model_expects_larger_moves(tmp_path):
    bot = make_sim_bot(tmp_path / "size.sqlite3", HMM_SECONDARY_ENABLED=False)
    bot.tick()
    fixed_signal(bot, RegimeSignal(RANGING, 0.3, 0.0, (0.1, 0.7, 0.2)))
    run_ticks(bot, 8, 15)
    st = bot.status()
    assert st["regime_tier"]["entry_size"] == 1.0 and st["grid"]["posture"]["size"] == 1.0
    fixed_signal(bot, RegimeSignal(RANGING, 0.05, 0.0, (0.3, 0.45, 0.25)))  # ranging on top, yet 0.55 directional
    run_ticks(bot, 8, 15)
    st = bot.status()
    assert st["regime_tier"]["entry_size"] == 0.5 and st["grid"]["posture"]["size"] == 0.5
    entries = [o for o in st["grid"]["open_orders"] if o["role"] == "entry"]
    assert entries and all(o["volume"] * o["price"] == pytest.approx(10.0, rel=0.01) for o in entries)
    bot.store.close()

    shadow = make_sim_bot(tmp_path / "shadow.sqlite3", HMM_SECONDARY_ENABLED=False, REGIME_DIRECTIONAL_ENABLED=False)
    shadow.tick()
    fixed_signal(shadow, RegimeSignal(RANGING, 0.05, 0.0, (0.3, 0.45, 0.25)))
    run_ticks(shadow, 8, 15)
    assert shadow.status()["regime_tier"]["entry_size"] == 1.0  # shadow mode: the regime does not act
    shadow.store.close()
