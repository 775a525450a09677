"""Seeded regime-switching market simulator with ground truth (``--market sim``).

A hidden Markov chain moves between BEARISH, RANGING and BULLISH; each regime
has its own drift, volatility and volume. Ranging markets revert to the price
at which the range began. Every 1-minute candle carries its true regime, so
tests and benchmarks can score the detector.

:class:`SimulatedMarket` serves candles like Kraken's OHLC endpoint (at most
720 closed candles plus the forming one) as the injected clock advances.
Candles are generated in fixed-size chunks from one seeded stream, so the
candle at a given time depends only on the seed and the start time, never on
how fast the clock runs. Memory stays bounded however long the run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from candles import Candle, OhlcPage, aggregate
from clock import Clock
from vocabulary import BEARISH, BULLISH, RANGING, REGIMES

KRAKEN_WINDOW = 720
CHUNK_MINUTES = 1440


@dataclass(frozen=True)
class SimParams:
    start_price: float = 0.08
    # Expected regime length in minutes (geometric durations).
    mean_duration_min: dict[str, float] = field(
        default_factory=lambda: {BEARISH: 240.0, RANGING: 360.0, BULLISH: 240.0}
    )
    # Where a trend goes when it ends: back to ranging, or straight to the opposite trend.
    trend_to_range: float = 0.7
    drift_per_min: dict[str, float] = field(default_factory=lambda: {BEARISH: -0.0003, RANGING: 0.0, BULLISH: 0.0003})
    vol_per_min: dict[str, float] = field(default_factory=lambda: {BEARISH: 0.0016, RANGING: 0.0011, BULLISH: 0.0015})
    range_reversion: float = 0.02  # pull per minute back to the range anchor (log space)
    volume_mean: dict[str, float] = field(default_factory=lambda: {BEARISH: 1.5e6, RANGING: 1.0e6, BULLISH: 1.4e6})
    price_decimals: int = 7


class PathGenerator:
    """Sequential generator of 1-minute candles and their true regimes."""

    def __init__(self, seed: int, start: int, params: SimParams | None = None) -> None:
        self.params = params or SimParams()
        self._rng = np.random.default_rng(seed)
        self._next_time = start - start % 60
        self._regime = RANGING
        self._log_price = math.log(self.params.start_price)
        self._anchor = self._log_price

    def _next_regime(self, regime: str, u_stay: float, u_move: float) -> str:
        p = self.params
        if u_stay < 1.0 - 1.0 / p.mean_duration_min[regime]:
            return regime
        if regime == RANGING:
            return BULLISH if u_move < 0.5 else BEARISH
        if u_move < p.trend_to_range:
            return RANGING
        return BEARISH if regime == BULLISH else BULLISH

    def chunk(self, n: int = CHUNK_MINUTES) -> tuple[list[Candle], list[str]]:
        """The next ``n`` candles and their regimes."""
        p = self.params
        u = self._rng.random((n, 2))
        shocks = self._rng.standard_normal(n)
        wicks = np.abs(self._rng.standard_normal((n, 2)))
        vol_noise = self._rng.standard_normal(n)
        scale = 10.0**p.price_decimals
        candles: list[Candle] = []
        labels: list[str] = []
        for i in range(n):
            regime = self._next_regime(self._regime, u[i, 0], u[i, 1])
            if regime == RANGING and self._regime != RANGING:
                self._anchor = self._log_price
            self._regime = regime
            sigma = p.vol_per_min[regime]
            pull = -p.range_reversion * (self._log_price - self._anchor) if regime == RANGING else 0.0
            ret = p.drift_per_min[regime] + pull + sigma * shocks[i]
            o = math.exp(self._log_price)
            self._log_price += ret
            c = math.exp(self._log_price)
            h = max(o, c) * math.exp(0.5 * sigma * wicks[i, 0])
            lo = min(o, c) * math.exp(-0.5 * sigma * wicks[i, 1])
            volume = p.volume_mean[regime] * math.exp(0.5 * vol_noise[i]) * (1.0 + abs(ret) / sigma)
            candles.append(
                Candle(
                    self._next_time,
                    round(o * scale) / scale,
                    math.ceil(h * scale) / scale,
                    math.floor(lo * scale) / scale,
                    round(c * scale) / scale,
                    round(volume, 2),
                    max(1, int(volume / 20_000)),
                )
            )
            labels.append(regime)
            self._next_time += 60
        return candles, labels


def generate(n: int, *, seed: int, start: int = 1_767_225_600, params: SimParams | None = None):
    """``n`` consecutive 1-minute candles and their true regimes (for tests and benchmarks)."""
    gen = PathGenerator(seed, start, params)
    candles: list[Candle] = []
    labels: list[str] = []
    while len(candles) < n:
        c, lab = gen.chunk(min(CHUNK_MINUTES, n - len(candles)))
        candles.extend(c)
        labels.extend(lab)
    return candles, labels


class SimulatedMarket:
    """A Kraken-like OHLC source driven by a :class:`PathGenerator` and a clock.

    At construction the market already has ``history_min`` minutes of past
    candles, so a cold-started bot sees a full 720-candle window for both
    intervals, as it would on Kraken.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        seed: int,
        start: int,
        params: SimParams | None = None,
        secondary_interval_min: int = 15,
        history_min: int = KRAKEN_WINDOW * 15,
    ) -> None:
        self._clock = clock
        self._secondary = secondary_interval_min
        self._gen = PathGenerator(seed, start - history_min * 60, params)
        self._one: deque[tuple[Candle, str]] = deque(maxlen=KRAKEN_WINDOW + CHUNK_MINUTES)
        self._pending: deque[tuple[Candle, str]] = deque()  # generated, not yet in the past
        self._buckets: deque[Candle] = deque(maxlen=KRAKEN_WINDOW)
        self._bucket_rows: list[Candle] = []

    # Candle timeline ------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Move every candle that has closed by ``now`` into the served windows."""
        while not self._pending or self._pending[-1][0].time + 60 <= now:
            candles, labels = self._gen.chunk()
            self._pending.extend(zip(candles, labels, strict=True))
        while self._pending and self._pending[0][0].time + 60 <= now:
            item = self._pending.popleft()
            self._one.append(item)
            self._add_to_bucket(item[0])

    def _add_to_bucket(self, candle: Candle) -> None:
        width = self._secondary * 60
        self._bucket_rows.append(candle)
        if (candle.time + 60) % width == 0:
            self._buckets.extend(aggregate(self._bucket_rows, self._secondary, closed_before=math.inf))
            self._bucket_rows = []

    def _forming(self, interval_min: int, now: float) -> Candle | None:
        """The candle still open at ``now``, built from the part of it already traded."""
        if not self._pending:
            return None
        current, _ = self._pending[0]
        frac = min(1.0, max(0.0, (now - current.time) / 60.0))
        price = current.open + (current.close - current.open) * frac
        minute = current._replace(
            high=max(current.open, price),
            low=min(current.open, price),
            close=price,
            volume=current.volume * frac,
        )
        if interval_min == 1:
            return minute
        rows = [*self._bucket_rows, minute]
        return aggregate(rows, interval_min, closed_before=math.inf)[-1]

    # MarketData ------------------------------------------------------------

    def fetch_ohlc(self, interval_min: int, since: int | None = None) -> OhlcPage:
        now = self._clock.now()
        self._advance(now)
        if interval_min == 1:
            series = (c for c, _ in reversed(self._one))
        elif interval_min == self._secondary:
            series = reversed(self._buckets)
        else:
            raise ValueError(f"the simulator serves 1 and {self._secondary} minute candles")
        closed = []
        for c in series:  # newest first, so a `since` call touches only what is new
            if len(closed) == KRAKEN_WINDOW or (since is not None and c.time <= since):
                break
            closed.append(c)
        closed.reverse()
        forming = self._forming(interval_min, now)
        # Like Kraken's `last`: the newest committed candle, to be polled with as `since`.
        newest = self._one[-1][0].time if interval_min == 1 and self._one else None
        if interval_min != 1 and self._buckets:
            newest = self._buckets[-1].time
        return OhlcPage(closed, forming, newest if newest is not None else since)

    # Ground truth ----------------------------------------------------------

    def truth(self, time: int) -> str | None:
        """The true regime of the 1-minute candle opening at ``time`` (recent candles only)."""
        for candle, regime in reversed(self._one):
            if candle.time == time:
                return regime
            if candle.time < time:
                break
        return None

    def current_truth(self) -> str | None:
        """The true regime of the newest closed 1-minute candle."""
        return self._one[-1][1] if self._one else None


__all__ = ["REGIMES", "PathGenerator", "SimParams", "SimulatedMarket", "generate"]
