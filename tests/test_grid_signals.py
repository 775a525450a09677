"""Operational signals: the EMA trend detector, the Kelly edge and the advisor's operational block."""

from __future__ import annotations

import math

import pytest

from grid.engine import GridConfig, GridState, Order, RegimeEdge, kelly
from grid.exchange import Balances
from grid.signals import (
    BEARISH,
    BULLISH,
    NEUTRAL,
    TrendState,
    VolState,
    hourly_vol_pct,
    operational_signals,
    trend_from_dict,
    trend_to_dict,
    update_trend,
    update_vol,
    vol_from_dict,
    vol_to_dict,
    with_stranded_losses,
)
from vocabulary import BUY, SELL

T0 = 1_767_225_600.0
FAST, SLOW, BAND = 3, 6, 0.5


def feed(trend: TrendState, closes, start: float = T0) -> tuple[TrendState, list[TrendState]]:
    """``closes`` one a minute from ``start``; the final trend and every step's."""
    seen = []
    for i, close in enumerate(closes):
        trend = update_trend(trend, start + 60 * i, close, fast=FAST, slow=SLOW, band_pct=BAND)
        seen.append(trend)
    return trend, seen


def ramp(start: float, pct_per_step: float, n: int) -> list[float]:
    return [start * (1 + pct_per_step / 100) ** i for i in range(1, n + 1)]


def exit_order(oid: str, side: str, entry: float, *, recovery: bool, regime: str = "RANGING") -> Order:
    return Order(oid, 0, "B" if side == SELL else "A", "exit", side, entry * (1.01 if side == SELL else 0.99),
                 100.0, T0, regime, 1, open=True, recovery=recovery, entry_price=entry, entry_at=T0)  # fmt: skip


def entry_order(oid: str) -> Order:
    return Order(oid, 1, "B", "entry", BUY, 0.09, 200.0, T0, "RANGING", 0, open=True)


# the EMA trend ------------------------------------------------------------------------


def test_the_trend_is_neutral_while_warming_up():
    trend, seen = feed(TrendState(), ramp(0.1, 2.0, SLOW - 1))  # a steep ramp, but fewer than `slow` closes
    assert [t.state for t in seen] == [NEUTRAL] * (SLOW - 1)
    assert trend.samples == SLOW - 1 and trend.since == T0
    assert trend.ema_fast > trend.ema_slow  # the averages run from the first close


def test_the_first_close_seeds_both_averages():
    trend = update_trend(TrendState(), T0, 0.1, fast=FAST, slow=SLOW, band_pct=BAND)
    assert (trend.ema_fast, trend.ema_slow, trend.samples) == (0.1, 0.1, 1)
    second = update_trend(trend, T0 + 60, 0.2, fast=FAST, slow=SLOW, band_pct=BAND)
    assert second.ema_fast == pytest.approx(0.1 + 0.1 * 2 / 4)
    assert second.ema_slow == pytest.approx(0.1 + 0.1 * 2 / 7)


def test_a_sustained_ramp_up_is_bullish_from_the_first_detection():
    trend, seen = feed(TrendState(), ramp(0.1, 1.0, 20))
    states = [t.state for t in seen]
    first = states.index(BULLISH)
    assert first == SLOW - 1  # detected as soon as the slow average is warm
    assert states[first:] == [BULLISH] * (20 - first)
    assert {t.since for t in seen[first:]} == {T0 + 60 * first}
    assert trend.ema_fast / trend.ema_slow - 1 > BAND / 100


def test_a_sustained_ramp_down_is_bearish_and_a_flat_market_returns_to_neutral():
    trend, seen = feed(TrendState(), ramp(0.1, -1.0, 15))
    assert trend.state == BEARISH
    detected = trend.since
    assert detected == T0 + 60 * [t.state for t in seen].index(BEARISH)

    flat_start = T0 + 60 * 15
    trend, seen = feed(trend, [trend.ema_fast] * 30, start=flat_start)
    states = [t.state for t in seen]
    back = states.index(NEUTRAL)
    assert states[:back] == [BEARISH] * back and all(t.since == detected for t in seen[:back])
    assert states[back:] == [NEUTRAL] * (30 - back)
    assert trend.since == flat_start + 60 * back


def test_a_small_gap_inside_the_band_stays_neutral():
    trend, _ = feed(TrendState(), ramp(0.1, 0.05, 40))  # the EMAs never part by 0.5%
    assert trend.state == NEUTRAL and trend.since == T0


def test_the_trend_round_trips_through_a_dict():
    trend, _ = feed(TrendState(), ramp(0.1, 1.0, 10))
    assert trend_from_dict(trend_to_dict(trend)) == trend
    assert trend_from_dict({"state": "sideways"}) == TrendState()


# Kelly ------------------------------------------------------------------------------


def test_kelly_is_none_below_the_minimum_samples():
    edge = RegimeEdge(wins=6, losses=2, win_sum=0.06, loss_sum=0.04)
    assert kelly(None, 1) is None
    assert kelly(edge, 9) is None
    assert kelly(edge, 8) is not None


def test_kelly_is_p_minus_q_over_b():
    # p = 6/8 = 0.75; average win 1%, average loss 2%: b = 0.5; 0.75 - 0.25 / 0.5 = 0.25
    edge = RegimeEdge(wins=6, losses=2, win_sum=0.06, loss_sum=0.04)
    assert kelly(edge, 8) == {
        "samples": 8, "win_rate": 0.75, "avg_win_pct": 1.0, "avg_loss_pct": 2.0, "kelly_fraction": 0.25
    }  # fmt: skip


def test_kelly_with_a_better_payoff_than_loss():
    # p = 0.4, average win 3%, loss 1%: b = 3; 0.4 - 0.6 / 3 = 0.2
    edge = RegimeEdge(wins=4, losses=6, win_sum=0.12, loss_sum=0.06)
    assert kelly(edge, 5)["kelly_fraction"] == pytest.approx(0.2)


def test_kelly_of_all_wins_is_one_and_of_all_losses_minus_one():
    assert kelly(RegimeEdge(wins=5, win_sum=0.05), 5)["kelly_fraction"] == 1.0
    assert kelly(RegimeEdge(losses=5, loss_sum=0.05), 5)["kelly_fraction"] == -1.0


def test_kelly_is_clamped_to_minus_one():
    # p = 0.2, b = 0.1: 0.2 - 0.8 / 0.1 = -7.8
    edge = RegimeEdge(wins=2, losses=8, win_sum=0.002, loss_sum=0.08)
    assert kelly(edge, 10)["kelly_fraction"] == -1.0


def test_kelly_with_losses_of_zero_size():
    # a cycle that netted exactly 0 counts as a loss of 0: the payoff ratio is unbounded, the fraction is p
    edge = RegimeEdge(wins=3, losses=1, win_sum=0.03, loss_sum=0.0)
    assert kelly(edge, 4)["kelly_fraction"] == 0.75


def test_stranded_recovery_orders_under_water_count_as_losses():
    edges = {"BULLISH": RegimeEdge(wins=3, win_sum=0.03)}
    orders = {
        "long": exit_order("long", SELL, 0.1, recovery=True, regime="BULLISH"),  # long from 0.1, market 0.099: -1%
        "short": exit_order("short", BUY, 0.0975, recovery=True, regime="BEARISH"),  # short from 0.0975
        "young": exit_order("young", SELL, 0.1, recovery=False, regime="BULLISH"),  # not stranded yet
        "above": exit_order("above", SELL, 0.098, recovery=True, regime="RANGING"),  # in profit
    }
    state = GridState(orders=orders, edges=edges)
    out = with_stranded_losses(state, 0.099)
    assert out["BULLISH"] == RegimeEdge(wins=3, losses=1, win_sum=0.03, loss_sum=pytest.approx(0.01))
    assert out["BEARISH"] == RegimeEdge(losses=1, loss_sum=pytest.approx(0.0015 / 0.0975))
    assert "RANGING" not in out
    assert state.edges == edges  # the state's own record is untouched
    assert with_stranded_losses(state, None) == edges
    # p = 0.75, average win 1%, average loss 1%: 0.75 - 0.25 / 1 = 0.5
    assert kelly(out["BULLISH"], 4)["kelly_fraction"] == pytest.approx(0.5)


# the operational block ----------------------------------------------------------------


def test_operational_signals_report_fills_recovery_capacity_and_kelly():
    config = GridConfig(max_open_orders=4, caution_share=0.7, stop_share=0.9)
    now = T0 + 7200
    state = GridState(
        price=0.09,
        balances=Balances(100.0, 1000.0),
        orders={
            "r": exit_order("r", SELL, 0.1, recovery=True, regime="BULLISH"),
            "x": exit_order("x", SELL, 0.1, recovery=False),
            "e": entry_order("e"),
        },
        fill_times=(now - 3601, now - 3600, now - 3599, now - 10),
        edges={"RANGING": RegimeEdge(wins=2, win_sum=0.02), "CHOPPY": RegimeEdge(wins=1, win_sum=0.01)},
    )
    trend = TrendState(BULLISH, T0 + 100, 0.0905, 0.09, 70)
    signals = operational_signals(state, config, trend, now, kelly_min_samples=2)

    assert signals["available"] is True
    assert signals["trend"] == {"state": BULLISH, "since": T0 + 100, "ema_fast": 0.0905, "ema_slow": 0.09}
    assert signals["fills_last_hour"] == 2  # the window is the last hour, its start excluded
    assert signals["recovery_orders"] == 1
    assert (signals["capacity_headroom"], signals["capacity_band"]) == (1, "caution")  # 3 of 4
    assert signals["kelly_min_samples"] == 2
    kelly_by_regime = signals["kelly"]
    assert set(kelly_by_regime) == {"RANGING", "BULLISH", "BEARISH", "CHOPPY"}
    assert kelly_by_regime["RANGING"]["kelly_fraction"] == 1.0
    assert kelly_by_regime["BEARISH"] is None and kelly_by_regime["CHOPPY"] is None  # 0 and 1 samples
    assert kelly_by_regime["BULLISH"] is None  # one stranded loss: 1 sample
    one_sample = operational_signals(state, config, trend, now, kelly_min_samples=1)["kelly"]
    assert one_sample["BULLISH"]["kelly_fraction"] == -1.0  # the stranded order is its only sample


@pytest.mark.parametrize("orders, band, headroom", [(0, "normal", 10), (7, "caution", 3), (9, "stop", 1)])
def test_operational_capacity_band_follows_the_open_orders(orders, band, headroom):
    config = GridConfig(max_open_orders=10)
    state = GridState(orders={f"e{i}": entry_order(f"e{i}") for i in range(orders)})
    signals = operational_signals(state, config, TrendState(), T0, kelly_min_samples=20)
    assert (signals["capacity_band"], signals["capacity_headroom"]) == (band, headroom)
    assert signals["trend"] == {"state": NEUTRAL, "since": None, "ema_fast": None, "ema_slow": None}
    assert signals["fills_last_hour"] == 0 and signals["recovery_orders"] == 0


# volatility -------------------------------------------------------------------------------


def test_hourly_volatility_of_a_steady_walk():
    # Every minute moves 0.1 % up or down: the mean absolute return is 0.001 (in log terms, nearly),
    # so an hour's volatility reads 0.1 % x sqrt(pi/2) x sqrt(60) = 0.971 %.
    vol, price = VolState(), 1.0
    for i in range(600):
        price *= 1.001 if i % 2 else 1 / 1.001
        vol = update_vol(vol, price, halflife_min=60)
    assert hourly_vol_pct(vol, min_samples=60) == pytest.approx(0.1 * math.sqrt(math.pi / 2 * 60), rel=1e-3)


def test_volatility_needs_its_samples_and_survives_a_snapshot():
    vol = VolState()
    for i in range(30):
        vol = update_vol(vol, 1.0 + 0.01 * (i % 3), halflife_min=60)
    assert vol.samples == 29 and hourly_vol_pct(vol, min_samples=60) is None
    assert vol_from_dict(vol_to_dict(vol)) == vol
    assert vol_from_dict({}) == VolState()


def test_one_wild_minute_moves_the_estimate_by_its_weight_only():
    vol = VolState()
    for _ in range(200):
        vol = update_vol(vol, 1.0, halflife_min=60)
    calm = hourly_vol_pct(vol, min_samples=60)
    vol = update_vol(vol, 1.2, halflife_min=60)  # a 20 % minute, once
    a = 1 - 0.5 ** (1 / 60)
    assert calm == 0.0
    assert vol.mean_abs == pytest.approx(a * math.log(1.2))
