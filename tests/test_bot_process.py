"""A real ``python bot.py`` process: status, config errors, signals, restarts, crashes."""

import json
import re
import sqlite3

import pytest
from conftest import ROOT

from grid.exchange import PairRules

SIM = ["--market", "sim", "--port", "0", "--log-level", "INFO"]


def sim_args(tmp_path, speed="max", db="sim.sqlite3"):
    return [*SIM, "--speed", speed, "--db", str(tmp_path / db)]


def test_sim_serves_status_and_health_and_stops_cleanly(tmp_path, bot_process):
    p = bot_process(sim_args(tmp_path))
    p.wait_ready()
    st = p.wait_status(lambda s: s["hmm"]["primary"]["trained"] and s["health"]["cycles"] > 20)
    assert st["mode"] == "sim" and st["pair"] == "XDGUSD"
    assert st["hmm"]["primary"]["training_depth"]["quality_tier"] in ("shallow", "baseline", "deep", "full")
    assert st["regime_tier"]["mechanical"]["tier"] in (0, 1, 2)
    code, health = p.get_json("/healthz")
    assert code == 200 and health["ok"] is True
    code, headers, page = p.request("GET", "/")
    assert code == 200 and b"<html" in page.lower() and headers["Content-Type"].startswith("text/html")
    code, _, body = p.request("POST", "/api/action", b'{"action": "grid_pause"}', {"Content-Type": "application/json"})
    assert code == 400 and "unknown action" in json.loads(body)["error"]
    code, _, body = p.request(
        "POST", "/api/action", b'{"action": "ai_regime_override"}', {"Content-Type": "application/json"}
    )
    assert code == 409 and "AI advisor is disabled" in json.loads(body)["error"]
    assert p.terminate() == 0
    assert "SIGTERM received: stopping" in p.output and "stopped cleanly" in p.output


def test_restart_restores_tier_state_and_model_without_retraining(tmp_path, bot_process):
    # Full depth at once, so nothing but the daily schedule could retrain; 300x keeps a day far away.
    env = {"HMM_TRAINING_CANDLES": "720", "HMM_SECONDARY_TRAINING_CANDLES": "720"}
    first = bot_process(sim_args(tmp_path, speed="300"), env=env)
    first.wait_ready()
    first.wait_status(lambda s: s["hmm"]["secondary"]["trained"] and s["health"]["cycles"] >= 10)
    assert first.terminate() == 0
    assert "primary model trained (initial)" in first.output

    con = sqlite3.connect(tmp_path / "sim.sqlite3")
    snap = json.loads(con.execute("SELECT data FROM bot_state WHERE key = 'snapshot:XDGUSD'").fetchone()[0])
    con.close()

    second = bot_process(sim_args(tmp_path, speed="300"), env=env)
    second.wait_ready()
    st = second.wait_status(lambda s: s["health"]["cycles"] >= 3)
    log = second.output
    assert "primary model restored from the snapshot" in log
    assert "secondary model restored from the snapshot" in log
    assert "model trained" not in log  # no retraining
    tier = snap["tier"]
    assert re.search(rf"tier state restored: tier {tier['tier']} {tier['direction']} since ", log)
    assert st["hmm"]["primary"]["last_trained_at"] == snap["models"]["primary"]["trained_at"]
    assert st["hmm"]["primary"]["training_depth"]["quality_tier"] == "full"
    assert st["now"] >= snap["saved_at"]  # the simulation resumed where it stopped
    assert second.terminate() == 0


def test_kill_9_then_restart_leaves_a_readable_store(tmp_path, bot_process):
    first = bot_process(sim_args(tmp_path))
    first.wait_ready()
    first.wait_status(lambda s: s["health"]["cycles"] > 200)
    first.kill()
    con = sqlite3.connect(tmp_path / "sim.sqlite3")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = con.execute("SELECT COUNT(*) FROM ohlcv_candles").fetchone()[0]
    assert stored > 1440
    assert con.execute("SELECT data FROM bot_state WHERE key = 'snapshot:XDGUSD'").fetchone() is not None
    con.close()
    second = bot_process(sim_args(tmp_path))
    second.wait_ready()
    st = second.wait_status(lambda s: s["health"]["cycles"] >= 1)
    assert st["hmm"]["primary"]["trained"]
    assert st["hmm_data_pipeline"]["1m"]["rows_available"] >= min(stored, 4000) // 2
    assert second.terminate() == 0


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (
            [],
            {"HMM_TRAINING_CANDLES": "abc"},
            ["HMM_TRAINING_CANDLES='abc' is invalid", "an integer from 50 to 200000"],
        ),
        (["--speed", "fast"], {}, ["SIM_SPEED='fast' is invalid", "a number from 0.01 to 1e+06 or 'max'"]),
        (["--host", "0.0.0.0"], {}, ["HTTP_HOST='0.0.0.0' is not a loopback address: set API_TOKEN"]),
        ([], {"REGIME_TIER2_CONFIDENCE": "0.1"}, ["REGIME_TIER2_CONFIDENCE=0.1 must be above"]),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(tmp_path, bot_process, args, env, fragments):
    p = bot_process([*sim_args(tmp_path), *args], env=env)
    assert p.proc.wait(30) == 2
    for fragment in fragments:
        assert fragment in p.output
    assert "Traceback" not in p.output
    assert not (tmp_path / "sim.sqlite3").exists()  # refused before touching anything


def test_typo_in_dotenv_is_refused(tmp_path, bot_process):
    (tmp_path / ".env").write_text("REGIME_MIN_DWEL_SEC=60\n")
    p = bot_process(sim_args(tmp_path))
    assert p.proc.wait(30) == 2
    assert "REGIME_MIN_DWEL_SEC in .env is not a setting (did you mean REGIME_MIN_DWELL_SEC?)" in p.output


def test_a_different_seed_cannot_reuse_a_simulation_store(tmp_path, bot_process):
    first = bot_process(sim_args(tmp_path))
    first.wait_ready()
    assert first.terminate() == 0
    second = bot_process([*sim_args(tmp_path), "--seed", "8"])
    assert second.proc.wait(30) == 2
    assert "this store holds a simulation with SIM_SEED=7" in second.output


def test_api_token_is_required_on_api_paths(tmp_path, bot_process):
    p = bot_process(sim_args(tmp_path), env={"API_TOKEN": "s3cret-token"})
    p.wait_ready()
    code, body = p.get_json("/api/status")
    assert code == 401 and body["ok"] is False
    p.wait_status(lambda s: s["health"]["cycles"] > 0, headers={"Authorization": "Bearer s3cret-token"})
    assert p.request("GET", "/")[0] == 200
    assert "s3cret-token" not in p.output  # never logged
    assert p.terminate() == 0


def test_help_documents_every_flag(tmp_path, bot_process):
    p = bot_process(["--help"])
    assert p.proc.wait(30) == 0
    for flag in (
        "--market",
        "--replay",
        "--live",
        "--host",
        "--port",
        "--db",
        "--speed",
        "--seed",
        "--report",
        "--serve",
        "--log-level",
        "--env-file",
        "--pair",
    ):
        assert flag in p.output
    source = (ROOT / "bot.py").read_text()
    assert set(re.findall(r'add_argument\("(--[a-z-]+)"', source)) <= set(re.findall(r"--[a-z-]+", p.output))


def test_paper_mode_runs_on_kraken_public_data_through_kraken_api_url(tmp_path, bot_process):
    """The default mode (`python bot.py`), pointed at a local server speaking Kraken's format."""
    import time

    from fake_kraken import FakeKraken

    from market.sim import generate

    now = time.time()
    first = int(now // 60 * 60) - 11_000 * 60
    candles, _ = generate(11_100, seed=21, start=first)  # history up to now and a little beyond
    with FakeKraken(candles, now=time.time) as fake:
        fake.fail_next(2, "rate_limit")  # the first calls are rate-limited: backoff, then data
        p = bot_process(
            ["--port", "0", "--db", str(tmp_path / "paper.sqlite3"), "--log-level", "INFO"],
            env={"KRAKEN_API_URL": fake.url},
        )
        p.wait_ready()
        st = p.wait_status(lambda s: s["hmm"]["secondary"]["trained"], timeout=60)
        assert st["mode"] == "paper"
        pipe = st["hmm_data_pipeline"]
        assert pipe["1m"]["rows_available"] == 719 and pipe["15m"]["rows_available"] == 719
        assert pipe["1m"]["status"] == "ok"
        assert st["hmm"]["primary"]["training_depth"]["quality_tier"] == "shallow"
        assert st["hmm"]["secondary"]["training_depth"]["quality_tier"] == "baseline"
        assert st["price"] == pytest.approx(candles[int((time.time() - first) // 60)].close, rel=0.05)
        assert "EAPI:Rate limit exceeded; retry 1/3 in 1.0s" in p.output
        ohlc = [r for r in fake.requests if r["path"] == "/0/public/OHLC"]
        assert {r["params"]["pair"] for r in ohlc} == {"XDGUSD"}
        assert {r["params"]["interval"] for r in ohlc} == {"1", "15"}
        grid = st["grid"]
        assert grid["exchange"] == "paper" and grid["balances"]["equity_quote"] == pytest.approx(1000.0, rel=0.01)
        assert st["trades_backfill"]["enabled"] is True  # the fake has no trades to page: it finds none
        assert p.terminate() == 0


def test_a_fresh_paper_bot_reaches_full_depth_from_trades_in_seconds(tmp_path, bot_process):
    """Deep warm-up: Kraken's OHLC window is 720 candles; the trades before it fill the rest."""
    import random
    import time

    from fake_kraken import FakeKraken

    from candles import Candle
    from kraken.public_client import Trade
    from kraken.trades_backfill import aggregate_trades
    from market.sim import generate

    # Prices from the regime-switching simulator, so that the model's states separate and no fit is
    # rejected by the label check (a pure random walk has no regimes to find); minutes aligned, so that
    # every run buckets the trades into the same candles.
    now = time.time() // 60 * 60 + 30
    rng, trades = random.Random(41), []
    minutes, _ = generate(4300, seed=41)
    for k in range(4300 * 6):  # a trade every 10 s over the last 4300 minutes
        price = round(minutes[k // 6].close, 7)
        trades.append(Trade(now - 4300 * 60 + 10 * k + rng.random(), price, round(rng.uniform(1, 5000), 8)))
    closed = aggregate_trades(trades, 1, end=now).closed
    forming = Candle(int(now // 60 * 60), closed[-1].close, closed[-1].close, closed[-1].close, closed[-1].close, 0)
    with FakeKraken([*closed, forming], now=time.time) as fake:
        fake.set_trades(trades)
        env = {
            "KRAKEN_API_URL": fake.url,
            "HMM_SECONDARY_ENABLED": "false",
            "TRADES_BACKFILL_MIN_INTERVAL_SEC": "0.2",
            "LOOP_INTERVAL_SEC": "1",
        }
        p = bot_process(["--port", "0", "--db", str(tmp_path / "warm.sqlite3"), "--log-level", "INFO"], env=env)
        p.wait_ready()
        st = p.wait_status(lambda s: s["hmm"]["primary"]["training_depth"]["quality_tier"] == "full", timeout=90)
        assert st["trades_backfill"]["state"] == "done" and st["trades_backfill"]["pct"] == 100
        assert st["hmm_data_pipeline"]["1m"]["rows_available"] >= 4000
        pages = [r for r in fake.requests if r["path"] == "/0/public/Trades"]
        assert len(pages) == st["trades_backfill"]["requests"] >= 5
        assert p.terminate() == 0


def test_a_supabase_outage_never_stops_the_bot_and_a_restart_during_it_restores_from_the_mirror(tmp_path, bot_process):
    """SUPABASE_URL/KEY point at a local PostgREST-protocol server that goes away twice."""
    import sqlite3
    import time

    from fake_kraken import FakeKraken
    from fake_postgrest import FakePostgrest

    from market.sim import generate

    first = int(time.time() // 60 * 60) - 2000 * 60
    candles, _ = generate(2100, seed=23, start=first)
    db = tmp_path / "paper.sqlite3"
    with FakeKraken(candles, now=time.time) as kraken, FakePostgrest() as supabase:
        env = {
            "KRAKEN_API_URL": kraken.url,
            "SUPABASE_URL": supabase.url,
            "SUPABASE_KEY": supabase.key,
            "SUPABASE_RETRY_MAX_SEC": "1",
            "LOOP_INTERVAL_SEC": "1",
            "STATE_SNAPSHOT_INTERVAL_SEC": "5",
            "HMM_SECONDARY_ENABLED": "false",
            "TRADES_BACKFILL_ENABLED": "false",
        }
        args = ["--port", "0", "--db", str(db), "--log-level", "INFO"]

        def landed(s: dict) -> bool:
            store = s["store"]
            return store["state"] == "ok" and store["pending_writes"] == 0 and store["last_remote_write_at"]

        def degraded(s: dict) -> bool:
            return s["store"]["state"] == "degraded" and s["store"]["pending_writes"] > 0

        p = bot_process(args, env=env)
        p.wait_ready()
        st = p.wait_status(lambda s: s["hmm"]["primary"]["trained"] and landed(s), timeout=60)
        assert st["store"]["backend"] == "supabase" and st["store"]["local_path"] == str(db)
        assert len(supabase.rows("ohlcv_candles")) == 719
        # The pair's lease names this bot and its dashboard; a second bot on the project is refused.
        assert [(r["pid"], r["port"], r["store"]) for r in supabase.rows("bot_leases")] == [
            (p.proc.pid, p.port, str(db))
        ]
        other = bot_process(["--port", "0", "--db", str(tmp_path / "other.sqlite3")], env=env)
        assert other.proc.wait(30) == 2
        assert f"bot.py: another bot (PID {p.proc.pid} on " in other.output
        assert f"dashboard port {p.port}, store {db}) holds XDGUSD in Supabase" in other.output

        supabase.stop()
        st = p.wait_status(degraded, timeout=30)
        assert "ConnectError" in st["store"]["last_error"]
        cycles = st["health"]["cycles"]
        st = p.wait_status(lambda s: s["health"]["cycles"] >= cycles + 3 and degraded(s), timeout=30)
        assert p.request("GET", "/healthz")[0] == 200
        assert st["grid"]["open_orders"], "the grid trades on"

        supabase.start()
        p.wait_status(landed, timeout=30)
        assert len(supabase.rows("ohlcv_candles")) == 719  # each candle once

        supabase.stop()  # the second outage, and a restart during it
        p.wait_status(degraded, timeout=30)
        assert p.terminate() == 0
        assert "wait for Supabase" in p.output
        with sqlite3.connect(db) as conn:
            (snapshot,) = conn.execute("SELECT data FROM bot_state WHERE key = 'snapshot:XDGUSD'").fetchone()
        orders = sorted(o["id"] for o in json.loads(snapshot)["grid"]["engine"]["orders"])

        again = bot_process(args, env=env)
        again.wait_ready()
        st = again.get_json("/api/status")[1]
        assert st["store"]["state"] == "degraded"
        assert sorted(o["id"] for o in st["grid"]["open_orders"]) == orders  # restored from the mirror
        assert "model restored from the snapshot" in again.output
        supabase.start()
        again.wait_status(landed, timeout=30)
        # The first bot's lease could not be released in the outage; this host and store file take it over.
        again.wait_for_log("bot lease on XDGUSD taken in Supabase", timeout=15)
        assert [r["pid"] for r in supabase.rows("bot_leases")] == [again.proc.pid]
        assert again.terminate() == 0  # with Supabase up, the final snapshot is sent before the exit
        assert supabase.rows("bot_leases") == []  # released at a clean shutdown
        with sqlite3.connect(db) as conn:
            (snapshot,) = conn.execute("SELECT data FROM bot_state WHERE key = 'snapshot:XDGUSD'").fetchone()
            assert conn.execute("SELECT COUNT(*) FROM store_outbox").fetchone() == (0,)
        assert supabase.rows("bot_state")[0]["data"] == json.loads(snapshot)


# The pair's order rules (pair_rules, kraken_client.fetch_asset_pair) -------------------------------

BTC_RULES = PairRules("XBTUSD", "BTC", "USD", 1, 8, 0.00005, 0.5, 0.25)


def recent_candles(n: int, seed: int, scale: float = 1.0):
    import time

    from market.sim import generate

    first = int(time.time() // 60 * 60) - (n - 100) * 60
    candles, _ = generate(n, seed=seed, start=first)  # history up to now and a little beyond
    return [c._replace(open=c.open * scale, high=c.high * scale, low=c.low * scale, close=c.close * scale)
            for c in candles]  # fmt: skip


QUIET = {"TRADES_BACKFILL_ENABLED": "false", "HMM_SECONDARY_ENABLED": "false", "LOOP_INTERVAL_SEC": "1"}


def test_paper_mode_trades_the_pair_on_the_rules_kraken_publishes(tmp_path, bot_process):
    import time

    from fake_kraken import AssetPair, FakeKraken

    served = [AssetPair(PairRules()), AssetPair(BTC_RULES, name="XXBTZUSD", base_id="XXBT")]
    with FakeKraken(recent_candles(900, 24, scale=250_000), now=time.time, pair="XBTUSD", asset_pairs=served) as fake:
        env = {"KRAKEN_API_URL": fake.url, "PAIR": "XBTUSD", **QUIET}
        p = bot_process(["--port", "0", "--db", str(tmp_path / "btc.sqlite3"), "--log-level", "INFO"], env=env)
        p.wait_ready()
        st = p.wait_status(lambda s: s["grid"] is not None and s["grid"]["open_orders"], timeout=60)
        grid = st["grid"]
        assert (st["pair"], grid["pair"], grid["base_asset"], grid["quote_asset"]) == ("XBTUSD", "XBTUSD", "BTC", "USD")
        assert grid["price_decimals"] == 1
        for order in grid["open_orders"]:
            assert round(order["price"], 1) == order["price"] and order["volume"] >= 0.00005
        assert "XBTUSD order rules from Kraken: tick 0.1 USD" in p.output
        asked = [r["params"] for r in fake.requests if r["path"] == "/0/public/AssetPairs"]
        assert asked == [{"pair": "XBTUSD"}]
        assert p.terminate() == 0


def test_paper_mode_refuses_a_pair_kraken_does_not_list(tmp_path, bot_process):
    import time

    from fake_kraken import FakeKraken

    with FakeKraken(recent_candles(200, 25), now=time.time) as fake:
        db = tmp_path / "paper.sqlite3"
        p = bot_process(["--port", "0", "--db", str(db), "--pair", "NOPEUSD"], env={"KRAKEN_API_URL": fake.url})
        assert p.proc.wait(30) == 2
    assert "PAIR=NOPEUSD is not a pair Kraken lists (Kraken AssetPairs: EQuery:Unknown asset pair" in p.output
    assert "Traceback" not in p.output
    assert not db.exists()  # refused before the store was opened


def test_paper_mode_without_kraken_falls_back_to_the_table_for_a_known_pair_only(tmp_path, bot_process):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"KRAKEN_API_URL": url, "KRAKEN_MAX_RETRIES": "0", **QUIET}
    p = bot_process(
        ["--port", "0", "--db", str(tmp_path / "a.sqlite3"), "--log-level", "INFO"], env={**env, "PAIR": "ETHUSD"}
    )
    p.wait_ready()
    p.wait_for_log(r"AssetPairs is unreachable .*: paper trading ETHUSD on the built-in table's rules \(tick 0.01 USD")
    assert p.terminate() == 0
    p = bot_process(["--port", "0", "--db", str(tmp_path / "b.sqlite3")], env={**env, "PAIR": "SHIBUSD"})
    assert p.proc.wait(30) == 2
    assert "PAIR=SHIBUSD: its order rules cannot be read: Kraken is unreachable" in p.output
    assert "SHIBUSD is not in the built-in table" in p.output


def test_the_simulator_runs_a_known_pair_at_its_price_scale_and_rules(tmp_path, bot_process):
    p = bot_process([*sim_args(tmp_path), "--pair", "XBTUSD"])
    p.wait_ready()
    st = p.wait_status(lambda s: s["grid"] is not None and s["grid"]["open_orders"], timeout=60)
    assert st["pair"] == "XBTUSD" and st["grid"]["price_decimals"] == 1 and st["grid"]["base_asset"] == "BTC"
    assert 20_000 < st["price"] < 200_000  # the simulator starts at the pair's typical price, 60,000
    assert p.terminate() == 0
