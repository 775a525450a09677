import json
import re
from pathlib import Path

import pytest
from conftest import DOGE_1M

from candles import Candle, read_candles_csv
from clock import SimClock
from errors import BadData
from market.replay import ReplayMarket, buy_and_hold, direction_hit_rates, shallow_figures
from market.sim import generate

START = 1_767_225_600


def write_csv(path, candles):
    with open(path, "w") as f:
        f.write("time,open,high,low,close,volume\n")
        for c in candles:
            f.write(f"{c.time},{c.open},{c.high},{c.low},{c.close},{c.volume}\n")


def test_csv_reader_round_trip(tmp_path):
    candles, _ = generate(100, seed=1)
    write_csv(tmp_path / "c.csv", candles)
    back = read_candles_csv(tmp_path / "c.csv")
    assert [(c.time, c.close) for c in back] == [(c.time, c.close) for c in candles]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b,c\n1,2,3\n", "the header must be"),
        ("time,open,high,low,close,volume\n60,1,1,1,x,1\n", r":2: not a candle row"),
        ("time,open,high,low,close,volume\n60,1,1,1,1,1\n60,1,1,1,1,1\n", r":3: times must be strictly ascending"),
        ("time,open,high,low,close,volume\n60,1,0.5,1,1,1\n", r":2: high/low do not bracket"),
        ("time,open,high,low,close,volume\n60,-1,1,-1,1,1\n", r":2: prices must be finite and positive"),
        ("time,open,high,low,close,volume\n", "no candles"),
        (
            "time,open,high,low,close,volume\n1679666400000,1,1,1,1,1\n",
            r":2: time 1679666400000 looks like milliseconds",
        ),
    ],
)
def test_csv_reader_rejects_bad_files_with_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(BadData, match=message):
        read_candles_csv(path)


def test_missing_file_is_bad_data(tmp_path):
    with pytest.raises(BadData, match="cannot read"):
        read_candles_csv(tmp_path / "nope.csv")


def test_replay_market_reveals_nothing_of_the_future():
    candles, _ = generate(3000, seed=2)
    clock = SimClock(candles[0].time + 60)
    market = ReplayMarket(clock, candles)
    assert market.start_time == candles[0].time + 60
    page = market.fetch_ohlc(1)
    assert page.closed == candles[:1]
    assert page.forming.time == candles[1].time
    o = candles[1].open
    assert (page.forming.open, page.forming.high, page.forming.low, page.forming.close) == (o, o, o, o)
    clock.advance(60 * 1000)
    page = market.fetch_ohlc(1)
    assert len(page.closed) == 720 and page.closed[-1] == candles[1000]
    assert market.fetch_ohlc(1, since=candles[998].time).closed == candles[999:1001]
    fifteen = market.fetch_ohlc(15).closed
    assert all(c.time + 900 <= clock.now() for c in fifteen)
    assert not market.finished
    clock.advance(60 * 2000)
    assert market.finished


def test_replay_market_rejects_candles_that_are_not_one_minute():
    with pytest.raises(BadData, match="1-minute candles"):
        ReplayMarket(SimClock(0), [Candle(60, 1, 1, 1, 1, 1), Candle(90, 1, 1, 1, 1, 1)])


def test_replay_market_serves_a_gap_as_minutes_without_candles():
    candles, _ = generate(300, seed=3)
    kept = candles[:100] + candles[280:]  # three hours missing after candle 99
    clock = SimClock(kept[0].time + 60)
    market = ReplayMarket(clock, kept)
    clock.advance(60 * 150)  # inside the gap
    page = market.fetch_ohlc(1)
    assert page.closed[-1] == candles[99] and page.forming is None and page.last == candles[99].time
    assert market.fetch_ohlc(1, since=candles[99].time).closed == []
    clock.advance(60 * 130)  # candle 280 has closed
    assert market.fetch_ohlc(1, since=candles[99].time).closed == [candles[280]]
    assert market.candle_count == len(kept) and not market.finished


def test_direction_hit_rates_on_a_hand_made_series():
    # Two minutes ahead here (the report uses 60); no cycle at t=240 (a gap).
    t = [0, 60, 120, 180, 300, 360, 420, 480, 540]
    price = [1.0, 1.1, 1.2, 1.2, 0.9, 1.0, 1.0, 1.0, 0.8]
    tier = [1, 2, 1, 2, 2, 1, 0, 1, 1]
    direction = [1, -1, -1, 1, 1, -1, 0, 1, 1]
    # 0: up, long, hit | 1: up, short, miss | 2: nothing at 240 | 3: down, long, miss | 4: up, long, hit
    # 5: zero return, unscored | 6: down but tier 0 | 7, 8: nothing two minutes later
    rates = direction_hit_rates(t, price, tier, direction, horizon_sec=120)
    assert rates["1"] == {"hit_rate": 1.0, "hits": 1, "scored": 1, "scorable": 5, "coverage": 0.2}
    assert rates["2"] == {"hit_rate": 0.3333, "hits": 1, "scored": 3, "scorable": 5, "coverage": 0.6}
    assert rates["directional"] == {"hit_rate": 0.5, "hits": 2, "scored": 4, "scorable": 5, "coverage": 0.8}
    quiet = direction_hit_rates(t, price, [0] * 9, [0] * 9, horizon_sec=120)
    assert quiet["directional"] == {"hit_rate": None, "hits": 0, "scored": 0, "scorable": 5, "coverage": 0.0}
    assert direction_hit_rates([], [], [], [])["1"]["coverage"] is None


def test_tier2_share_while_the_primary_is_shallow():
    figures = shallow_figures([0, 1, 1, 1, 1, 0], [2, 2, 0, 2, 1, 2])
    assert figures == {"tier2_share_while_shallow": 0.5, "shallow_cycles": 4, "tier2_cycles_while_shallow": 2}
    assert shallow_figures([0, 0], [2, 2])["tier2_share_while_shallow"] is None


def test_buy_and_hold_has_the_grid_figures_where_they_mean_something():
    hold = buy_and_hold({"price": [1.0, 2.0, 0.5]}, start_equity=100.0, fee_pct=0.0)
    assert hold["inventory_peak_usd"] == 200.0  # its holding at its most valuable
    assert (hold["realized_pnl_usd"], hold["cycles"]) == (0.0, 0)
    assert hold["grid_max_drawdown_usd"] is None and hold["capacity_stop_share"] is None


def test_replay_subprocess_writes_the_report(tmp_path, bot_process):
    candles, _ = generate(3 * 1440, seed=11)
    csv = tmp_path / "sim.csv"
    write_csv(csv, candles)
    report_path = tmp_path / "out" / "report.json"
    p = bot_process(["--replay", str(csv), "--report", str(report_path), "--log-level", "INFO"])
    assert p.proc.wait(120) == 0, p.output
    report = json.loads(report_path.read_text())
    assert report["candles"] == len(candles)
    assert report["simulated_span_sec"] == (len(candles) - 1) * 60
    assert report["wall_sec"] > 0
    assert sum(report["tier_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert isinstance(report["tier_changes"], int)
    retrains = report["retrains"]
    primary = [r for r in retrains if r["model"] == "primary"]
    # Cold start in replay: nothing before 500 candles, then the tiers climb.
    assert primary[0]["reason"] == "initial" and primary[0]["candles"] == 500
    assert primary[0]["quality_tier"] == "shallow"
    assert [r["quality_tier"] for r in primary if r["reason"] == "tier_improvement"] == ["baseline", "deep", "full"]
    assert all({"time", "model", "candles", "quality_tier"} <= set(r) for r in retrains)
    assert "replay of 4320 candles done" in p.output
    assert_scorecard_consistent(report)
    # Progress every 10 % of the span, the result line, and a one-row summary beside the report.
    assert [int(pct) for pct in re.findall(r"^sim\.csv: 2026-0\d-\d\d \d\d:\d\d \((\d+)%\)$", p.output, re.M)] == [
        10, 20, 30, 40, 50, 60, 70, 80, 90
    ]  # fmt: skip
    assert re.search(r"^sim\.csv: done: 4,320 candles in [\d.]+ s; net P&L regime_aware [+-]", p.output, re.M)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [row] = summary["files"]
    assert (row["file"], row["error"], row["candles"]) == (str(csv), None, 4320)
    for name in ("regime_aware", "symmetric", "buy_and_hold"):
        assert row["strategies"][name]["net_pnl_usd"] == report["strategies"][name]["net_pnl_usd"]
    assert summary["totals"]["files"] == 1 and summary["totals"]["failed_files"] == 0
    assert (tmp_path / "out" / "summary.md").read_text() in p.output  # printed as well


def test_a_single_file_that_cannot_be_read_is_its_summary_row(tmp_path, bot_process):
    csv = tmp_path / "bad_1m.csv"
    csv.write_text("time,open,high,low,close,volume\n60,1,1,1,1,1\n120,1,1,1,oops,1\n")
    p = bot_process(["--replay", str(csv)])
    assert p.proc.wait(60) == 1, p.output  # 2 is for a bad command line or settings
    error = f"{csv}:3: not a candle row: ['120', '1', '1', '1', 'oops', '1']"
    assert f"bad_1m.csv: FAILED: {error}" in p.lines
    [row] = json.loads((tmp_path / "summary.json").read_text())["files"]
    assert (row["file"], row["error"], row["candles"], row["strategies"]) == (str(csv), error, None, None)
    assert "## Failed files" in (tmp_path / "summary.md").read_text()


def test_a_replay_stopped_midway_writes_its_partial_report_and_exits_non_zero(tmp_path, bot_process):
    candles, _ = generate(6000, seed=14)
    csv = tmp_path / "long_1m.csv"
    write_csv(csv, candles)
    p = bot_process(["--replay", str(csv), "--report-dir", str(tmp_path / "out")])
    p.wait_for_log(r"^long_1m\.csv: .* \(10%\)$", timeout=90)
    assert p.terminate(60) == 128 + 15, p.output
    report = json.loads((tmp_path / "out" / "long_1m.csv.report.json").read_text())
    assert 600 <= report["candles"] < 6000  # how far it got
    [row] = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert re.fullmatch(r"interrupted by SIGTERM at 2026-01-0\d \d\d:\d\d \(\d+%\)", row["error"])
    assert row["strategies"] is None and row["report"] == str(tmp_path / "out" / "long_1m.csv.report.json")


def with_gaps_and_zero_volume(candles: list[Candle]) -> list[Candle]:
    """Real data's habits: minutes without trades (volume 0, O=H=L=C at the last price), including the
    very first, a flat 5-hour run of them, and gaps of 3 and 26 hours."""
    out: list[Candle] = []
    for i, c in enumerate(candles):
        if 2200 <= i < 2380 or 3000 <= i < 4560:
            continue
        if i < 40 or 1500 <= i < 1800 or i % 53 == 0:
            last = out[-1].close if out else c.open
            c = Candle(c.time, last, last, last, last, 0.0)
        out.append(c)
    return out


def test_replay_of_a_file_with_gaps_and_zero_volume_minutes(tmp_path, bot_process):
    candles = with_gaps_and_zero_volume(generate(5000, seed=13)[0])
    csv = tmp_path / "gappy_1m.csv"
    write_csv(csv, candles)
    p = bot_process(["--replay", str(csv), "--report-dir", str(tmp_path / "out"), "--log-level", "INFO"])
    assert p.proc.wait(120) == 0, p.output
    report = json.loads((tmp_path / "out" / "gappy_1m.csv.report.json").read_text())
    assert report["candles"] == len(candles) == 5000 - 180 - 1560
    assert report["simulated_span_sec"] == candles[-1].time - candles[0].time
    primary = [r for r in report["retrains"] if r["model"] == "primary"]
    assert primary and all(r["ok"] for r in primary)
    # Minutes without trades have no feature row (nor have the first 40, whose volume average is 0).
    assert primary[0]["raw_samples"] == sum(1 for c in candles[40:500] if c.volume > 0)
    assert "cycle failed" not in p.output and "Traceback" not in p.output
    assert_scorecard_consistent(report)
    assert report["strategies"]["symmetric"]["cycles"] > 0
    [row] = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert row["error"] is None and row["candles"] == len(candles)


def assert_scorecard_consistent(report: dict) -> None:
    """The strategies block adds up: every P&L figure is explained by its parts."""
    strategies = report["strategies"]
    assert set(strategies) == {"regime_aware", "symmetric", "buy_and_hold"}
    first, last = report["prices"]["first"], report["prices"]["last"]
    for name, s in strategies.items():
        assert {"net_pnl_usd", "max_drawdown_pct", "cycles", "fees_usd", "end_inventory"} <= set(s), name
        inv = s["end_inventory"]
        assert s["end_equity_usd"] == pytest.approx(inv["quote"] + inv["base"] * last, abs=1e-4), name
        assert s["net_pnl_usd"] == pytest.approx(s["end_equity_usd"] - s["start_equity_usd"], abs=1e-4), name
        assert 0 <= s["max_drawdown_pct"] < 100
    for name in ("regime_aware", "symmetric"):
        s = strategies[name]
        explained = s["start_inventory_drift_usd"] + s["realized_pnl_usd"] + s["open_positions_mtm_usd"]
        assert s["net_pnl_usd"] == pytest.approx(explained - s["open_entry_fees_usd"], abs=1e-4), name
        assert s["fees_usd"] >= s["open_entry_fees_usd"] >= 0
        assert s["start_equity_usd"] == pytest.approx(strategies["buy_and_hold"]["start_equity_usd"])
    hold = strategies["buy_and_hold"]
    assert hold["cycles"] == 0 and hold["end_inventory"]["quote"] == 0
    held_value = hold["end_inventory"]["base"] * last
    assert hold["net_pnl_usd"] == pytest.approx(held_value - hold["start_equity_usd"], abs=1e-4)
    assert hold["end_inventory"]["base"] * first == pytest.approx(hold["start_equity_usd"] - hold["fees_usd"])
    aware = strategies["regime_aware"]
    assert sum(aware["tier_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= aware["capacity_stop_share"] <= 1
    assert aware["tier_changes"] >= 0 and aware["tier_changes_per_day"] is not None
    # SPEC section 15's figures
    for name in ("regime_aware", "symmetric"):
        s = strategies[name]
        assert 0 <= s["capacity_stop_share"] <= 1
        assert 0 <= s["grid_max_drawdown_usd"] < s["start_equity_usd"]
        assert 0 <= s["inventory_peak_usd"] < 2 * s["start_equity_usd"]
    assert hold["inventory_peak_usd"] >= max(hold["start_equity_usd"] - hold["fees_usd"], hold["end_equity_usd"])
    assert hold["grid_max_drawdown_usd"] is None and hold["capacity_stop_share"] is None
    assert aware["shallow_cycles"] >= aware["tier2_cycles_while_shallow"] >= 0
    if aware["shallow_cycles"]:
        assert aware["tier2_share_while_shallow"] == round(
            aware["tier2_cycles_while_shallow"] / aware["shallow_cycles"], 4
        )
    rates = aware["direction_hit_rate"]
    assert rates["directional"]["scored"] == rates["1"]["scored"] + rates["2"]["scored"]
    assert rates["directional"]["hits"] == rates["1"]["hits"] + rates["2"]["hits"]
    scorable = rates["directional"]["scorable"]
    assert 0 < scorable <= report["simulated_span_sec"] // 60 + 1  # at most one per cycle (a minute)
    for key in ("1", "2", "directional"):
        r = rates[key]
        assert r["coverage"] == round(r["scored"] / scorable, 4)
        assert r["hit_rate"] == (round(r["hits"] / r["scored"], 4) if r["scored"] else None)
    plot = Path(report["plot"])
    assert plot.exists() and "<svg" in plot.read_text()


@pytest.mark.skipif(not DOGE_1M.exists(), reason=f"real data not found at {DOGE_1M}")
def test_replay_of_real_doge_candles(tmp_path, bot_process):
    lines = DOGE_1M.read_text().splitlines()[: 1 + 6000]
    csv = tmp_path / "doge.csv"
    csv.write_text("\n".join(lines) + "\n")
    p = bot_process(["--replay", str(csv), "--report", str(tmp_path / "r.json")])
    assert p.proc.wait(180) == 0, p.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["candles"] == 6000
    assert report["first_candle_time"] == 1679666400
    assert {r["quality_tier"] for r in report["retrains"] if r["model"] == "primary"} >= {"shallow", "baseline"}
    assert_scorecard_consistent(report)
    assert report["strategies"]["symmetric"]["cycles"] > 0  # the grid really trades real candles


def test_replay_with_serve_keeps_the_dashboard_up_until_stopped(tmp_path, bot_process):
    candles, _ = generate(900, seed=12)
    csv = tmp_path / "short.csv"
    write_csv(csv, candles)
    p = bot_process(["--replay", str(csv), "--serve", "--port", "0", "--report", str(tmp_path / "r.json")])
    p.wait_ready()
    p.wait_for_log("serving the dashboard until Ctrl-C", timeout=60)
    code, status = p.get_json("/api/status")
    assert code == 200 and status["mode"] == "replay"
    assert status["health"]["cycles"] == len(candles)
    assert status["now"] == candles[-1].time + 60
    assert (tmp_path / "r.json").exists()
    assert p.terminate() == 0


# Pair rules in a replay (pair_rules.replay_pair) ------------------------------------------------

BTC_SCALE = 250_000  # the simulator's 0.08 USD becomes 20,000 USD


def write_scaled_csv(path: Path, candles: list[Candle], scale: float) -> Path:
    write_csv(path, [c._replace(open=c.open * scale, high=c.high * scale, low=c.low * scale, close=c.close * scale)
                     for c in candles])  # fmt: skip
    return path


def run_replay(bot_process, csv: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    report = csv.with_suffix(".report.json")
    p = bot_process(["--replay", str(csv), "--report", str(report), "--log-level", "INFO", *args], env=env)
    code = p.proc.wait(180)
    return code, json.loads(report.read_text()) if code == 0 else None, p.output


def test_a_btc_priced_file_trades_as_the_same_series_at_doge_scale(tmp_path, bot_process):
    candles, _ = generate(3000, seed=11)
    code, btc, log = run_replay(bot_process, write_scaled_csv(tmp_path / "BTCUSDT_1m.csv", candles, BTC_SCALE))
    assert code == 0, log
    assert "as XBTUSD, rules from the file name: tick 0.1 USD" in log
    code, doge, log = run_replay(bot_process, write_scaled_csv(tmp_path / "DOGEUSDT_1m.csv", candles, 1.0))
    assert code == 0, log
    assert (btc["pair"], doge["pair"]) == ("XBTUSD", "XDGUSD")
    assert_scorecard_consistent(btc)
    for name in ("regime_aware", "symmetric"):
        b, d = btc["strategies"][name], doge["strategies"][name]
        assert b["cycles"] > 0 and d["cycles"] > 0, name
        # The grid is scale-free; only the pairs' ticks and minimums differ (both far below an entry),
        # so the cycles agree within 5 % (on this series they are equal) and so does the P&L per dollar.
        assert abs(b["cycles"] - d["cycles"]) <= max(2, 0.05 * d["cycles"]), (name, b["cycles"], d["cycles"])
        assert b["net_pnl_usd"] == pytest.approx(d["net_pnl_usd"], abs=0.02 * d["start_equity_usd"]), name


def test_a_file_of_an_unknown_pair_trades_on_rules_from_its_prices(tmp_path, bot_process):
    candles, _ = generate(2000, seed=12)
    code, report, log = run_replay(bot_process, write_scaled_csv(tmp_path / "mystery-coin.csv", candles, 40.0))
    assert code == 0, log
    assert report["pair"] == "MYSTERY"
    assert "as MYSTERY, rules from the price scale: tick 1e-05 USD" in log
    assert report["strategies"]["symmetric"]["cycles"] > 0


def test_an_explicit_pair_applies_to_the_file_whatever_its_name(tmp_path, bot_process):
    candles, _ = generate(2000, seed=12)
    csv = write_scaled_csv(tmp_path / "BTCUSDT_1m.csv", candles, 1.0)  # named BTC, priced like DOGE
    code, _, log = run_replay(bot_process, csv)
    # A file its rules cannot trade is that file's error (exit 1), not a usage error.
    assert code == 1 and f"{csv}: XBTUSD (file name) cannot trade this file" in log and "tick 0.1" in log
    code, report, log = run_replay(bot_process, csv, "--pair", "dogeusdt")
    assert code == 0, log
    assert report["pair"] == "XDGUSD" and "as XDGUSD, rules from the --pair" in log
    assert report["strategies"]["symmetric"]["cycles"] > 0


@pytest.mark.parametrize(
    ("args", "env", "exit_code", "fragments"),
    [
        (["--pair", "NOPEUSD"], {}, 2, ["--pair NOPEUSD is not in the built-in table", "XBTUSD, ETHUSD"]),
        ([], {"GRID_ORDER_USD": "2"}, 1, ["XDGUSD (file name) cannot trade this file", "GRID_ORDER_USD=2"]),
    ],
)
def test_a_replay_whose_rules_cannot_trade_stops_with_a_message(tmp_path, bot_process, args, env, exit_code, fragments):
    candles, _ = generate(200, seed=13)
    csv = write_scaled_csv(tmp_path / "DOGEUSDT_1m.csv", candles, 1.0)
    code, _, log = run_replay(bot_process, csv, *args, env=env)
    assert code == exit_code
    for fragment in fragments:
        assert fragment in log
    if env:
        assert f"FAILED: {csv}: " in log  # the message names the file
    assert "Traceback" not in log and not csv.with_suffix(".report.json").exists()
