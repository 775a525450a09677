"""The health verdict: pure rules, then the wired bot failing for real (cycles, Kraken, a full disk)."""

import http.client
import json
import threading

import pytest
from conftest import SIM_START, make_settings, make_sim_bot, run_ticks

import dashboard
from bot import build_bot
from clock import SimClock
from health import FeedFacts, HealthFacts, verdict
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard
from kraken.public_client import KrakenPublicClient
from loop.cycle import Bot
from loop.runner import Runner
from market.sim import generate
from store.sqlite import SQLiteStore


def facts(**overrides) -> HealthFacts:
    base = {
        "started_at": 0.0,
        "loop_limit_sec": 45.0,
        "failing_cycles": 0,
        "last_failure": None,
        "feeds": (FeedFacts("1m", 1000.0, 180.0, None),),
        "persist_limit_sec": 90.0,
        "last_saved_at": 1000.0,
        "save_error": None,
    }
    return HealthFacts(**{**base, **overrides})


def test_a_working_bot_is_healthy():
    assert verdict(facts(), now=1010.0, loop_age_sec=5.0) == {"ok": True, "reasons": []}


def test_before_the_first_cycle_the_bot_is_not_yet_healthy():
    assert verdict(None, now=0.0, loop_age_sec=None)["ok"] is False
    out = verdict(facts(), now=1010.0, loop_age_sec=None)
    assert out == {"ok": False, "reasons": ["starting: no cycle has completed yet"]}


def test_a_stuck_loop_and_failing_cycles_are_each_a_reason():
    out = verdict(facts(), now=1010.0, loop_age_sec=50.0)
    assert out["reasons"] == ["the main loop has not completed a cycle for 50 s (limit 45 s)"]
    out = verdict(facts(failing_cycles=2, last_failure="ValueError: x"), now=1010.0, loop_age_sec=5.0)
    assert out["ok"] is True  # two in a row can be a blip
    out = verdict(facts(failing_cycles=3, last_failure="ValueError: x"), now=1010.0, loop_age_sec=5.0)
    assert out["reasons"] == ["the last 3 cycles failed: ValueError: x"]


def test_candles_staler_than_the_freshness_limit_make_the_bot_unhealthy():
    feed = FeedFacts("1m", 1000.0, 180.0, "Kraken /0/public/OHLC: api.kraken.com refused the connection")
    assert verdict(facts(feeds=(feed,), last_saved_at=1180.0), now=1180.0, loop_age_sec=1.0)["ok"] is True
    out = verdict(facts(feeds=(feed,), last_saved_at=1300.0), now=1300.0, loop_age_sec=1.0)
    assert out["reasons"] == [
        "1m candles are 5 min old (limit 3 min) "
        "(last error: Kraken /0/public/OHLC: api.kraken.com refused the connection)"
    ]


def test_an_empty_feed_is_given_its_freshness_limit_to_fill():
    empty = FeedFacts("15m", None, 2700.0, None)
    assert verdict(facts(feeds=(empty,), last_saved_at=2000.0), now=2000.0, loop_age_sec=1.0)["ok"] is True
    out = verdict(facts(feeds=(empty,), last_saved_at=3000.0), now=3000.0, loop_age_sec=1.0)
    assert out["reasons"] == ["no 15m candles yet"]


def test_a_state_not_saved_for_longer_than_the_snapshot_interval_allows_is_a_reason():
    out = verdict(facts(save_error="store: saving state failed: database or disk is full"), now=1100.0, loop_age_sec=1)
    assert out["reasons"] == [
        "the state has not been saved for 100 s (limit 90 s): store: saving state failed: database or disk is full"
    ]
    out = verdict(facts(last_saved_at=None), now=100.0, loop_age_sec=1.0)
    assert out["reasons"] == ["nothing saved for 100 s (limit 90 s)"]
    assert verdict(facts(persist_limit_sec=None, last_saved_at=None), now=1100.0, loop_age_sec=1.0)["ok"] is True


# The wired bot ----------------------------------------------------------------------------------


def runner_for(bot: Bot) -> Runner:
    board = StatusBoard(monotonic=bot.clock.now)  # the heartbeat on the simulated clock
    return Runner(bot, board, interval_sec=bot.interval_sec, stop_event=threading.Event())


def healthz(runner: Runner) -> tuple[int, dict]:
    """``GET /healthz`` from a real server wired as ``bot.py`` wires it."""
    ctx = ApiContext(runner.board, ActionRouter(), dashboard.assets(), "", runner.health)
    server = ApiServer("127.0.0.1", 0, ctx)
    port = server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        server.stop()


def test_cycles_that_keep_failing_make_status_and_healthz_unhealthy(tmp_path):
    bot = make_sim_bot(tmp_path / "f.sqlite3", HMM_SECONDARY_ENABLED=False)
    runner = runner_for(bot)
    runner.cycle()
    assert runner.health()["ok"] is True and bot.status()["health"]["ok"] is True

    def broken(now):
        raise ZeroDivisionError("float division by zero")

    bot._trade = broken  # a bug in one step of the cycle
    for _ in range(3):
        bot.clock.advance(15)
        runner.cycle()
    health = runner.health()
    assert health["ok"] is False
    assert "the last 3 cycles failed: ZeroDivisionError: float division by zero" in health["reasons"]
    assert healthz(runner) == (503, health)  # over real HTTP, the same verdict
    runner.publish()
    st = runner.board.status()
    assert st["health"]["ok"] is False and st["health"]["reasons"] == health["reasons"]
    assert st["health"]["failing_cycles"] == 3
    error = st["health"]["errors"][0]
    assert (error["source"], error["count"]) == ("main loop", 3)  # one row, not three
    bot.clock.advance(40)  # the heartbeat beat only for the cycle that completed
    assert any(r.startswith("the main loop has not completed a cycle for 85 s") for r in runner.health()["reasons"])

    del bot._trade
    runner.cycle()
    assert runner.health() == {"ok": True, "reasons": []}
    assert healthz(runner) == (200, {"ok": True, "reasons": []})
    bot.store.close()


def test_an_unreachable_kraken_turns_health_red_in_plain_words(tmp_path):
    from fake_kraken import FakeKraken

    clock = SimClock(SIM_START)
    candles, _ = generate(900, seed=3, start=SIM_START - 800 * 60)
    settings = make_settings(HMM_SECONDARY_ENABLED=False, LOOP_INTERVAL_SEC=15, TRADES_BACKFILL_ENABLED=False)
    with FakeKraken(candles, now=clock.now) as fake:
        url = fake.url
        market = KrakenPublicClient(url, "XDGUSD", now=clock.now, sleep=clock.sleep, timeout=2, max_retries=0)
        bot = build_bot(settings, mode="paper", clock=clock, market=market, store=SQLiteStore(tmp_path / "k.sqlite3"))
        bot.start()
        runner = runner_for(bot)
        for _ in range(8):
            runner.cycle()
            clock.advance(15)
        assert runner.health()["ok"] is True
    # The fake is gone: its port refuses connections, as Kraken does when the network is down.
    for _ in range(16):  # four minutes
        runner.cycle()
        clock.advance(15)
    health = runner.health()
    assert health["ok"] is False
    (reason,) = health["reasons"]
    assert reason.startswith("1m candles are ")
    assert reason.endswith("(limit 3 min) (last error: Kraken /0/public/OHLC: 127.0.0.1 refused the connection)")
    runner.publish()
    st = runner.board.status()
    assert st["health"]["reasons"] == [reason]
    assert st["hmm_data_pipeline"]["1m"]["last_error"] == "Kraken /0/public/OHLC: 127.0.0.1 refused the connection"
    error = st["health"]["errors"][0]
    assert error["source"] == "1m candles" and error["message"] == st["hmm_data_pipeline"]["1m"]["last_error"]
    assert error["count"] == 4  # one sync a minute, each refused
    bot.store.close()


def test_a_store_that_cannot_write_turns_health_red_once_nothing_is_saved(tmp_path):
    """A full disk, as the bot meets it: every write to the store fails (injected as a real SQLite refusal)."""
    bot = make_sim_bot(tmp_path / "d.sqlite3", HMM_SECONDARY_ENABLED=False, STATE_SNAPSHOT_INTERVAL_SEC=60)
    runner = runner_for(bot)
    run_ticks(bot, 4, 15)
    runner.cycle()
    assert runner.health()["ok"] is True
    bot.store._conn.execute("PRAGMA query_only = 1")  # SQLite refuses every write from now on
    for _ in range(10):  # two and a half minutes of cycles, each one trying to save
        bot.clock.advance(15)
        runner.cycle()
    health = runner.health()
    assert health["ok"] is False
    reason = next(r for r in health["reasons"] if r.startswith("the state has not been saved"))
    assert reason.endswith("(limit 90 s): store: saving the state failed: attempt to write a readonly database")
    runner.publish()
    errors = runner.board.status()["health"]["errors"]
    assert any(e["source"] == "store" and "attempt to write a readonly database" in e["message"] for e in errors)

    bot.store._conn.execute("PRAGMA query_only = 0")  # space again: the next save clears it
    bot.clock.advance(15)
    runner.cycle()
    assert runner.health() == {"ok": True, "reasons": []}
    bot.store.close()


@pytest.mark.parametrize("fail", [False, True])
def test_a_bug_in_building_the_status_never_stops_the_loop(tmp_path, fail):
    bot = make_sim_bot(tmp_path / "s.sqlite3", HMM_SECONDARY_ENABLED=False)
    runner = runner_for(bot)
    if fail:
        bot.status = lambda: {"price": float("nan")}  # not JSON: the board refuses it
    runner.cycle()
    runner.publish()
    assert bot.cycles == 1
    if fail:
        assert runner.board.status() is None
        assert bot.errors[0]["source"] == "status" and bot.errors[0]["count"] == 2
    bot.store.close()
