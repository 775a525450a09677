"""Candle values and the pure operations on sequences of them.

A candle's ``time`` is the unix second at which its interval opens. Sequences
are always ordered oldest first and unique by ``time``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from errors import BadData


class Candle(NamedTuple):
    time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: int = 0


def candle_problem(c: Candle) -> str | None:
    """Why ``c`` cannot be used as a closed candle, or ``None`` when it can."""
    prices = (c.open, c.high, c.low, c.close)
    if not all(math.isfinite(p) and p > 0 for p in prices):
        return "prices must be finite and positive"
    if not (math.isfinite(c.volume) and c.volume >= 0):
        return "volume must be finite and non-negative"
    if c.low > min(c.open, c.close) or c.high < max(c.open, c.close):
        return "high/low do not bracket open/close"
    if c.time <= 0:
        return "time must be a positive unix timestamp"
    return None


def merge_candles(older: Iterable[Candle], newer: Iterable[Candle], count: int) -> list[Candle]:
    """Union of two candle sources, de-duplicated by ``time``.

    Where both hold a candle for the same time, the one from ``newer`` wins
    (it is the fresher read). Returns the newest ``count`` candles, oldest first.
    """
    by_time = {c.time: c for c in older}
    by_time.update((c.time, c) for c in newer)
    ordered = [by_time[t] for t in sorted(by_time)]
    return ordered[-count:] if count > 0 else []


def aggregate(candles: Sequence[Candle], interval_min: int, *, closed_before: float) -> list[Candle]:
    """Aggregate finer candles into ``interval_min`` buckets aligned to the epoch.

    Only buckets that end at or before ``closed_before`` are returned: a bucket
    still forming is never reported as closed.
    """
    width = interval_min * 60
    out: list[Candle] = []
    bucket: list[Candle] = []
    for c in candles:
        start = c.time - c.time % width
        if bucket and start != bucket[0].time - bucket[0].time % width:
            out.append(_bucket_candle(bucket, width))
            bucket = []
        bucket.append(c)
    if bucket:
        out.append(_bucket_candle(bucket, width))
    return [c for c in out if c.time + width <= closed_before]


def _bucket_candle(rows: Sequence[Candle], width: int) -> Candle:
    return Candle(
        time=rows[0].time - rows[0].time % width,
        open=rows[0].open,
        high=max(r.high for r in rows),
        low=min(r.low for r in rows),
        close=rows[-1].close,
        volume=sum(r.volume for r in rows),
        trade_count=sum(r.trade_count for r in rows),
    )


def as_arrays(candles: Sequence[Candle]) -> dict[str, np.ndarray]:
    """Column arrays (float64) of a candle sequence."""
    if not candles:
        empty = np.empty(0)
        return {k: empty for k in ("time", "open", "high", "low", "close", "volume")}
    m = np.asarray([c[:6] for c in candles], dtype=np.float64)
    return {
        "time": m[:, 0],
        "open": m[:, 1],
        "high": m[:, 2],
        "low": m[:, 3],
        "close": m[:, 4],
        "volume": m[:, 5],
    }


CSV_COLUMNS = ("time", "open", "high", "low", "close", "volume")


def read_candles_csv(path: str | Path) -> list[Candle]:
    """Read ``time,open,high,low,close,volume`` rows (unix seconds, ascending).

    Raises :class:`BadData` naming the file and line of the first bad row.
    """
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise BadData(f"cannot read {path}: {exc.strerror or exc}") from exc
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip().lower() for h in header[:6]) != CSV_COLUMNS:
            raise BadData(f"{path}: the header must be {','.join(CSV_COLUMNS)}, got {header!r}")
        out: list[Candle] = []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                candle = Candle(int(float(row[0])), *(float(v) for v in row[1:6]))
            except (ValueError, IndexError, TypeError):
                raise BadData(f"{path}:{line_no}: not a candle row: {row!r}") from None
            problem = candle_problem(candle)
            if problem:
                raise BadData(f"{path}:{line_no}: {problem}")
            if candle.time > 100_000_000_000:
                raise BadData(f"{path}:{line_no}: time {candle.time} looks like milliseconds; unix seconds are needed")
            if out and candle.time <= out[-1].time:
                raise BadData(f"{path}:{line_no}: times must be strictly ascending")
            out.append(candle)
    if not out:
        raise BadData(f"{path}: no candles")
    return out


class OhlcPage(NamedTuple):
    """One answer of a market-data source for one interval.

    ``closed`` are final candles (oldest first), ``forming`` the candle still
    open (never stored as final), ``last`` the source's cursor for the next call.
    """

    closed: list[Candle]
    forming: Candle | None
    last: int | None


class MarketData(Protocol):
    """Where candles come from: Kraken, the simulator, or a replay file."""

    def fetch_ohlc(self, interval_min: int, since: int | None = None) -> OhlcPage:
        """Closed candles newer than ``since`` (at most the source's window) and the forming one."""
