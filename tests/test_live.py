"""Live trading: ``python bot.py --live`` and the grid on Kraken's private API, against the local fake.

The fake (tests/fake_kraken_private.py) verifies every signature and nonce and
keeps its book with the paper exchange's rules, so what these tests see is
what the bot sent over HTTP.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from fake_kraken_private import API_KEY, API_SECRET, FakeKrakenPrivate

from candles import Candle
from clock import SimClock
from grid.engine import GridConfig, Posture
from grid.exchange import PairRules
from grid.runner import GridRunner, RunnerSettings
from kraken.exchange import KrakenExchange
from kraken.private_client import KrakenPrivateClient, NonceSource
from market.sim import generate

START = 1_767_225_600
RULES = PairRules()
CONFIG = GridConfig(rules=RULES, slots=2, entry_pct=0.5, slot_step_pct=0.5, exit_pct=1.0, order_quote=20.0)
SETTINGS = RunnerSettings(trend_fast=3, trend_slow=6, kelly_min_samples=2, reconcile_every_sec=300)
LIVE_ENV = {"KRAKEN_API_KEY": API_KEY, "KRAKEN_API_SECRET": API_SECRET, "LIVE_TRADING_CONFIRM": "real-money"}


def kraken_runner(
    url: str, clock: SimClock, nonce_path: Path, session: requests.Session, config: GridConfig = CONFIG
) -> GridRunner:
    """A grid on a fresh client and exchange (a new process after a crash would build exactly this)."""
    client = KrakenPrivateClient(
        url, API_KEY, API_SECRET, nonce=NonceSource(nonce_path, time_fn=clock.now), sleep=clock.sleep, session=session
    )
    exchange = KrakenExchange(client, id_prefix="g")
    return GridRunner(config, lambda price: exchange, settings=SETTINGS, kind="live")


def legs_of_open_orders(fake: FakeKrakenPrivate) -> Counter:
    """How many open orders each (leg, role) holds on the exchange; ids end in -<slot><leg>."""
    return Counter(cid.rsplit("-", 1)[1] for cid in fake.open_cl_ord_ids())


def test_a_crash_between_add_order_and_the_snapshot_does_not_double_place(tmp_path):
    clock = SimClock(START)
    price = 0.1
    with FakeKrakenPrivate([], now=clock.now, rules=RULES, quote=500.0, base=5000.0) as fake, requests.Session() as s:
        first = kraken_runner(fake.url, clock, tmp_path / "nonce", s)
        first.step(clock.now(), [], price, "RANGING", Posture())
        assert len(fake.open_cl_ord_ids()) == 4  # 2 slots x (A, B)
        saved = first.snapshot()  # the last snapshot the process wrote

        # A candle fills leg 0B's buy entry; the runner books it and places the exit at once...
        buy_0b = next(o for o in first.state.orders.values() if o.leg == "B" and o.slot == 0)
        clock.advance(60)
        dip = Candle(START, price, price, buy_0b.price * 0.999, price * 0.997, 100.0)
        fake.on_candle(dip)
        first.step(clock.now(), [dip], dip.close, "RANGING", Posture())
        exit_ids = [o.id for o in first.state.orders.values() if o.role == "exit"]
        assert len(exit_ids) == 1 and exit_ids[0] in fake.open_cl_ord_ids()
        adds_before = len(fake.private_requests("AddOrder"))
        # ...and the process dies before writing the snapshot: `first` is gone.

        second = kraken_runner(fake.url, clock, tmp_path / "nonce", s)
        second.restore(saved, price=dip.close)
        clock.advance(15)
        second.step(clock.now(), [], dip.close, "RANGING", Posture())

        # The fill was found (QueryOrders), the exit it produced was adopted, not sent again.
        assert second.state.cycles == 0 and [o.id for o in second.state.orders.values() if o.role == "exit"] == exit_ids
        added = [r["params"].get("cl_ord_id") for r in fake.private_requests("AddOrder")[adds_before:]]
        assert exit_ids[0] not in added
        assert set(fake.open_cl_ord_ids()) == set(second.state.orders)
        assert all(n == 1 for n in legs_of_open_orders(fake).values()), fake.open_cl_ord_ids()


def test_an_order_of_this_bot_the_grid_does_not_know_is_cancelled(tmp_path):
    clock = SimClock(START)
    with FakeKrakenPrivate([], now=clock.now, rules=RULES) as fake, requests.Session() as s:
        stray = kraken_runner(fake.url, clock, tmp_path / "nonce", s)
        stray.step(clock.now(), [], 0.1, "RANGING", Posture())  # places g1..g4
        # A one-slot grid from an empty state claims g1-0A and g2-0B; slot 1's orders are strays.
        one_slot = GridConfig(**{**CONFIG.__dict__, "slots": 1})
        fresh = kraken_runner(fake.url, clock, tmp_path / "nonce", s, one_slot)
        fresh.step(clock.now(), [], 0.1, "RANGING", Posture())
        open_ids = set(fake.open_cl_ord_ids())
        assert open_ids == set(fresh.state.orders)  # the slot-1 orders it did not claim were cancelled
        assert any(n["kind"] == "reconciled" for n in fresh.state.notes)


# The process -----------------------------------------------------------------------------------------


def test_live_is_refused_without_keys_and_confirmation(tmp_path, bot_process):
    db = str(tmp_path / "live.sqlite3")
    p = bot_process(["--live", "--port", "0", "--db", db])
    assert p.proc.wait(30) == 2
    assert "--live needs KRAKEN_API_KEY and KRAKEN_API_SECRET" in p.output
    assert "LIVE_TRADING_CONFIRM=real-money" in p.output
    p = bot_process(["--live", "--port", "0", "--db", db], env={**LIVE_ENV, "LIVE_TRADING_CONFIRM": "yes"})
    assert p.proc.wait(30) == 2
    assert "set LIVE_TRADING_CONFIRM=real-money to confirm" in p.output


def test_live_refuses_to_start_when_kraken_rejects_the_key(tmp_path, bot_process):
    candles, _ = generate(100, seed=3, start=int(time.time() // 60 * 60) - 100 * 60)
    with FakeKrakenPrivate(candles, now=time.time) as fake:
        env = {**LIVE_ENV, "KRAKEN_API_KEY": "someone-else", "KRAKEN_API_URL": fake.url}
        p = bot_process(["--live", "--port", "0", "--db", str(tmp_path / "l.sqlite3")], env=env)
        assert p.proc.wait(30) == 2
        assert "--live: Kraken is not usable" in p.output
        assert not fake.open_cl_ord_ids()


def test_live_refuses_to_start_on_a_pair_kraken_does_not_list(tmp_path, bot_process):
    candles, _ = generate(100, seed=3, start=int(time.time() // 60 * 60) - 100 * 60)
    with FakeKrakenPrivate(candles, now=time.time) as fake:
        env = {**LIVE_ENV, "KRAKEN_API_URL": fake.url, "KRAKEN_NONCE_PATH": str(tmp_path / "nonce"), "PAIR": "NOPEUSD"}
        p = bot_process(["--live", "--port", "0", "--db", str(tmp_path / "l.sqlite3")], env=env)
        assert p.proc.wait(30) == 2
        assert "--live: PAIR=NOPEUSD is not a pair Kraken lists" in p.output
        assert "EQuery:Unknown asset pair" in p.output and "Traceback" not in p.output
        assert not fake.private_requests("AddOrder")


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_live_process_places_the_grid_and_a_restart_places_nothing_twice(tmp_path, bot_process, stop):
    now = time.time()
    first = int(now // 60 * 60) - 900 * 60
    candles, _ = generate(1000, seed=31, start=first)  # history up to now and a little beyond
    with FakeKrakenPrivate(candles, now=time.time, quote=500.0, base=5000.0) as fake:
        env = {
            **LIVE_ENV,
            "KRAKEN_API_URL": fake.url,
            "KRAKEN_NONCE_PATH": str(tmp_path / "kraken.nonce"),
            "LOOP_INTERVAL_SEC": "1",
            "TRADES_BACKFILL_ENABLED": "false",
            "HMM_SECONDARY_ENABLED": "false",
        }
        args = ["--live", "--port", "0", "--db", str(tmp_path / "live.sqlite3"), "--log-level", "INFO"]
        p = bot_process(args, env=env)
        p.wait_ready()
        st = p.wait_status(lambda s: s["grid"] is not None and len(s["grid"]["open_orders"]) == 6, timeout=60)
        assert st["mode"] == "live" and st["grid"]["exchange"] == "live"
        placed = {o["id"] for o in st["grid"]["open_orders"]}
        assert placed == set(fake.open_cl_ord_ids())
        assert "LIVE trading on Kraken" in p.output
        cycles = st["health"]["cycles"]
        p.wait_status(lambda s: s["health"]["cycles"] >= cycles + 2)  # the snapshot after placing is written
        assert (p.terminate() if stop == "terminate" else p.kill()) in (0, -9)

        adds = len(fake.private_requests("AddOrder"))
        again = bot_process(args, env=env)
        again.wait_ready()
        st = again.wait_status(lambda s: s["health"]["cycles"] >= 3, timeout=60)
        assert {o["id"] for o in st["grid"]["open_orders"]} == set(fake.open_cl_ord_ids()) == placed
        assert len(fake.private_requests("AddOrder")) == adds  # nothing placed again
        assert again.terminate() == 0
