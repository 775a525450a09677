"""Replay of historical 1-minute candles (``--replay FILE.csv``).

:class:`ReplayMarket` serves a candle file as Kraken would serve it at the
simulated clock's current time: closed candles only (at most 720), and a
forming candle that reveals nothing beyond its open, so the bot never sees
the future. :func:`replay_report` turns a finished run into the JSON report.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from candles import Candle, OhlcPage, aggregate
from clock import Clock
from errors import BadData
from vocabulary import TIERS

KRAKEN_WINDOW = 720


class ReplayMarket:
    def __init__(self, clock: Clock, candles: Sequence[Candle], *, secondary_interval_min: int = 15) -> None:
        if not candles:
            raise BadData("replay needs at least one candle")
        for prev, cur in pairwise(candles):
            if cur.time <= prev.time or (cur.time - prev.time) % 60:
                raise BadData(
                    f"replay candles must be 1-minute candles in ascending order: {prev.time} is followed by {cur.time}"
                )
        if candles[0].time % 60:
            raise BadData(f"replay candle time {candles[0].time} is not on a minute boundary")
        self._clock = clock
        self._series = {
            1: list(candles),
            secondary_interval_min: aggregate(candles, secondary_interval_min, closed_before=math.inf),
        }
        self._times = {k: [c.time for c in v] for k, v in self._series.items()}

    @property
    def start_time(self) -> int:
        """When the first candle has closed: where the replay clock starts."""
        return self._series[1][0].time + 60

    @property
    def end_time(self) -> int:
        return self._series[1][-1].time + 60

    @property
    def candle_count(self) -> int:
        return len(self._series[1])

    @property
    def finished(self) -> bool:
        return self._clock.now() >= self.end_time

    def fetch_ohlc(self, interval_min: int, since: int | None = None) -> OhlcPage:
        if interval_min not in self._series:
            raise ValueError(f"replay serves {sorted(self._series)} minute candles, not {interval_min}")
        now = self._clock.now()
        series, times, width = self._series[interval_min], self._times[interval_min], interval_min * 60
        hi = bisect.bisect_right(times, now - width)  # candles whose interval has ended
        lo = max(0, hi - KRAKEN_WINDOW)
        if since is not None:
            lo = max(lo, bisect.bisect_right(times, since))
        forming = None
        if hi < len(series) and series[hi].time <= now:
            o = series[hi].open
            forming = Candle(series[hi].time, o, o, o, o, 0.0, 0)
        last = series[hi - 1].time if hi else since  # Kraken's `last`: the newest committed candle
        return OhlcPage(series[lo:hi], forming, last)


def buy_and_hold(series: dict[str, list[float]], *, start_equity: float, fee_pct: float) -> dict[str, Any]:
    """Everything in the base asset at the first price (one maker fee), held to the end."""
    prices = series["price"]
    units = start_equity * (1 - fee_pct / 100.0) / prices[0]
    peak, max_dd = 0.0, 0.0
    equity = []
    for p in prices:
        e = units * p
        equity.append(e)
        peak = max(peak, e)
        max_dd = max(max_dd, (peak - e) / peak * 100.0)
    return {
        "net_pnl_usd": round(equity[-1] - start_equity, 6),
        "max_drawdown_pct": round(max_dd, 4),
        "cycles": 0,
        "fees_usd": round(start_equity * fee_pct / 100.0, 6),
        "realized_pnl_usd": 0.0,
        # It has no grid: no capacity band, and nothing beyond its holding to draw down.
        "grid_max_drawdown_usd": None,
        "capacity_stop_share": None,
        "inventory_peak_usd": round(peak, 6),  # its whole holding is its position
        "start_equity_usd": round(start_equity, 6),
        "end_equity_usd": round(equity[-1], 6),
        "end_inventory": {"quote": 0.0, "base": round(units, 8)},
        "equity": equity,
    }


def tier_figures(tiers: Sequence[float], span_sec: float) -> dict[str, Any]:
    """Share of cycles in each effective tier and the tier changes per day (one cycle per candle)."""
    n = len(tiers) or 1
    changes = sum(1 for a, b in pairwise(tiers) if a != b)
    days = span_sec / 86400 if span_sec > 0 else 0.0
    return {
        "tier_share": {str(t): round(sum(1 for x in tiers if x == t) / n, 4) for t in TIERS},
        "tier_changes": changes,
        "tier_changes_per_day": round(changes / days, 2) if days else None,
    }


def share(flags: Sequence[float]) -> float | None:
    """Share of cycles at which a 0/1 flag was set; ``None`` without cycles."""
    return round(sum(flags) / len(flags), 4) if flags else None


def shallow_figures(shallow: Sequence[float], mechanical_tier: Sequence[float]) -> dict[str, Any]:
    """Mechanical tier 2 while the primary model is trained but only ``shallow``.

    A shallow model is the least trustworthy, so the training-depth modifier should
    rarely let it reach tier 2; ``tier2_share_while_shallow`` is ``None`` when the run
    had no shallow cycles.
    """
    cycles = sum(1 for f in shallow if f)
    tier2 = sum(1 for f, t in zip(shallow, mechanical_tier, strict=True) if f and t == 2)
    return {
        "tier2_share_while_shallow": round(tier2 / cycles, 4) if cycles else None,
        "shallow_cycles": cycles,
        "tier2_cycles_while_shallow": tier2,
    }


HIT_HORIZON_SEC = 3600


def direction_hit_rates(
    t: Sequence[float],
    price: Sequence[float],
    tier: Sequence[float],
    direction: Sequence[float],
    *,
    horizon_sec: float = HIT_HORIZON_SEC,
) -> dict[str, dict[str, Any]]:
    """How often each directional tier called the sign of the next ``horizon_sec`` return.

    A cycle at effective tier 1 or 2 with a direction (+1 long, -1 short) is a hit when
    the price ``horizon_sec`` later (the cycle at exactly that time) moved that way. A
    cycle without a price that much later, or whose return is exactly zero, is not
    scorable. Per tier ``"1"``, ``"2"`` and pooled ``"directional"``: ``hits``,
    ``scored``, ``hit_rate`` (``None`` when nothing was scored), ``scorable`` (every
    scorable cycle of the run, whatever its tier) and ``coverage`` = scored / scorable.

    Parameters
    ----------
    t : (n,) cycle times, unix seconds, increasing
    price, tier, direction : (n,) one value per cycle
    """
    times = np.asarray(t, dtype=np.float64)
    prices = np.asarray(price, dtype=np.float64)
    tiers = np.asarray(tier)
    signs = np.asarray(direction)
    target = times + horizon_sec
    later = np.minimum(np.searchsorted(times, target), len(times) - 1)  # empty runs: nothing indexes
    has_later = times[later] == target if len(times) else np.zeros(0, dtype=bool)
    move = np.sign(prices[later] - prices) if len(times) else prices
    scorable = has_later & (move != 0)
    n_scorable = int(scorable.sum())
    out = {}
    for key, in_tier in (("1", tiers == 1), ("2", tiers == 2), ("directional", (tiers == 1) | (tiers == 2))):
        called = scorable & in_tier & (signs != 0)
        scored = int(called.sum())
        out[key] = hit_rate_block(int((called & (move == signs)).sum()), scored, n_scorable)
    return out


def hit_rate_block(hits: int, scored: int, scorable: int) -> dict[str, Any]:
    """One tier's direction record: its hit rate over the scored cycles, and their share of the scorable ones."""
    return {
        "hit_rate": round(hits / scored, 4) if scored else None,
        "hits": hits,
        "scored": scored,
        "scorable": scorable,
        "coverage": round(scored / scorable, 4) if scorable else None,
    }


def strategies_report(
    series: dict[str, list[float]],
    *,
    regime_aware: dict[str, Any],
    symmetric: dict[str, Any],
    fee_pct: float,
    span_sec: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report's ``strategies`` block, and the plot's series (equity curves, tiers)."""
    hold = buy_and_hold(series, start_equity=regime_aware["start_equity_usd"], fee_pct=fee_pct)
    hold_equity = hold.pop("equity")
    strategies = {
        "regime_aware": {
            **regime_aware,
            **tier_figures(series["tier"], span_sec),
            # Capacity "stop" blocks tier upgrades: how much of the run the grid's own book did that.
            "capacity_stop_share": share(series["capacity_stop"]),
            **shallow_figures(series["shallow"], series["mechanical_tier"]),
            "direction_hit_rate": direction_hit_rates(
                series["t"], series["price"], series["tier"], series["direction"]
            ),
        },
        "symmetric": {**symmetric, "capacity_stop_share": share(series["symmetric_capacity_stop"])},
        "buy_and_hold": hold,
    }
    plot = {
        "t": series["t"],
        "price": series["price"],
        "tier": [int(t) for t in series["tier"]],
        "equity": {
            "regime_aware": series["regime_aware"],
            "symmetric": series["symmetric"],
            "buy_and_hold": hold_equity,
        },
        "summary": {
            name: {k: s[k] for k in ("net_pnl_usd", "max_drawdown_pct", "cycles", "fees_usd")}
            for name, s in strategies.items()
        },
    }
    return strategies, plot


def replay_report(
    *,
    source: str,
    market: ReplayMarket,
    stats: dict[str, Any],
    final_status: dict[str, Any],
    wall_sec: float,
    strategies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The replay report (SPEC section 1) from the bot's run statistics."""
    span = market.end_time - market.start_time
    tier_seconds = stats["tier_seconds"]
    total = sum(tier_seconds.values()) or 1.0
    days = span / 86400 if span > 0 else 0.0
    return {
        "source": source,
        "pair": final_status.get("pair"),  # the pair whose rules the grids traded under
        "candles": stats["candles_processed"],
        "first_candle_time": market.start_time - 60,
        "last_candle_time": market.end_time - 60,
        "simulated_span_sec": span,
        "wall_sec": round(wall_sec, 3),
        "candles_per_wall_sec": round(stats["candles_processed"] / wall_sec, 1) if wall_sec > 0 else None,
        "retrains": stats["retrains"],
        "tier_share": {str(t): round(s / total, 4) for t, s in sorted(tier_seconds.items())},
        "tier_changes": stats["tier_changes"],
        "tier_changes_per_day": round(stats["tier_changes"] / days, 2) if days else None,
        "strategies": strategies,
        "final": {
            "regime_tier": final_status["regime_tier"],
            "training_depth": {
                name: (final_status["hmm"][name] or {}).get("training_depth") for name in ("primary", "secondary")
            },
        },
    }
