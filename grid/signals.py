"""Operational signals of the grid (SPEC section 8), pure.

The EMA trend detector compares a fast and a slow exponential moving average
of 1-minute closes: ``bullish`` when the fast one is more than ``band_pct``
above the slow one, ``bearish`` when it is that far below, else ``neutral``.
``since`` is when the current state was first seen. The operational block
gathers what the advisor and the tier gating read from the engine.

Kelly edge: completed cycles always book a profit (an exit is priced past
both fees), so they alone would always say "bet everything". The grid's real
losses are positions stranded behind their exits, so every recovery order
under water counts as a loss of its mark-to-market return, in the regime its
entry was placed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from grid.engine import GridConfig, GridState, RegimeEdge, capacity, kelly
from vocabulary import BEARISH as BEARISH_REGIME
from vocabulary import BULLISH as BULLISH_REGIME
from vocabulary import RANGING, SELL

BULLISH, BEARISH, NEUTRAL = "bullish", "bearish", "neutral"
REGIME_LABELS = (RANGING, BULLISH_REGIME, BEARISH_REGIME)


@dataclass(frozen=True)
class TrendState:
    state: str = NEUTRAL
    since: float | None = None
    ema_fast: float | None = None
    ema_slow: float | None = None
    samples: int = 0


def update_trend(trend: TrendState, ts: float, close: float, *, fast: int, slow: int, band_pct: float) -> TrendState:
    """``trend`` after one more close; neutral until ``slow`` closes were seen."""
    if trend.ema_fast is None or trend.ema_slow is None:
        ema_fast = ema_slow = close
    else:
        ema_fast = trend.ema_fast + (close - trend.ema_fast) * 2.0 / (fast + 1)
        ema_slow = trend.ema_slow + (close - trend.ema_slow) * 2.0 / (slow + 1)
    samples = trend.samples + 1
    state = NEUTRAL
    if samples >= slow:
        gap_pct = (ema_fast / ema_slow - 1.0) * 100.0
        state = BULLISH if gap_pct > band_pct else BEARISH if gap_pct < -band_pct else NEUTRAL
    since = trend.since if state == trend.state and trend.since is not None else ts
    return TrendState(state, since, ema_fast, ema_slow, samples)


@dataclass(frozen=True)
class VolState:
    """Recent volatility of 1-minute closes: an exponential average of absolute log returns."""

    mean_abs: float | None = None  # EWMA of |log return| per minute
    last_close: float | None = None
    samples: int = 0


def update_vol(vol: VolState, close: float, *, halflife_min: float) -> VolState:
    """``vol`` after one more 1-minute close (a gap counts as one return)."""
    if vol.last_close is None or close <= 0 or vol.last_close <= 0:
        return VolState(vol.mean_abs, close if close > 0 else vol.last_close, vol.samples)
    r = abs(math.log(close / vol.last_close))
    a = 1.0 - 0.5 ** (1.0 / halflife_min)
    mean = r if vol.mean_abs is None else vol.mean_abs + a * (r - vol.mean_abs)
    return VolState(mean, close, vol.samples + 1)


def hourly_vol_pct(vol: VolState, *, min_samples: int) -> float | None:
    """The volatility of one hour, percent of price (``None`` before ``min_samples`` returns).

    The mean absolute return of a normal distribution is ``sigma * sqrt(2/pi)``, and a random
    walk's hour is ``sqrt(60)`` minutes: a robust estimate that one wild minute cannot blow up.
    """
    if vol.mean_abs is None or vol.samples < min_samples:
        return None
    return vol.mean_abs * math.sqrt(math.pi / 2.0) * math.sqrt(60.0) * 100.0


def vol_to_dict(v: VolState) -> dict[str, Any]:
    return {"mean_abs": v.mean_abs, "last_close": v.last_close, "samples": v.samples}


def vol_from_dict(d: dict[str, Any]) -> VolState:
    mean, last = d.get("mean_abs"), d.get("last_close")
    return VolState(
        float(mean) if mean is not None else None,
        float(last) if last is not None else None,
        int(d.get("samples", 0)),
    )


def trend_to_dict(t: TrendState) -> dict[str, Any]:
    return {"state": t.state, "since": t.since, "ema_fast": t.ema_fast, "ema_slow": t.ema_slow, "samples": t.samples}


def trend_from_dict(d: dict[str, Any]) -> TrendState:
    return TrendState(
        state=str(d["state"]) if d.get("state") in (BULLISH, BEARISH, NEUTRAL) else NEUTRAL,
        since=float(d["since"]) if d.get("since") is not None else None,
        ema_fast=float(d["ema_fast"]) if d.get("ema_fast") is not None else None,
        ema_slow=float(d["ema_slow"]) if d.get("ema_slow") is not None else None,
        samples=int(d.get("samples", 0)),
    )


def operational_signals(
    state: GridState, config: GridConfig, trend: TrendState, now: float, *, kelly_min_samples: int
) -> dict[str, Any]:
    """What the advisor context's ``operational`` holds (and the grid status shows under ``signals``)."""
    cap = capacity(config, state.orders)
    hour_ago = now - 3600.0
    edges = with_stranded_losses(state, state.price)
    regimes = sorted(set(REGIME_LABELS) | set(edges))
    return {
        "available": True,
        "trend": {"state": trend.state, "since": trend.since, "ema_fast": trend.ema_fast, "ema_slow": trend.ema_slow},
        "fills_last_hour": sum(1 for t in state.fill_times if t > hour_ago),
        "recovery_orders": sum(1 for o in state.orders.values() if o.recovery),
        "capacity_headroom": cap["headroom"],
        "capacity_band": cap["band"],
        "kelly": {r: kelly(edges.get(r), kelly_min_samples) for r in regimes},
        "kelly_min_samples": kelly_min_samples,
    }


def with_stranded_losses(state: GridState, price: float | None) -> dict[str, RegimeEdge]:
    """Completed cycles per regime, plus each recovery order under water at ``price`` as a loss."""
    edges = dict(state.edges)
    if price is None:
        return edges
    for o in state.orders.values():
        if not o.recovery or o.entry_price is None:
            continue
        held = o.volume if o.side == SELL else -o.volume  # a sell exit holds a long position
        ret = held * (price - o.entry_price) / (o.entry_price * o.volume)
        if ret < 0:
            e = edges.get(o.regime_at_entry, RegimeEdge())
            edges[o.regime_at_entry] = replace(e, losses=e.losses + 1, loss_sum=e.loss_sum - ret)
    return edges
