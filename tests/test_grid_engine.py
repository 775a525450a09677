"""The grid engine through ``reduce`` and its pure helpers (SPEC section 8).

The test grid trades around a price of 1.0 so that the figures stay easy to
check by hand: slot 0 enters 1% from the market, slot 1 2%, exits are 2% from
the entry fill, and an entry of 99 USD buys exactly 100 DOGE at 0.99.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from decimal import ROUND_DOWN, Decimal
from itertools import pairwise

import numpy as np
import pytest

from candles import Candle
from grid.engine import (
    CYCLES_KEPT,
    ENTRY,
    EXIT,
    MIN_WITH_TREND_SHARE,
    Cancel,
    Filled,
    Gone,
    GridConfig,
    GridState,
    Order,
    Place,
    Placed,
    Posture,
    Rejected,
    Tick,
    capacity,
    entry_distance_pct,
    from_dict,
    initial_state,
    mark_to_market,
    reduce,
    reserved,
    side_cost,
    to_dict,
    vol_scale,
)
from grid.exchange import Balances, Fill, PairRules
from grid.paper_exchange import PaperExchange
from grid.runner import GridRunner
from vocabulary import BUY, LONG_BIAS, SELL, SHORT_BIAS

RULES = PairRules()
CONFIG = GridConfig(
    rules=RULES,
    slots=2,
    entry_pct=1.0,
    slot_step_pct=1.0,
    exit_pct=2.0,
    order_quote=99.0,
    skew=0.75,
    refresh_pct=0.5,
    grace_sec=60.0,
    recovery_after_sec=7200.0,
    max_open_orders=20,
    max_exposure_quote=10_000.0,
)
T0 = 1_767_225_600.0
FLAT = Posture()
PLENTY = Balances(quote=10_000.0, base=100_000.0)
LEG_KEYS = ("0A", "0B", "1A", "1B")


def long_bias(tier: int, strength: float = 0.4) -> Posture:
    return Posture(tier=tier, direction=LONG_BIAS, strength=strength)


def short_bias(tier: int, strength: float = 0.4) -> Posture:
    return Posture(tier=tier, direction=SHORT_BIAS, strength=strength)


def tick(state, now, price=1.0, posture=FLAT, *, balances=PLENTY, regime="RANGING", config=CONFIG):
    return reduce(state, Tick(now, price, regime, posture, balances), config)


def accept(state, actions, now, config=CONFIG):
    """Answer ``actions`` as an exchange that takes every order would: Placed for a Place, Gone for a Cancel."""
    for action in actions:
        if isinstance(action, Place):
            event = Placed(action.order.id, action.order.price, action.order.volume)
        else:
            event = Gone(action.order_id, now)
        state, more = reduce(state, event, config)
        assert more == []
    return state


def step(state, now, price=1.0, posture=FLAT, **kw):
    """One Tick whose actions the exchange accepts; returns the state and the Tick's actions."""
    config = kw.get("config", CONFIG)
    state, actions = tick(state, now, price, posture, **kw)
    return accept(state, actions, now, config), actions


def started(now=T0, price=1.0, posture=FLAT, *, config=CONFIG, balances=PLENTY, regime="RANGING"):
    state = initial_state(config, balances, now)
    state, _ = step(state, now, price, posture, config=config, balances=balances, regime=regime)
    return state


def held_by(state: GridState, key: str) -> Order:
    return state.orders[state.legs[key]]


def fill_of(order: Order, ts: float, *, price: float | None = None, volume: float | None = None) -> Fill:
    price = order.price if price is None else price
    volume = order.volume if volume is None else volume
    return Fill(order.id, f"TX-{order.id}", order.side, price, volume, RULES.fee(price, volume), ts)


def fill(state, order, ts, market=1.0, **kw):
    """Reduce a fill of ``order`` (whole unless ``volume``) with the market at ``market``; accept what it places."""
    state, actions = reduce(state, Filled(fill_of(order, ts, **kw), market), CONFIG)
    return accept(state, actions, ts), actions


def places(actions) -> dict[str, Order]:
    return {f"{a.order.slot}{a.order.leg}": a.order for a in actions if isinstance(a, Place)}


def cancelled(actions) -> list[str]:
    return [a.order_id for a in actions if isinstance(a, Cancel)]


def notes(state: GridState, kind: str) -> list[dict]:
    return [n for n in state.notes if n["kind"] == kind]


def entry_filled(key: str = "0B", market: float = 1.0):
    """A started grid whose ``key`` entry filled at its price; returns the state and the exit."""
    state = started()
    entry = held_by(state, key)
    state, actions = fill(state, entry, T0 + 60, market)
    (exit_order,) = places(actions).values()
    return state, exit_order


# the first tick -----------------------------------------------------------------------


def test_first_tick_places_one_entry_per_leg_sells_above_and_buys_below():
    state = initial_state(CONFIG, PLENTY, T0)
    state, actions = tick(state, T0, 1.0, regime="BULLISH")

    assert all(isinstance(a, Place) for a in actions) and len(actions) == 4
    planned = places(actions)
    assert {k: (o.side, o.price, o.volume) for k, o in planned.items()} == {
        "0A": (SELL, 1.01, 98.01980198),
        "0B": (BUY, 0.99, 100.0),
        "1A": (SELL, 1.02, 97.05882352),
        "1B": (BUY, 0.98, 101.02040816),
    }
    for key, o in planned.items():
        assert o.role == "entry" and not o.open
        assert (o.regime_at_entry, o.tier_at_entry) == ("BULLISH", 0)
        assert o.placed_at == T0
        assert state.legs[key] == o.id and state.orders[o.id] == o
    assert len({o.id for o in planned.values()}) == 4


def test_entries_record_the_tier_they_were_placed_at():
    state = started(posture=long_bias(1), regime="BULLISH")
    assert {(o.regime_at_entry, o.tier_at_entry) for o in state.orders.values()} == {("BULLISH", 1)}


def test_entry_prices_are_rounded_away_from_the_market_and_volumes_down_to_lots():
    config = GridConfig(slots=1, entry_pct=1.0, order_quote=20.0)
    state = initial_state(config, PLENTY, T0)
    _, actions = tick(state, T0, 0.123456789, config=config)
    planned = places(actions)
    # 0.123456789 x 0.99 = 0.12222222111 (buy: down), x 1.01 = 0.12469135689 (sell: up), 7 decimals
    assert planned["0B"].price == 0.1222222
    assert planned["0A"].price == 0.1246914
    for o in planned.values():
        lots = (Decimal("20") / Decimal(repr(o.price))).quantize(Decimal("1e-8"), rounding=ROUND_DOWN)
        assert o.volume == float(lots)


def test_placed_marks_the_order_open_as_the_exchange_holds_it():
    state, actions = tick(initial_state(CONFIG, PLENTY, T0), T0)
    order = places(actions)["0B"]
    state, more = reduce(state, Placed(order.id, 0.9899, 99.5), CONFIG)
    assert more == []
    held = state.orders[order.id]
    assert (held.open, held.price, held.volume) == (True, 0.9899, 99.5)


def test_the_same_events_give_the_same_actions_and_ids_are_never_reused():
    def script():
        state = initial_state(CONFIG, PLENTY, T0)
        log = []
        state, actions = step(state, T0)
        log.append(actions)
        state, actions = fill(state, held_by(state, "0B"), T0 + 30)
        log.append(actions)
        for i, price in enumerate([1.0, 1.01, 0.99, 1.02]):
            state, actions = step(state, T0 + 60 * (i + 1), price, long_bias(1, 0.2 * i))
            log.append(actions)
        return state, log

    state_1, log_1 = script()
    state_2, log_2 = script()
    assert log_1 == log_2 and state_1 == state_2
    ids = [a.order.id for actions in log_1 for a in actions if isinstance(a, Place)]
    assert len(ids) > 8 and len(ids) == len(set(ids))


def test_reduce_never_changes_the_state_it_was_given():
    state = started()
    before = json.dumps(to_dict(state), sort_keys=True)
    reduce(state, Tick(T0 + 60, 1.05, "BEARISH", short_bias(2), Balances(0.0, 0.0)), CONFIG)
    reduce(state, Filled(fill_of(held_by(state, "0B"), T0 + 60), 1.0), CONFIG)
    reduce(state, Gone(state.legs["0A"], T0 + 60), CONFIG)
    assert json.dumps(to_dict(state), sort_keys=True) == before


# fills and cycles ---------------------------------------------------------------------


def test_an_entry_fill_places_the_exit_exit_pct_from_the_fill_on_the_same_leg():
    state, sell_exit = entry_filled("0B")
    assert (sell_exit.role, sell_exit.side, sell_exit.price, sell_exit.volume) == (EXIT, SELL, 1.0098, 100.0)
    assert (sell_exit.slot, sell_exit.leg, sell_exit.entry_price, sell_exit.entry_at) == (0, "B", 0.99, T0 + 60)
    assert sell_exit.entry_fee == pytest.approx(0.2475, abs=1e-12)  # 0.99 x 100 x 0.25%
    assert state.legs["0B"] == sell_exit.id and state.orders[sell_exit.id].open

    state, buy_exit = entry_filled("0A")
    assert (buy_exit.side, buy_exit.price, buy_exit.volume) == (BUY, 0.9898, 98.01980198)  # 1.01 x 0.98
    assert state.legs["0A"] == buy_exit.id


def test_the_exit_keeps_the_regime_and_tier_of_its_entry():
    state = started(posture=long_bias(1), regime="BULLISH")
    state, actions = fill(state, held_by(state, "0B"), T0 + 60)
    (exit_order,) = places(actions).values()
    assert (exit_order.regime_at_entry, exit_order.tier_at_entry) == ("BULLISH", 1)


def test_an_exit_is_never_priced_on_the_taking_side_of_the_market():
    _, sell_exit = entry_filled("0B", market=1.05)  # the market gapped above entry + 2%
    assert sell_exit.price == 1.0500001
    _, buy_exit = entry_filled("0A", market=0.95)
    assert buy_exit.price == 0.9499999


def test_an_exit_fill_completes_a_cycle_net_of_both_fees():
    state, sell_exit = entry_filled("0B")
    state, actions = fill(state, sell_exit, T0 + 600)
    assert actions == []

    # entry: buy 100 @ 0.99, fee 0.2475; exit: sell 100 @ 1.0098, fee 0.25245
    (cycle,) = state.recent_cycles
    assert (cycle.slot, cycle.leg, cycle.entry_side) == (0, "B", BUY)
    assert (cycle.entry_price, cycle.exit_price, cycle.volume) == (0.99, 1.0098, 100.0)
    assert (cycle.opened_at, cycle.closed_at, cycle.regime_at_entry) == (T0 + 60, T0 + 600, "RANGING")
    assert cycle.gross_quote == pytest.approx(1.98, abs=1e-9)
    assert cycle.fees_quote == pytest.approx(0.49995, abs=1e-9)
    assert cycle.net_quote == pytest.approx(1.48005, abs=1e-9)
    assert state.cycles == 1
    assert state.realized_quote == pytest.approx(1.48005, abs=1e-9)
    assert state.fees_quote == pytest.approx(0.49995, abs=1e-9)
    assert state.balances.quote == pytest.approx(10_000 - 99 - 0.2475 + 100.98 - 0.25245, abs=1e-9)
    assert state.balances.base == pytest.approx(100_000.0, abs=1e-9)
    edge = state.edges["RANGING"]
    assert (edge.wins, edge.losses) == (1, 0)
    assert edge.win_sum == pytest.approx(1.48005 / 99.0)
    assert len(state.fill_times) == 2 and state.recent_fills[0]["role"] == EXIT

    assert state.legs["0B"] is None
    _, actions = tick(state, T0 + 660)
    assert list(places(actions)) == ["0B"] and places(actions)["0B"].side == BUY


def test_a_sell_first_cycle_books_sell_minus_buy():
    state, buy_exit = entry_filled("0A")
    state, _ = fill(state, buy_exit, T0 + 600)
    (cycle,) = state.recent_cycles
    volume = 98.01980198
    assert cycle.entry_side == SELL
    assert cycle.gross_quote == pytest.approx((1.01 - 0.9898) * volume, abs=1e-12)
    assert cycle.fees_quote == pytest.approx((1.01 + 0.9898) * volume * 0.0025, abs=1e-12)
    assert cycle.net_quote == pytest.approx(cycle.gross_quote - cycle.fees_quote, abs=1e-12)


def test_a_cycle_books_the_regime_its_entry_was_placed_in():
    state = started(regime="BULLISH")
    state, actions = fill(state, held_by(state, "0B"), T0 + 60)
    state, _ = step(state, T0 + 120, regime="BEARISH")
    state, _ = fill(state, places(actions)["0B"], T0 + 180)
    assert state.recent_cycles[0].regime_at_entry == "BULLISH"
    assert set(state.edges) == {"BULLISH"}


def test_a_partial_exit_fill_books_its_part_and_keeps_an_exit_for_the_rest():
    # Kraken reports a part that executed before the rest was cancelled: the rest of the position stays held.
    state, sell_exit = entry_filled("0B")
    state, actions = fill(state, sell_exit, T0 + 600, volume=40.0)
    assert actions == []
    # 40 of 100: gross 0.0198 x 40, entry fee 0.2475 x 0.4 pro rata, exit fee 1.0098 x 40 x 0.25%
    (cycle,) = state.recent_cycles
    assert cycle.volume == 40.0
    assert cycle.gross_quote == pytest.approx(0.792, abs=1e-9)
    assert cycle.fees_quote == pytest.approx(0.099 + 0.10098, abs=1e-9)
    assert cycle.net_quote == pytest.approx(0.59202, abs=1e-9)

    assert sell_exit.id not in state.orders  # the closed order's id is not reused
    rest = held_by(state, "0B")
    assert (rest.role, rest.volume, rest.open, rest.entry_price) == (EXIT, 60.0, False, 0.99)
    state, actions = step(state, T0 + 660)
    assert [(a.order.id, a.order.volume) for a in actions if a.order.role == EXIT] == [(rest.id, 60.0)]

    state, _ = fill(state, state.orders[rest.id], T0 + 700)
    assert state.cycles == 2 and state.legs["0B"] is None
    assert state.realized_quote == pytest.approx(1.48005, abs=1e-9)  # the same as one whole cycle
    assert state.fees_quote == pytest.approx(0.49995, abs=1e-9)


# tier 1: skew -------------------------------------------------------------------------


def test_tier1_long_bias_moves_the_buy_entry_closer_and_the_sell_entry_farther():
    state = started(posture=long_bias(1, 0.4))  # skew 0.75 x 0.4 = 0.3
    prices = {k: held_by(state, k).price for k in LEG_KEYS}
    assert prices == {"0B": 0.993, "0A": 1.013, "1B": 0.986, "1A": 1.026}


def test_tier1_short_bias_moves_the_sell_entry_closer_and_the_buy_entry_farther():
    state = started(posture=short_bias(1, 0.4))
    prices = {k: held_by(state, k).price for k in LEG_KEYS}
    assert prices == {"0B": 0.987, "0A": 1.007, "1B": 0.974, "1A": 1.014}


def test_tier0_posture_is_symmetric_whatever_its_direction_says():
    assert entry_distance_pct(CONFIG, Posture(0, LONG_BIAS, 1.0), 0, "B") == 1.0
    assert entry_distance_pct(CONFIG, Posture(0, LONG_BIAS, 1.0), 0, "A") == 1.0


@pytest.mark.parametrize("direction, with_leg, against_leg", [(LONG_BIAS, "B", "A"), (SHORT_BIAS, "A", "B")])
def test_tier1_skew_grows_with_strength(direction, with_leg, against_leg):
    strengths = [0.0, 0.2, 0.5, 0.8, 1.0]
    with_trend = [entry_distance_pct(CONFIG, Posture(1, direction, s), 1, with_leg) for s in strengths]
    against = [entry_distance_pct(CONFIG, Posture(1, direction, s), 1, against_leg) for s in strengths]
    assert with_trend[0] == against[0] == 2.0
    assert all(a > b for a, b in pairwise(with_trend))
    assert all(a < b for a, b in pairwise(against))


def test_tier1_never_moves_the_with_trend_entry_closer_than_its_floor_share():
    config = GridConfig(slots=1, entry_pct=1.0, order_quote=99.0, skew=1.0)
    for strength in (0.8, 0.95, 1.0, 3.0):
        share = entry_distance_pct(config, long_bias(1, strength), 0, "B") / 1.0
        assert share == pytest.approx(MIN_WITH_TREND_SHARE)
    state = started(posture=long_bias(1, 1.0), config=config)
    assert held_by(state, "0B").price == 0.9975  # 1% x 0.25 below the market


def test_a_posture_change_reprices_resting_entries_once():
    state = started()
    old = {k: state.legs[k] for k in LEG_KEYS}
    state, actions = step(state, T0 + 60, posture=long_bias(1, 0.4))
    assert sorted(cancelled(actions)) == sorted(old.values())
    assert {k: o.price for k, o in places(actions).items()} == {"0B": 0.993, "0A": 1.013, "1B": 0.986, "1A": 1.026}
    assert all(oid not in state.orders for oid in old.values())  # Gone confirmed the cancels

    for now in (T0 + 120, T0 + 180):
        state, actions = step(state, now, posture=long_bias(1, 0.4))
        assert actions == []


def test_cancelled_entries_stay_until_the_exchange_confirms():
    state = started()
    state, actions = tick(state, T0 + 60, posture=short_bias(1, 0.4))
    for oid in cancelled(actions):
        assert state.orders[oid].cancelling
    state, more = reduce(state, Gone(cancelled(actions)[0], T0 + 60), CONFIG)
    assert more == [] and cancelled(actions)[0] not in state.orders


# tier 2: suppression ------------------------------------------------------------------


def test_tier2_keeps_against_trend_entries_during_the_grace_then_cancels_them():
    state = started()
    sells = {state.legs["0A"], state.legs["1A"]}
    state, actions = step(state, T0 + 60, posture=long_bias(2, 0.0))  # strength 0: no reprice, only suppression
    assert actions == []
    state, actions = step(state, T0 + 119, posture=long_bias(2, 0.0))
    assert actions == [] and sells <= set(state.orders)

    state, actions = step(state, T0 + 120, posture=long_bias(2, 0.0))
    assert set(cancelled(actions)) == sells
    assert places(actions) == {}
    assert state.legs["0A"] is None and state.legs["1A"] is None
    assert not sells & set(state.orders)
    assert {o.side for o in state.orders.values()} == {BUY}


def test_tier2_grace_counts_from_the_posture_change_not_from_the_callers_since():
    state = started()
    buys = {state.legs["0B"], state.legs["1B"]}
    old_since = T0 - 86_400
    state, actions = step(state, T0 + 3600, posture=Posture(2, SHORT_BIAS, 0.0, since=old_since))
    assert actions == [] and state.posture.since == T0 + 3600
    state, actions = step(state, T0 + 3660, posture=Posture(2, SHORT_BIAS, 0.0, since=old_since))
    assert set(cancelled(actions)) == buys
    assert {o.side for o in state.orders.values()} == {SELL}


def test_tier2_places_no_against_trend_entry_and_the_favoured_side_keeps_entering():
    state = started(posture=long_bias(2, 0.4))
    assert {k: state.legs[k] is not None for k in LEG_KEYS} == {"0A": False, "0B": True, "1A": False, "1B": True}

    entry = held_by(state, "0B")
    state, actions = fill(state, entry, T0 + 30)
    state, _ = fill(state, places(actions)["0B"], T0 + 90)
    assert state.cycles == 1
    for now in (T0 + 120, T0 + 600):
        state, actions = step(state, now, posture=long_bias(2, 0.4))
        assert all(o.leg == "B" for o in places(actions).values())
    assert state.legs["0B"] is not None and state.legs["0A"] is None and state.legs["1A"] is None


def test_exits_are_never_cancelled_by_any_posture_change():
    state, a_exit = entry_filled("0A")
    b_entry = held_by(state, "0B")
    state, actions = fill(state, b_entry, T0 + 61)
    b_exit = places(actions)["0B"]
    exits = {a_exit.id, b_exit.id}

    now = T0 + 120
    for posture in [long_bias(2, 1.0), short_bias(2, 1.0), long_bias(1, 0.9), FLAT, short_bias(2, 0.3)]:
        for _ in range(4):
            now += 60
            state, actions = step(state, now, posture=posture)
            assert not exits & set(cancelled(actions))
            assert exits <= set(state.orders)
    assert {state.legs["0A"], state.legs["0B"]} == exits


def test_a_suppressed_leg_enters_again_when_the_tier_drops():
    for lower in (long_bias(1, 0.4), FLAT):
        state = started(posture=long_bias(2, 0.4))
        state, _ = step(state, T0 + 600, posture=long_bias(2, 0.4))
        assert state.legs["0A"] is None and state.legs["1A"] is None
        state, actions = step(state, T0 + 660, posture=lower)
        assert {"0A", "1A"} <= set(places(actions))
        assert places(actions)["0A"].side == SELL
        assert state.legs["0A"] is not None and state.legs["1A"] is not None


# refresh ------------------------------------------------------------------------------


def test_a_stale_entry_is_refreshed_when_the_price_moves_more_than_refresh_pct():
    state = started()
    old = set(state.orders)
    state, actions = step(state, T0 + 60, price=1.006)  # targets moved 0.6% > 0.5%
    assert set(cancelled(actions)) == old
    assert places(actions)["0B"].price == 0.99594 and places(actions)["0A"].price == 1.01606
    assert not old & set(state.orders)


def test_a_refresh_with_just_enough_funds_replaces_the_entry_in_the_same_tick():
    # 100 USD funds one buy of ~99.25; the refreshed entry needs the funds its cancelled one held.
    config = GridConfig(rules=RULES, slots=1, entry_pct=1.0, order_quote=99.0, max_open_orders=2)
    tight = Balances(quote=100.0, base=100_000.0)
    state = started(config=config, balances=tight)
    old = state.legs["0B"]
    state, actions = step(state, T0 + 60, price=1.006, config=config, balances=tight)
    assert old in cancelled(actions) and "0B" in places(actions)
    assert not notes(state, "unfunded") and not notes(state, "capacity")


def test_an_entry_is_not_refreshed_below_refresh_pct():
    state = started()
    for now, price in [(T0 + 60, 1.004), (T0 + 120, 0.996), (T0 + 180, 1.0)]:
        state, actions = step(state, now, price=price)
        assert actions == []


# recovery -----------------------------------------------------------------------------


def test_an_old_exit_becomes_a_recovery_order_and_keeps_its_leg():
    state, sell_exit = entry_filled("0B")  # entry filled at T0 + 60
    state, actions = step(state, T0 + 60 + 7199)
    assert actions == [] and not state.orders[sell_exit.id].recovery

    # Flagged, not released: the leg does not buy again lower behind a stranded position.
    state, actions = step(state, T0 + 60 + 7200, price=0.95)
    assert state.orders[sell_exit.id].recovery
    assert state.legs["0B"] == sell_exit.id and "0B" not in places(actions)
    assert state.orders[sell_exit.id].price == sell_exit.price  # and its target stays: no loss is booked


def test_a_recovery_order_completes_a_cycle_and_its_leg_enters_again():
    state, sell_exit = entry_filled("0B")
    state, _ = step(state, T0 + 60 + 7200)
    state, actions = fill(state, state.orders[sell_exit.id], T0 + 8000)
    assert actions == []
    assert state.cycles == 1 and state.realized_quote == pytest.approx(1.48005, abs=1e-9)
    assert sell_exit.id not in state.orders and state.legs["0B"] is None
    _, actions = tick(state, T0 + 8060)
    assert places(actions)["0B"].role == "entry"


# funds, exposure and capacity ---------------------------------------------------------


def test_an_unfundable_buy_entry_is_skipped_with_one_note_while_it_lasts():
    # 150 USD pays slot 0's buy (99 + 0.2475 fee), not slot 1's as well, once slot 0 has reserved its part
    poor = Balances(quote=150.0, base=100_000.0)
    state = started(balances=poor)
    assert held_by(state, "0B").side == BUY and state.legs["1B"] is None
    for now in (T0 + 60, T0 + 120):
        state, actions = step(state, now, balances=poor)
        assert actions == []
    (note,) = notes(state, "unfunded")
    assert note["message"].startswith("slot 1 B buy entry not placed")
    assert state.skipped == {"unfunded": 3}

    state, actions = step(state, T0 + 180, balances=PLENTY)
    assert list(places(actions)) == ["1B"] and "1B" not in state.blocked
    state, _ = step(state, T0 + 240, balances=poor)  # the placed entry still reserves its quote
    assert len(notes(state, "unfunded")) == 1

    state, _ = reduce(state, Gone(state.legs["1B"], T0 + 250), CONFIG)
    state, _ = step(state, T0 + 300, balances=poor)
    assert len(notes(state, "unfunded")) == 2  # a new shortage is noted again
    assert state.skipped == {"unfunded": 4}


def test_a_buy_entry_must_be_funded_including_its_fee():
    config = GridConfig(slots=1, entry_pct=1.0, order_quote=99.0)  # buys 100 @ 0.99: 99 + 0.2475 fee
    state = started(config=config, balances=Balances(quote=99.2, base=1000.0))
    assert state.legs["0B"] is None and notes(state, "unfunded")
    state = started(config=config, balances=Balances(quote=99.2475, base=1000.0))
    assert held_by(state, "0B").side == BUY and state.skipped == {}


def test_an_unfundable_sell_entry_counts_the_base_that_open_orders_reserve():
    poor = Balances(quote=10_000.0, base=150.0)  # slot 0's sell takes 98.02 of it
    state = started(balances=poor)
    assert state.legs["0A"] is not None and state.legs["1A"] is None
    (note,) = notes(state, "unfunded")
    assert "slot 1 A sell" in note["message"]
    assert reserved(CONFIG, state.orders).base == pytest.approx(98.01980198)


def test_no_entry_is_placed_when_nothing_is_funded():
    state = started(balances=Balances(0.0, 0.0))
    assert state.orders == {} and state.skipped == {"unfunded": 4}
    assert len(notes(state, "unfunded")) == 4


def test_the_exposure_cap_skips_entries_beyond_it():
    config = GridConfig(slots=2, entry_pct=1.0, slot_step_pct=1.0, exit_pct=2.0, order_quote=99.0,
                        max_exposure_quote=250.0)  # fmt: skip
    state = started(config=config)
    assert state.legs["0A"] is not None and state.legs["0B"] is not None
    assert state.legs["1A"] is None and state.legs["1B"] is None
    assert len(notes(state, "exposure_cap")) == 2 and state.skipped == {"exposure_cap": 2}
    state, actions = step(state, T0 + 60, config=config)
    assert actions == [] and len(notes(state, "exposure_cap")) == 2 and state.skipped == {"exposure_cap": 4}


def test_the_exposure_cap_counts_positions_waiting_for_their_exits():
    state, _ = entry_filled("0B")
    state, _ = fill(state, held_by(state, "0A"), T0 + 70)  # two positions of 99 USD wait for their exits
    for key in ("1A", "1B"):
        state, _ = reduce(state, Gone(state.legs[key], T0 + 80), CONFIG)
    capped = replace(CONFIG, max_exposure_quote=250.0)
    state, actions = tick(state, T0 + 120, config=capped)
    assert actions == [] and state.skipped == {"exposure_cap": 2}
    assert "exposure would be 297.00" in notes(state, "exposure_cap")[0]["message"]


def test_max_open_orders_skips_entries_as_capacity():
    config = GridConfig(slots=2, entry_pct=1.0, slot_step_pct=1.0, order_quote=99.0, max_open_orders=3)
    state = started(config=config)
    assert len(state.orders) == 3 and state.legs["1B"] is None
    (note,) = notes(state, "capacity")
    assert "slot 1 B" in note["message"]
    assert state.skipped == {"capacity": 1}


def resting(n: int, side: str = BUY) -> dict[str, Order]:
    return {f"e{i}": Order(f"e{i}", 0, "B", ENTRY, side, 1.0, 1.0, T0, "RANGING", 0, open=True) for i in range(n)}


def position(oid: str, side: str, cost: float) -> Order:
    """An exit holding a position that cost ``cost`` (a sell exit holds a long, a buy exit a short)."""
    return Order(oid, 0, "B" if side == SELL else "A", EXIT, side, 2.0, cost, T0, "RANGING", 0, open=True,
                 entry_price=1.0, entry_at=T0)  # fmt: skip


@pytest.mark.parametrize(
    "open_orders, band, headroom",
    [(0, "normal", 10), (6, "normal", 4), (7, "caution", 3), (8, "caution", 2), (9, "stop", 1), (10, "stop", 0),
     (12, "stop", 0)],
)  # fmt: skip
def test_capacity_bands_by_open_orders(open_orders, band, headroom):
    config = GridConfig(max_open_orders=10, caution_share=0.7, stop_share=0.9)
    cap = capacity(config, resting(open_orders))
    assert (cap["open_orders"], cap["max_open_orders"], cap["headroom"], cap["band"]) == (
        open_orders, 10, headroom, band
    )  # fmt: skip


@pytest.mark.parametrize(
    "longs, shorts, band",
    [((), (), "normal"), ((30.0, 30.0), (60.0,), "normal"), ((40.0, 35.0), (), "caution"), ((), (50.0, 40.0), "stop"),
     ((50.0, 40.0), (50.0, 40.0), "stop")],
)  # fmt: skip
def test_capacity_band_by_the_fuller_side_against_the_inventory_cap(longs, shorts, band):
    config = GridConfig(max_inventory_quote=100.0, max_open_orders=1000)
    orders = {f"L{i}": position(f"L{i}", SELL, c) for i, c in enumerate(longs)}
    orders |= {f"S{i}": position(f"S{i}", BUY, c) for i, c in enumerate(shorts)}
    cap = capacity(config, orders)
    assert cap["band"] == band
    assert (cap["long_quote"], cap["short_quote"]) == (pytest.approx(sum(longs)), pytest.approx(sum(shorts)))
    assert cap["used"] == pytest.approx(max(sum(longs), sum(shorts)) / 100.0)


def test_capacity_band_by_exposure():
    config = GridConfig(max_exposure_quote=10.0, max_open_orders=1000)
    assert capacity(config, resting(6))["band"] == "normal"
    assert capacity(config, resting(7))["band"] == "caution"
    assert capacity(config, resting(9))["band"] == "stop"


def test_the_inventory_cap_counts_one_sides_positions_and_resting_entries():
    config = replace(CONFIG, slots=3, max_inventory_quote=250.0)
    state = started(config=config)
    # Two entries of 99 USD per side rest; a third would make 297.
    assert state.legs["2A"] is None and state.legs["2B"] is None
    assert state.skipped == {"inventory_cap": 2}
    messages = sorted(n["message"] for n in notes(state, "inventory_cap"))
    assert messages[0].startswith("slot 2 A sell entry not placed: the short side would hold 29")
    assert messages[1].startswith("slot 2 B buy entry not placed: the long side would hold 29")

    # A filled entry's position counts at its cost, and the other side's positions do not offset it.
    state, _ = fill(state, held_by(state, "0B"), T0 + 60)
    state, _ = fill(state, held_by(state, "0A"), T0 + 70)
    state, actions = step(state, T0 + 120, config=config)
    assert actions == [] and state.legs["2B"] is None
    assert side_cost(state.orders, BUY) == pytest.approx(198.0, abs=0.01)
    # The short position closes: still no third buy, the long side holds the same.
    state, _ = fill(state, held_by(state, "0A"), T0 + 180)
    state, actions = step(state, T0 + 240, config=config)
    assert "2B" not in places(actions) and "0A" in places(actions)


def test_volatility_above_the_reference_widens_entries_and_exits():
    config = replace(CONFIG, vol_ref_pct=0.5)
    _, calm = reduce(initial_state(config, PLENTY, T0), Tick(T0, 1.0, "RANGING", FLAT, PLENTY, 0.4), config)
    assert {k: o.price for k, o in places(calm).items()} == {"0A": 1.01, "0B": 0.99, "1A": 1.02, "1B": 0.98}
    state, actions = reduce(initial_state(config, PLENTY, T0), Tick(T0, 1.0, "RANGING", FLAT, PLENTY, 1.0), config)
    # One hourly percent is twice the reference: every distance doubles.
    assert {k: o.price for k, o in places(actions).items()} == {"0A": 1.02, "0B": 0.98, "1A": 1.04, "1B": 0.96}
    state = accept(state, actions, T0, config)
    state, actions = reduce(state, Filled(fill_of(held_by(state, "0B"), T0 + 60), 0.98), config)
    assert places(actions)["0B"].price == pytest.approx(0.98 * 1.04)  # the exit 2 x 2% above the fill


def test_a_smaller_posture_size_replaces_resting_entries_at_once_and_sizes_new_ones():
    state = started()
    old = {state.legs[k] for k in LEG_KEYS}
    state, actions = step(state, T0 + 60, posture=Posture(size=0.5))
    assert set(cancelled(actions)) == old
    placed = places(actions)
    assert {k: o.price for k, o in placed.items()} == {"0A": 1.01, "0B": 0.99, "1A": 1.02, "1B": 0.98}
    # 49.5 USD each, but never below the pair's minimum of 50 DOGE
    assert (
        placed["0B"].volume == 50.0
        and placed["0A"].volume == 50.0
        and placed["1B"].volume == pytest.approx(50.51020408)
    )
    _, actions = step(state, T0 + 120, posture=Posture(size=0.5))
    assert actions == []
    # An exit keeps its entry's size; back at full size the entries are replaced again.
    state, actions = fill(state, held_by(state, "0B"), T0 + 130)
    assert places(actions)["0B"].volume == 50.0
    state, actions = step(state, T0 + 180)
    assert places(actions)["1B"].volume == pytest.approx(101.02040816)  # 99 USD at 0.98


# what the exchange answers ------------------------------------------------------------


def test_a_rejected_entry_frees_its_leg_and_enters_again_next_tick():
    state, actions = tick(initial_state(CONFIG, PLENTY, T0), T0)
    refused = places(actions)["0B"]
    state = accept(state, [a for a in actions if a.order.id != refused.id], T0)
    state, more = reduce(state, Rejected(refused.id, "funds", "EOrder:Insufficient funds", T0), CONFIG)
    assert more == []
    assert refused.id not in state.orders and state.legs["0B"] is None
    assert notes(state, "unfunded")[0]["message"].endswith("EOrder:Insufficient funds")
    assert state.skipped == {"unfunded": 1}

    _, actions = tick(state, T0 + 60)
    again = places(actions)["0B"]
    assert again.id != refused.id and again.price == refused.price


def test_a_rejected_exit_is_kept_and_placed_again_next_tick():
    state, sell_exit = entry_filled("0B")
    state, more = reduce(state, Rejected(sell_exit.id, "post_only", "would take", T0 + 60), CONFIG)
    assert more == []
    kept = state.orders[sell_exit.id]
    assert not kept.open and state.legs["0B"] == sell_exit.id
    assert notes(state, "rejected") == []  # a post-only refusal is routine

    state, more = reduce(state, Rejected(sell_exit.id, "other", "EService:Unavailable", T0 + 61), CONFIG)
    assert len(notes(state, "rejected")) == 1

    state, actions = tick(state, T0 + 120, price=1.03)  # re-priced above the market
    (again,) = [a for a in actions if isinstance(a, Place) and a.order.role == EXIT]
    assert again.order.id == sell_exit.id and again.order.price == 1.0300001 and again.order.volume == 100.0


def test_gone_of_a_cancelling_order_removes_it_silently():
    state = started()
    state, actions = tick(state, T0 + 60, price=1.01)
    oid = cancelled(actions)[0]
    state, more = reduce(state, Gone(oid, T0 + 60), CONFIG)
    assert more == [] and oid not in state.orders and state.notes == ()


def test_gone_of_an_open_exit_places_it_again():
    state, sell_exit = entry_filled("0B")
    state, more = reduce(state, Gone(sell_exit.id, T0 + 100), CONFIG)
    assert more == []
    assert not state.orders[sell_exit.id].open and state.legs["0B"] == sell_exit.id
    assert len(notes(state, "reconciled")) == 1
    _, actions = tick(state, T0 + 120)
    assert [a.order.id for a in actions if isinstance(a, Place)] == [sell_exit.id]


def test_gone_of_an_open_entry_frees_its_leg():
    state = started()
    oid = state.legs["1A"]
    state, _ = reduce(state, Gone(oid, T0 + 10), CONFIG)
    assert oid not in state.orders and state.legs["1A"] is None
    assert len(notes(state, "reconciled")) == 1


def test_a_fill_of_an_unknown_order_is_ignored_with_a_note():
    state = started()
    stray = Fill("x9-0B", "TX9", BUY, 0.99, 100.0, 0.2475, T0 + 60)
    after, actions = reduce(state, Filled(stray, 1.0), CONFIG)
    assert actions == []
    (note,) = notes(after, "reconciled")
    assert "x9-0B" in note["message"]
    assert after.orders == state.orders and after.balances == state.balances
    assert (after.fees_quote, after.fill_times) == (0.0, ())


def test_a_partial_fill_of_a_cancelling_entry_exits_the_filled_volume_only():
    state = started()
    entry = held_by(state, "0B")
    state, actions = tick(state, T0 + 60, price=1.01)  # refresh: the 0.99 buy is cancelled, a new one placed
    assert entry.id in cancelled(actions)
    state = accept(state, [a for a in actions if isinstance(a, Place)], T0 + 60)
    replacement = state.legs["0B"]

    partial = fill_of(entry, T0 + 60, volume=40.0)
    state, actions = reduce(state, Filled(partial, 1.01), CONFIG)
    (exit_place,) = actions
    assert (exit_place.order.side, exit_place.order.volume, exit_place.order.price) == (SELL, 40.0, 1.0100001)
    assert exit_place.order.entry_fee == pytest.approx(0.099)
    assert state.balances.base == pytest.approx(100_040.0)
    assert entry.id not in state.orders and state.legs["0B"] == replacement
    state, more = reduce(state, Gone(entry.id, T0 + 60), CONFIG)  # the cancel's confirmation follows
    assert more == [] and exit_place.order.id in state.orders


# persistence --------------------------------------------------------------------------


def busy_state() -> GridState:
    """A state with every kind of record: entries, exits, a recovery order, cycles, notes, skips, blocks."""
    state, sell_exit = entry_filled("0B")
    state, _ = fill(state, held_by(state, "0A"), T0 + 70)
    state, _ = fill(state, state.orders[state.legs["0A"]], T0 + 80)
    state, _ = step(state, T0 + 60 + 7200, price=1.001, posture=long_bias(1, 0.5), balances=Balances(150.0, 50.0))
    state, _ = reduce(state, Rejected(sell_exit.id, "other", "busy", T0 + 7300), CONFIG)
    assert state.orders[sell_exit.id].recovery and state.cycles == 1 and state.skipped and state.blocked
    return state


def test_to_dict_is_json_and_from_dict_restores_the_same_state():
    state = busy_state()
    text = json.dumps(to_dict(state))
    assert from_dict(json.loads(text), CONFIG) == state


def test_a_snapshot_with_fewer_slots_gains_idle_legs():
    state = started()
    bigger = GridConfig(slots=3, entry_pct=1.0, slot_step_pct=1.0, order_quote=99.0)
    restored = from_dict(to_dict(state), bigger)
    assert restored.legs == {**state.legs, "2A": None, "2B": None}


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda d: d.pop("seq"), KeyError),
        (lambda d: d["orders"][0].update(colour="red"), TypeError),
        (lambda d: d["orders"][0].update(price=math.nan), ValueError),
        (lambda d: d["orders"][0].update(volume=0.0), ValueError),
        (lambda d: d.update(cycles="many"), ValueError),
        (lambda d: d["posture"].update(level=1), TypeError),
        (lambda d: d["balances"].pop("base"), TypeError),
    ],
)
def test_a_bad_record_raises(spoil, error):
    data = json.loads(json.dumps(to_dict(busy_state())))
    spoil(data)
    with pytest.raises(error):
        from_dict(data, CONFIG)


# property: a random walk on the paper exchange ----------------------------------------


def random_walk(rng: np.random.Generator, n: int, start: float, t0: int) -> list[Candle]:
    candles, price = [], start
    for i in range(n):
        open_ = price
        close = open_ * math.exp(rng.normal(0.0, 0.003))
        high = max(open_, close) * (1 + abs(rng.normal(0.0, 0.0015)))
        low = min(open_, close) * (1 - abs(rng.normal(0.0, 0.0015)))
        candles.append(Candle(t0 + 60 * i, open_, high, low, close, 1000.0))
        price = close
    return candles


def random_posture(rng: np.random.Generator) -> Posture:
    tier = int(rng.integers(0, 3))
    direction = (LONG_BIAS, SHORT_BIAS)[int(rng.integers(0, 2))] if tier else "symmetric"
    strength = float(rng.uniform(0, 1)) if tier else 0.0
    return Posture(tier=tier, direction=direction, strength=strength, size=float(rng.choice([1.0, 1.0, 0.5])))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_walk_on_the_paper_exchange_keeps_the_books_straight(seed):
    rng = np.random.default_rng(seed)
    rules = PairRules()
    # Five slots of 20 USD could hold 100 a side: the inventory cap of 50 binds, and distances scale with the
    # volatility the runner measures (about 0.8 % an hour on this walk, above the 0.6 % reference).
    config = GridConfig(rules=rules, slots=5, entry_pct=0.35, slot_step_pct=0.35, exit_pct=1.0, order_quote=20.0,
                        recovery_after_sec=3600.0, max_open_orders=14, max_exposure_quote=250.0,
                        max_inventory_quote=50.0, vol_ref_pct=0.6)  # fmt: skip
    candles = random_walk(rng, 6000, 0.1, int(T0))
    exchange = PaperExchange(rules, quote=500.0, base=5000.0)
    start_base, start_price = 5000.0, candles[0].close
    start_equity = 500.0 + start_base * start_price
    fills: list[dict] = []
    runner = GridRunner(config, lambda price: exchange, record_fill=fills.append)

    cycles, posture, regimes = [], FLAT, ("RANGING", "BULLISH", "BEARISH")
    exits_seen: set[str] = set()
    recovery_steps = suppressed_steps = capped_steps = scaled_steps = 0
    for c in candles:
        if rng.random() < 0.01:
            posture = random_posture(rng)
        before = runner.state.cycles if runner.state else 0
        now = c.time + 60
        runner.step(now, [c], c.close, regimes[int(rng.integers(0, 3))], posture)
        state, book = runner.state, exchange.book

        new = state.cycles - before
        assert new <= CYCLES_KEPT
        cycles.extend(state.recent_cycles[:new])
        held = book.reserved()
        assert book.quote >= 0 and book.base >= 0
        assert held.quote <= book.quote + 1e-9 and held.base <= book.base + 1e-9
        assert state.balances == exchange.balances()
        assert set(book.orders) == set(state.orders) and all(o.open for o in state.orders.values())
        # an exit leaves the grid only by filling: the position is never forgotten
        exits_now = {oid for oid, o in state.orders.items() if o.role == EXIT}
        filled_ids = {f["order_id"] for f in fills}
        assert exits_seen - exits_now <= filled_ids
        exits_seen |= exits_now
        recovery_steps += any(o.recovery for o in state.orders.values())
        # the inventory cap holds on each side, whatever fills (the slots alone would allow 100)
        for side in (BUY, SELL):
            assert side_cost(state.orders, side) <= config.max_inventory_quote + 1e-6
        capped_steps += "inventory_cap" in state.blocked.values()
        scaled_steps += vol_scale(config, state.vol_pct) > 1.0
        p = state.posture
        if p.tier == 2 and now - p.since >= config.grace_sec:
            suppressed_steps += 1
            assert not [o for o in state.orders.values() if o.role == "entry" and o.leg == p.against_leg]

    state, end_price = runner.state, candles[-1].close
    assert len(cycles) == state.cycles > 5 and recovery_steps > 0 and suppressed_steps > 0
    assert capped_steps > 0 and scaled_steps > 0
    # every cycle nets more than both fees, at any size
    assert all(c.net_quote > 0 and c.gross_quote > c.fees_quote for c in cycles)
    assert state.realized_quote == pytest.approx(sum(c.net_quote for c in cycles), abs=1e-9)
    assert state.fees_quote == pytest.approx(sum(f["fee"] for f in fills), abs=1e-9)
    end = exchange.balances()
    end_equity = end.quote + end.base * end_price
    explained = (
        start_base * (end_price - start_price)
        + sum(c.gross_quote for c in cycles)
        + mark_to_market(state, end_price)
        - state.fees_quote
    )
    assert end_equity - start_equity == pytest.approx(explained, abs=1e-6)
