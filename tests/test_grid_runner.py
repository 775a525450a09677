"""GridRunner: the grid engine at work on the paper exchange, its bookkeeping, persistence and reconciliation.

Around a price of 0.1 the test grid rests its entries 1% (slot 0) and 2%
(slot 1) from the market and exits 2% from the entry fill.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from candles import Candle
from errors import RetryLater
from grid.engine import EXIT, GridConfig, Posture, to_dict
from grid.exchange import OrderRequest, PairRules
from grid.paper_exchange import PaperExchange, paper_exchange_factory
from grid.runner import EquityTrack, GridRunner, RunnerSettings
from vocabulary import BUY, LONG_BIAS, SHORT_BIAS

RULES = PairRules()
CONFIG = GridConfig(
    rules=RULES, slots=2, entry_pct=1.0, slot_step_pct=1.0, exit_pct=2.0, order_quote=20.0, recovery_after_sec=3600.0
)
SETTINGS = RunnerSettings(trend_fast=3, trend_slow=6, trend_band_pct=0.5, kelly_min_samples=2, reconcile_every_sec=300)
T0 = 1_767_225_600
FLAT = Posture()


def make_runner(config: GridConfig = CONFIG, exchange: PaperExchange | None = None, **kw) -> GridRunner:
    make = (lambda price: exchange) if exchange else paper_exchange_factory(RULES, start_quote=1000.0, base_share=0.5)
    return GridRunner(config, make, settings=SETTINGS, **kw)


def quiet(time: int, price: float) -> Candle:
    """A candle that stays well inside the grid's 1% entries."""
    return Candle(time, price, price * 1.001, price * 0.999, price, 1000.0)


def candle(time: int, low: float, high: float, close: float) -> Candle:
    return Candle(time, close, max(high, close), min(low, close), close, 1000.0)


def run(runner: GridRunner, c: Candle, posture: Posture = FLAT, regime: str = "RANGING") -> None:
    """One step at the close of ``c``, priced at its close."""
    runner.step(c.time + 60, [c], c.close, regime, posture)


def random_walk(seed: int, n: int, start: float = 0.1) -> list[Candle]:
    rng = np.random.default_rng(seed)
    out, price = [], start
    for i in range(n):
        close = price * math.exp(rng.normal(0.0, 0.004))
        high = max(price, close) * (1 + abs(rng.normal(0.0, 0.002)))
        low = min(price, close) * (1 - abs(rng.normal(0.0, 0.002)))
        out.append(Candle(T0 + 60 * i, price, high, low, close, 1000.0))
        price = close
    return out


def postures(seed: int, n: int) -> list[Posture]:
    rng = np.random.default_rng(seed)
    out, posture = [], FLAT
    for _ in range(n):
        if rng.random() < 0.02:
            tier = int(rng.integers(0, 3))
            direction = (LONG_BIAS, SHORT_BIAS)[int(rng.integers(0, 2))] if tier else "symmetric"
            posture = Posture(tier, direction, float(rng.uniform(0, 1)) if tier else 0.0)
        out.append(posture)
    return out


def by_leg(runner: GridRunner) -> dict[str, str]:
    return {key: oid for key, oid in runner.state.legs.items() if oid is not None}


def counting_places(exchange: PaperExchange) -> list[str]:
    """Record the client id of every order placed on ``exchange`` from now on."""
    placed: list[str] = []
    place = exchange.place

    def counted(order: OrderRequest, now: float) -> str:
        placed.append(order.client_id)
        return place(order, now)

    exchange.place = counted
    return placed


# the cycle ----------------------------------------------------------------------------


def test_the_first_step_funds_the_exchange_and_places_one_entry_per_leg():
    runner = make_runner()
    run(runner, quiet(T0, 0.1))
    ex = runner.exchange
    bal = ex.balances()
    assert bal.base == 5000.0 and bal.quote == pytest.approx(500.0)
    assert set(ex.open_orders()) == set(runner.state.orders) == set(by_leg(runner).values())
    assert {k: ex.open_orders()[oid].price for k, oid in by_leg(runner).items()} == {
        "0A": 0.101, "0B": 0.099, "1A": 0.102, "1B": 0.098
    }  # fmt: skip
    assert all(o.open for o in runner.state.orders.values())
    assert runner.changed and runner.last_candle_time == T0


def test_fills_from_candles_flow_into_a_cycle_and_are_recorded():
    fills: list[dict] = []
    runner = make_runner(record_fill=fills.append)
    run(runner, quiet(T0, 0.1), regime="BULLISH")
    run(runner, candle(T0 + 60, 0.0985, 0.1002, 0.0998))  # through the 0.099 buy, not the 0.098 one
    (exit_order,) = [o for o in runner.state.orders.values() if o.role == EXIT]
    assert (exit_order.side, exit_order.price) == ("sell", 0.10098)
    assert exit_order.id in runner.exchange.open_orders()

    run(runner, candle(T0 + 120, 0.0998, 0.10099, 0.1005))  # through the exit, short of the 0.101 sell
    state = runner.state
    assert state.cycles == 1 and exit_order.id not in state.orders
    volume = 202.02020202  # 20 / 0.099
    cycle = state.recent_cycles[0]
    assert cycle.gross_quote == pytest.approx((0.10098 - 0.099) * volume, abs=1e-12)
    assert cycle.net_quote == pytest.approx((0.10098 - 0.099) * volume - (0.099 + 0.10098) * volume * 0.0025)

    entry_row, exit_row = fills
    assert entry_row["role"] == "entry" and entry_row["cycle_net"] is None
    assert exit_row["role"] == "exit" and exit_row["cycle_net"] == cycle.net_quote
    assert (entry_row["ts"], exit_row["ts"]) == (T0 + 120, T0 + 180)
    for row in fills:
        assert (row["pair"], row["exchange"], row["slot"], row["leg"]) == ("XDGUSD", "paper", 0, "B")
        assert (row["regime_at_entry"], row["tier_at_entry"]) == ("BULLISH", 0)
        assert row["volume"] == volume and row["fee"] == pytest.approx(row["price"] * volume * 0.0025)
    assert runner.state.balances == runner.exchange.balances()


def test_the_trend_follows_the_candles_once():
    runner = make_runner()
    candles = [quiet(T0 + 60 * i, 0.1 * 1.01**i) for i in range(10)]
    runner.step(T0 + 600, candles, candles[-1].close, "RANGING", FLAT)
    assert runner.trend.samples == 10 and runner.trend.state == "bullish"
    runner.step(T0 + 660, candles, candles[-1].close, "RANGING", FLAT)  # nothing new
    assert runner.trend.samples == 10


def test_a_failed_poll_skips_the_step_and_records_the_error():
    errors: list[tuple] = []
    runner = make_runner(record_error=lambda source, message, now: errors.append((source, message, now)))
    run(runner, quiet(T0, 0.1))
    before = runner.state

    def busy(now, candle):
        raise RetryLater("EService:Busy")

    runner.exchange.poll_fills = busy
    runner.changed = False
    run(runner, quiet(T0 + 60, 0.1))
    assert errors == [("grid paper", "EService:Busy", T0 + 120)]
    assert runner.state == before and runner.last_candle_time == T0 and not runner.changed


# views --------------------------------------------------------------------------------


def test_views_before_the_first_step():
    runner = make_runner()
    assert runner.capacity_band == "normal"
    assert runner.operational(T0) is None
    assert runner.status_block(T0) is None
    assert runner.snapshot() is None


@pytest.mark.parametrize("max_open_orders, band", [(20, "normal"), (5, "caution"), (4, "stop")])
def test_capacity_band_of_the_open_orders(max_open_orders, band):
    runner = make_runner(GridConfig(slots=2, entry_pct=1.0, slot_step_pct=1.0, max_open_orders=max_open_orders))
    run(runner, quiet(T0, 0.1))
    assert len(runner.state.orders) == 4
    assert runner.capacity_band == band


def test_operational_signals_after_a_step():
    runner = make_runner()
    run(runner, quiet(T0, 0.1))
    signals = runner.operational(T0 + 60)
    assert signals["available"] is True
    assert (signals["capacity_band"], signals["capacity_headroom"]) == ("normal", 16)
    assert signals["fills_last_hour"] == 0 and signals["recovery_orders"] == 0
    assert signals["kelly_min_samples"] == 2 and set(signals["kelly"]) == {"RANGING", "BULLISH", "BEARISH"}


def keys(names: str) -> set[str]:
    return set(names.split())


# the `grid` block of /tmp/design/status_blocks.md
GRID_KEYS = keys(
    "exchange pair base_asset quote_asset posture balances pnl capacity distances exposure signals slots open_orders "
    "recent_fills recent_cycles notes"
)
NESTED_KEYS = {
    "posture": keys("tier direction source strength size suppressed_side since"),
    "balances": keys("quote base quote_reserved base_reserved quote_free base_free price equity_quote"),
    "pnl": keys("start_equity_quote net_quote realized_quote fees_quote cycles max_drawdown_pct"),
    "capacity": keys("open_orders max_open_orders headroom long_quote short_quote max_inventory_quote used band"),
    "distances": keys("vol_pct vol_ref_pct scale entry_pct exit_pct"),
    "exposure": keys("quote cap_quote"),
    "signals": keys("fills_last_hour recovery_orders trend kelly kelly_min_samples"),
}
ROW_KEYS = {
    "open_orders": keys("id slot leg role side price volume placed_at regime_at_entry recovery"),
    "recent_fills": keys("ts id slot leg role side price volume fee_quote"),
    "recent_cycles": keys(
        "closed_at slot leg entry_side entry_price exit_price volume gross_quote fees_quote net_quote regime_at_entry"
    ),
    "notes": keys("ts kind message"),
}


def test_the_status_block_has_the_documented_shape():
    runner = make_runner()
    tier2 = Posture(2, LONG_BIAS, 0.5)
    run(runner, quiet(T0, 0.1))
    run(runner, candle(T0 + 60, 0.0985, 0.1002, 0.0998), posture=tier2)  # the 0.099 buy fills
    runner.exchange.place(OrderRequest("x1-0Z", BUY, 0.09, 300.0), T0 + 170)  # for a note
    runner.reconcile(T0 + 170)
    run(runner, candle(T0 + 120, 0.0998, 0.10099, 0.1005), posture=tier2)  # its exit fills; the grace is over
    block = runner.status_block(T0 + 240)
    json.dumps(block)

    assert set(block) >= GRID_KEYS
    for key, keys in NESTED_KEYS.items():
        assert set(block[key]) == keys, key
    assert set(block["signals"]["trend"]) == {"state", "since", "ema_fast", "ema_slow"}
    for key, keys in ROW_KEYS.items():
        assert block[key], key
        for row in block[key]:
            assert keys <= set(row), key
    assert block["slots"] == [
        {"slot": 0, "A": "suppressed", "B": "entry"},
        {"slot": 1, "A": "suppressed", "B": "entry"},
    ]

    assert [block[k] for k in ("exchange", "pair", "base_asset", "quote_asset")] == ["paper", "XDGUSD", "DOGE", "USD"]
    assert block["posture"]["suppressed_side"] == "sell" and block["posture"]["tier"] == 2
    bal = block["balances"]
    assert bal["price"] == 0.1005
    assert bal["equity_quote"] == pytest.approx(bal["quote"] + bal["base"] * 0.1005)
    assert bal["quote_free"] == pytest.approx(bal["quote"] - bal["quote_reserved"])
    assert block["pnl"]["net_quote"] == pytest.approx(bal["equity_quote"] - block["pnl"]["start_equity_quote"])
    assert block["pnl"]["cycles"] == 1 and block["capacity"]["open_orders"] == len(block["open_orders"])
    times = [o["placed_at"] for o in block["open_orders"]]
    assert times == sorted(times, reverse=True)


# the replay's figures -----------------------------------------------------------------


def test_summary_figures_agree_with_the_books():
    fills: list[dict] = []
    runner = make_runner(record_fill=fills.append)
    candles = random_walk(seed=4, n=1500)
    for c, posture in zip(candles, postures(4, len(candles)), strict=True):
        run(runner, c, posture)
    price = candles[-1].close
    s = runner.summary(price)
    bal = runner.exchange.balances()

    exits = [f for f in fills if f["role"] == EXIT]
    assert s["cycles"] == runner.state.cycles == len(exits) > 10
    assert s["realized_pnl_usd"] == pytest.approx(sum(f["cycle_net"] for f in exits), abs=1e-6)
    assert s["fees_usd"] == pytest.approx(sum(f["fee"] for f in fills), abs=1e-6)
    assert s["net_pnl_usd"] == pytest.approx(s["end_equity_usd"] - s["start_equity_usd"], abs=2e-6)
    assert s["start_equity_usd"] == pytest.approx(1000.0, abs=1e-6)
    assert s["end_equity_usd"] == pytest.approx(bal.quote + bal.base * price, abs=1e-6)
    assert s["end_inventory"] == {"quote": round(bal.quote, 6), "base": round(bal.base, 8)}
    assert s["open_orders"] == len(runner.exchange.open_orders())
    assert s["max_drawdown_pct"] >= 0
    assert s["grid_max_drawdown_usd"] == round(runner.equity.grid_max_drawdown, 6) > 0
    assert s["inventory_peak_usd"] == round(runner.equity.inventory_peak, 6) > 0


def test_equity_track_follows_what_the_grid_adds_beyond_its_starting_inventory():
    """A hand-made run: 500 USD and 5000 DOGE at 0.10, then the grid sells, buys back, buys more."""
    eq = EquityTrack()
    marks = [  # (quote, base, price) -> equity, equity - 5000 x price, |base - 5000| x price
        (500.0, 5000.0, 0.10),  # 1000, 500, 0
        (610.0, 4000.0, 0.12),  # 1090, 490 (10 below the peak of 500), 120
        (420.0, 6000.0, 0.09),  # 960, 510 (a new peak), 90
        (420.0, 6000.0, 0.08),  # 900, 500, 80
        (340.0, 7000.0, 0.05),  # 690, 440 (70 below 510: the deepest), 100
        (340.0, 7000.0, 0.06),  # 760, 460, 120
    ]
    for quote, base, price in marks:
        eq.mark(quote + base * price, price, base)
    assert (eq.start, eq.start_base, eq.start_price) == (1000.0, 5000.0, 0.10)
    assert eq.excess_peak == pytest.approx(510.0)
    assert eq.grid_max_drawdown == pytest.approx(70.0)
    assert eq.inventory_peak == pytest.approx(120.0)
    assert eq.max_drawdown_pct == pytest.approx((1090.0 - 690.0) / 1090.0 * 100.0)


# persistence --------------------------------------------------------------------------


def test_a_restored_runner_continues_exactly_like_an_uninterrupted_one():
    candles, moods = random_walk(seed=11, n=600), postures(11, 600)
    fills_a: list[dict] = []
    fills_b: list[dict] = []
    a = make_runner(record_fill=fills_a.append)
    for c, posture in zip(candles[:300], moods[:300], strict=True):
        run(a, c, posture)
    snapshot = json.loads(json.dumps(a.snapshot()))
    cycles_at_snapshot = a.state.cycles

    b = make_runner(record_fill=fills_b.append)
    b.restore(snapshot, candles[299].close)
    assert to_dict(b.state) == to_dict(a.state)
    assert b.equity == a.equity  # the replay figures carry on too
    for i in range(300, 600):
        window = candles[i - 2 : i + 1]  # the newest candles, overlapping the last step's as a market feed's do
        a.step(candles[i].time + 60, window, candles[i].close, "RANGING", moods[i])
        b.step(candles[i].time + 60, window, candles[i].close, "RANGING", moods[i])
        assert b.state == a.state

    assert a.state.cycles > cycles_at_snapshot
    assert b.exchange.book.to_dict() == a.exchange.book.to_dict()
    assert b.trend == a.trend and b.equity == a.equity and b.last_candle_time == a.last_candle_time
    assert fills_b == fills_a[-len(fills_b) :] and fills_b
    assert b.summary(candles[-1].close) == a.summary(candles[-1].close)


# reconciliation -----------------------------------------------------------------------


def test_orders_placed_after_the_last_snapshot_are_adopted_not_placed_twice():
    exchange = PaperExchange(RULES, quote=500.0, base=5000.0)
    placed = counting_places(exchange)
    before_crash = make_runner(exchange=exchange)
    run(before_crash, quiet(T0, 0.1))
    snapshot = json.loads(json.dumps(before_crash.snapshot()))
    snapshot["paper_book"] = None  # the exchange keeps its own orders, as Kraken does
    run(before_crash, quiet(T0 + 60, 0.1006))  # the price moved: every entry is placed again, then the crash
    on_exchange = set(exchange.open_orders())
    assert len(on_exchange) == 4 and not on_exchange & set(snapshot_ids(snapshot))

    after_crash = make_runner(exchange=exchange)
    after_crash.restore(snapshot, 0.1006)
    run(after_crash, quiet(T0 + 60, 0.1006))

    assert set(exchange.open_orders()) == on_exchange  # nothing cancelled, nothing added
    assert set(by_leg(after_crash).values()) == on_exchange == set(after_crash.state.orders)
    assert all(o.open for o in after_crash.state.orders.values())
    assert len(placed) == len(set(placed)) == 8
    assert sum(n["kind"] == "reconciled" for n in after_crash.state.notes) == 4  # the snapshot's entries, gone


def snapshot_ids(snapshot: dict) -> list[str]:
    return [o["id"] for o in snapshot["engine"]["orders"]]


def test_an_unclaimed_order_on_the_exchange_is_cancelled_with_a_note():
    runner = make_runner()
    run(runner, quiet(T0, 0.1))
    runner.exchange.place(OrderRequest("x7-3B", BUY, 0.09, 300.0), T0 + 70)
    mine = dict(runner.state.orders)

    run(runner, quiet(T0 + 300, 0.1))  # the next reconciliation (every 300 s) finds it
    assert "x7-3B" not in runner.exchange.open_orders()
    assert set(runner.exchange.open_orders()) == set(mine) and runner.state.orders == mine
    (note,) = [n for n in runner.state.notes if n["kind"] == "reconciled"]
    assert "x7-3B" in note["message"] and note["ts"] == T0 + 360


def test_a_cancel_that_failed_is_sent_again_at_the_next_reconciliation():
    errors: list[tuple] = []
    runner = make_runner(record_error=lambda source, message, now: errors.append((source, message)))
    run(runner, quiet(T0, 0.1))
    old = set(runner.state.orders)
    cancel = runner.exchange.cancel

    def unavailable(client_id, now):
        raise RetryLater("EService:Unavailable")

    runner.exchange.cancel = unavailable
    run(runner, quiet(T0 + 60, 0.1006))  # every entry is stale; no cancel gets through
    assert len(errors) == 4 and old <= set(runner.exchange.open_orders())
    assert all(runner.state.orders[oid].cancelling for oid in old)

    runner.exchange.cancel = cancel
    run(runner, quiet(T0 + 360, 0.1006))
    assert not old & set(runner.exchange.open_orders())
    assert not old & set(runner.state.orders)
    assert set(runner.exchange.open_orders()) == set(runner.state.orders) == set(by_leg(runner).values())
