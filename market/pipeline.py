"""Candle pipeline: sync from the market into the store, retention, the
store-first training loader, and pipeline health (SPEC section 2).

The store is the source of truth. The pipeline also keeps, per interval, the
newest candles in memory (the inference window) and the row count, so a
cycle with nothing new costs no store reads.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

from candles import Candle, MarketData, candle_problem, merge_candles
from errors import BadData, RetryLater
from store.interface import Store

log = logging.getLogger(__name__)

PRUNE_EVERY_SEC = 3600.0
MIN_FRESHNESS_LIMIT_SEC = 180.0


@dataclass(frozen=True)
class FeedSpec:
    interval_min: int
    sync_every_sec: float
    target: int  # training depth target: coverage, and never pruned below it
    window: int  # candles kept in memory for inference

    @property
    def label(self) -> str:
        return f"{self.interval_min}m"

    @property
    def width_sec(self) -> int:
        return self.interval_min * 60

    @property
    def freshness_limit_sec(self) -> float:
        """How old the newest closed candle may be (SPEC section 2)."""
        return max(MIN_FRESHNESS_LIMIT_SEC, 3.0 * self.width_sec)


@dataclass
class FeedState:
    recent: deque[Candle]
    available: int = 0
    newest_time: int | None = None
    last_sync_at: float | None = None
    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    rejected_rows: int = 0
    new_since_check: int = 0  # candles added since the owner last looked
    forming: Candle | None = field(default=None)


class CandlePipeline:
    def __init__(
        self,
        store: Store,
        market: MarketData,
        pair: str,
        feeds: Sequence[FeedSpec],
        *,
        retention_days: int,
    ) -> None:
        self.store = store
        self.market = market
        self.pair = pair
        self.specs = {f.interval_min: f for f in feeds}
        self.retention_sec = retention_days * 86400
        self.state = {f.interval_min: FeedState(recent=deque(maxlen=f.window)) for f in feeds}
        self._last_prune_at: float | None = None

    # startup ------------------------------------------------------------------

    def prime(self) -> None:
        """Read row counts and inference windows from the store."""
        for interval, spec in self.specs.items():
            st = self.state[interval]
            st.available = self.store.count_candles(self.pair, interval)
            st.recent.clear()
            st.recent.extend(self.store.load_candles(self.pair, interval, spec.window))
            st.newest_time = st.recent[-1].time if st.recent else None
            st.new_since_check = len(st.recent)

    # sync ---------------------------------------------------------------------

    def sync_due(self, interval: int, now: float) -> bool:
        st = self.state[interval]
        return st.last_sync_at is None or now - st.last_sync_at >= self.specs[interval].sync_every_sec

    def sync_due_feeds(self, now: float) -> int:
        """Sync every feed whose cadence has come; returns how many new candles were stored."""
        return sum(self.sync(interval, now) for interval in self.specs if self.sync_due(interval, now))

    def sync(self, interval: int, now: float) -> int:
        """Fetch closed candles newer than the newest stored one and upsert them.

        A market or store failure is recorded in the feed's health and
        changes nothing; the next cadence tries again.
        """
        st = self.state[interval]
        st.last_sync_at = now
        try:
            page = self.market.fetch_ohlc(interval, since=st.newest_time)
            good = []
            for c in page.closed:
                problem = candle_problem(c)
                if problem:
                    st.rejected_rows += 1
                    log.warning("%s candle %s rejected: %s", self.specs[interval].label, c.time, problem)
                elif st.newest_time is None or c.time > st.newest_time:
                    good.append(c)
            self.store.upsert_candles(self.pair, interval, good)
        except (RetryLater, BadData) as exc:
            st.last_error, st.last_error_at = str(exc), now  # our own errors already say what failed
            log.warning("sync %s failed: %s", self.specs[interval].label, exc)
            return 0
        st.forming = page.forming
        st.last_success_at = now
        st.recent.extend(good)
        if good:
            st.newest_time = good[-1].time
            st.available += len(good)
            st.new_since_check += len(good)
        return len(good)

    def take_new(self, interval: int) -> int:
        """Candles added to ``interval`` since the last call (for evaluation triggers)."""
        st = self.state[interval]
        n, st.new_since_check = st.new_since_check, 0
        return n

    def recount(self, interval: int) -> int:
        """Re-read ``interval``'s row count from the store and return it.

        For rows written behind the pipeline's back (the trades backfill adds
        older candles); the window, newest time and health are left as they are.
        Raises :class:`RetryLater` when the store fails (the count is unchanged).
        """
        st = self.state[interval]
        st.available = self.store.count_candles(self.pair, interval)
        return st.available

    def prune_if_due(self, now: float) -> int:
        """Drop candles older than the retention, never below each feed's training target."""
        if self._last_prune_at is not None and now - self._last_prune_at < PRUNE_EVERY_SEC:
            return 0
        self._last_prune_at = now
        removed = 0
        for interval, spec in self.specs.items():
            try:
                removed += self.store.prune_candles(
                    self.pair, interval, older_than=int(now - self.retention_sec), keep_newest=spec.target
                )
                self.state[interval].available = self.store.count_candles(self.pair, interval)
            except RetryLater as exc:
                log.warning("pruning %s failed: %s", spec.label, exc)
        return removed

    # reads --------------------------------------------------------------------

    def load_recent_ohlcv_rows(self, interval: int, count: int) -> list[Candle]:
        """Training rows: the store first; when it holds fewer than ``count``,
        merge in the market's window. De-duplicated by time, newest ``count``, oldest first."""
        label = self.specs[interval].label
        rows: list[Candle] = []
        try:
            rows = self.store.load_candles(self.pair, interval, count)
        except RetryLater as exc:
            log.warning("loading %s candles from the store failed: %s", label, exc)
        if len(rows) >= count:
            return rows
        try:
            page = self.market.fetch_ohlc(interval)
        except (RetryLater, BadData) as exc:
            log.warning("market fallback for %s failed: %s", label, exc)
            return rows
        return merge_candles(rows, [c for c in page.closed if candle_problem(c) is None], count)

    def window(self, interval: int) -> list[Candle]:
        """The in-memory inference window, oldest first."""
        return list(self.state[interval].recent)

    def newest(self, interval: int, n: int) -> list[Candle]:
        """The newest ``n`` candles of the window (fewer if it holds fewer), oldest first."""
        recent = self.state[interval].recent
        return list(islice(recent, max(0, len(recent) - n), None))

    def available(self, interval: int) -> int:
        return self.state[interval].available

    def price(self) -> float | None:
        """Latest traded price: the forming 1m candle's close, else the newest close."""
        primary = self.state[min(self.specs)]
        if primary.forming is not None:
            return primary.forming.close
        return primary.recent[-1].close if primary.recent else None

    def health(self, now: float) -> dict[str, dict]:
        """``hmm_data_pipeline``: per interval, rows, coverage, freshness, last sync and error."""
        out = {}
        for interval, spec in self.specs.items():
            st = self.state[interval]
            limit = spec.freshness_limit_sec
            freshness = None if st.newest_time is None else max(0.0, now - (st.newest_time + spec.width_sec))
            if freshness is None:
                status = "empty"
            elif freshness > limit:
                status = "stale"
            else:
                status = "ok"
            out[spec.label] = {
                "interval_min": interval,
                "rows_available": st.available,
                "target_rows": spec.target,
                "coverage_pct": round(min(100.0, 100.0 * st.available / max(spec.target, 1)), 1),
                "newest_candle_time": st.newest_time,
                "freshness_sec": None if freshness is None else round(freshness, 1),
                "freshness_limit_sec": limit,
                "status": status,
                "last_sync_at": st.last_sync_at,
                "last_success_at": st.last_success_at,
                "last_error": st.last_error,
                "last_error_at": st.last_error_at,
                "rejected_rows": st.rejected_rows,
            }
        return out
