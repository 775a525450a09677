"""Deep warm-up: older 1m and 15m candles built from Kraken's public trades.

Kraken's OHLC endpoint serves only the newest 720 candles, so a fresh store
holds 12 hours of 1m and 7.5 days of 15m candles, short of the models'
targets (4000 x 1m, 1440 x 15m). The Trades endpoint pages through the whole
history; this module turns those pages into closed candles below what the
OHLC sync stored.

Pure parts: :func:`aggregate_trades` (trades -> candles, with the open bucket
carried across pages), :func:`newest_run` (how deep the store already is),
:func:`plan_backfill` (which ranges to fetch and which candles to write) and
:func:`apply_page` (one page -> the next job and the candles to write). The
I/O adapter :class:`TradesBackfill` runs them in a daemon thread, paced,
writing to the store and persisting its job after every page.

Minutes without trades: Kraken's OHLC endpoint answers an interval without
trades with a flat candle at the previous close, volume 0 and count 0 (its
downloadable OHLCVT files leave such intervals out instead). The store is fed
by that endpoint, so the backfill does the same: a gap becomes flat candles at
the last traded price, and the two sources join without holes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

from candles import Candle
from clock import Clock
from errors import BadData, RetryLater
from kraken.public_client import Trade, TradesPage
from retry import backoff_delay
from store.interface import Store

log = logging.getLogger(__name__)

PRIMARY, SECONDARY = 1, 15  # the 1m and 15m models' intervals, in minutes
INTERVALS = (PRIMARY, SECONDARY)  # phase order: the primary model reaches full depth first
PHASE_NAMES = {PRIMARY: "1m", SECONDARY: "15m"}
ALIGN_SEC = SECONDARY * 60  # range starts on 15-minute edges, so their first buckets are whole for both intervals
PRICE_LEAD_SEC = 900  # fetched before a range's start only for a price to repeat over an opening quiet spell
OHLC_WINDOW = 720  # candles Kraken's OHLC endpoint serves; an older newest candle does not count as synced
RESUME_WITHIN_SEC = 6 * 3600  # an unfinished job older than this is planned afresh (see TradesBackfill)
STATE_VERSION = 1
NS_PER_SEC = 1_000_000_000
FIRST_BACKOFF_SEC = 5.0
MAX_BACKOFF_SEC = 300.0
SLEEP_SLICE_SEC = 1.0  # longest single clock sleep, so a stop is noticed quickly
DEFAULT_PAGE_SIZE = 1000  # Kraken's maximum ``count``


@runtime_checkable
class TradesSource(Protocol):
    """A market that can page through public trades (Kraken's :class:`kraken_client.KrakenPublicClient`)."""

    def fetch_trades(self, since: int | None = None, count: int | None = None) -> TradesPage:
        """Trades after the nanosecond cursor ``since`` (exclusive), oldest first."""


# Aggregation ------------------------------------------------------------------


class Aggregation(NamedTuple):
    closed: list[Candle]  # complete candles, oldest first
    tail: Candle | None  # the bucket still open: pass it back as ``tail`` with the next page


def aggregate_trades(
    trades: Iterable[Trade],
    interval_min: int,
    *,
    tail: Candle | None = None,
    complete_from: float = 0.0,
    end: float | None = None,
) -> Aggregation:
    """Closed ``interval_min`` candles from trades (oldest first), buckets aligned to the epoch.

    A candle's open/high/low/close are its trades' prices in trade order,
    volume their sum and ``trade_count`` their number. A bucket is closed only
    when a later trade or ``end`` proves it complete: ``end`` says every trade
    before it has been given (trades at or after it are ignored), and closes
    every bucket ending at or before it. The bucket still open comes back as
    ``tail``; pass it with the next page, so a page boundary changes nothing.

    Buckets without trades between two traded ones, and up to ``end``, become
    flat candles at the previous close with volume and count 0 (as Kraken's
    OHLC endpoint does); before the first trade there is no price, so no
    candle. Buckets opening before ``complete_from`` miss earlier trades and
    are left out. Raises :class:`BadData` for a trade older than the open bucket.
    """
    width = interval_min * 60
    closed: list[Candle] = []
    bucket = tail
    for trade in trades:
        if end is not None and trade.time >= end:
            break
        start = math.floor(trade.time) // width * width
        price = trade.price
        if bucket is not None and start == bucket.time:
            bucket = Candle(
                bucket.time,
                bucket.open,
                max(bucket.high, price),
                min(bucket.low, price),
                price,
                bucket.volume + trade.volume,
                bucket.trade_count + 1,
            )
            continue
        if bucket is not None:
            if start < bucket.time:
                raise BadData(f"trade at {trade.time} is older than the open {interval_min}m bucket {bucket.time}")
            closed.append(bucket)
            closed.extend(_flat(bucket.close, bucket.time + width, start, width))
        bucket = Candle(start, price, price, price, price, trade.volume, 1)
    if end is not None and bucket is not None and bucket.time + width <= end:
        closed.append(bucket)
        closed.extend(_flat(bucket.close, bucket.time + width, math.floor(end) // width * width, width))
        bucket = None
    return Aggregation([c for c in closed if c.time >= complete_from], bucket)


def _flat(price: float, first: int, stop: int, width: int) -> list[Candle]:
    """Trade-less candles at ``price`` for the buckets from ``first`` up to (excluding) ``stop``."""
    return [Candle(t, price, price, price, price, 0.0, 0) for t in range(first, stop, width)]


# Planning ---------------------------------------------------------------------


def newest_run(candles: Sequence[Candle], interval_min: int, now: float) -> tuple[int, int]:
    """Start time and length of the newest gap-free run of stored candles.

    ``candles`` are the store's newest, oldest first. A run whose newest
    candle is older than Kraken's OHLC window has not been synced recently and
    counts as empty: ``(the current bucket, 0)``, as for an empty store.
    """
    width = interval_min * 60
    current = math.floor(now) // width * width
    if not candles or candles[-1].time < current - OHLC_WINDOW * width:
        return current, 0
    n = 1
    while n < len(candles) and candles[-n - 1].time == candles[-n].time - width:
        n += 1
    return candles[-n].time, n


class Phase(NamedTuple):
    name: str  # "1m" | "15m": whose depth this range fills
    from_ts: int
    to_ts: int


@dataclass(frozen=True)
class BackfillJob:
    """A plan and how far it has got: what is persisted after every page.

    ``windows[interval] = (from, before)``: candles of ``interval`` are written
    only when ``from <= time < before``; ``before`` is where the store's synced
    run starts, so a candle the OHLC sync stored is never replaced.
    ``tails`` are the buckets still open at ``cursor_ns``.
    """

    phases: tuple[Phase, ...]
    windows: Mapping[int, tuple[int, int]]
    targets: Mapping[int, int]
    planned_at: float
    phase_index: int = 0
    cursor_ns: int | None = None
    tails: Mapping[int, Candle | None] = field(default_factory=dict)
    requests: int = 0
    trades: int = 0
    written: Mapping[int, int] = field(default_factory=lambda: dict.fromkeys(INTERVALS, 0))
    saved_at: float | None = None

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)

    @property
    def phase(self) -> Phase | None:
        return None if self.done else self.phases[self.phase_index]

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "phases": [list(p) for p in self.phases],
            "windows": {str(i): list(w) for i, w in self.windows.items()},
            "targets": {str(i): n for i, n in self.targets.items()},
            "planned_at": self.planned_at,
            "phase_index": self.phase_index,
            "cursor_ns": self.cursor_ns,
            "tails": {str(i): None if c is None else list(c) for i, c in self.tails.items()},
            "requests": self.requests,
            "trades": self.trades,
            "written": {str(i): n for i, n in self.written.items()},
            "saved_at": self.saved_at,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> BackfillJob:
        """The job saved by :meth:`to_doc`; :class:`BadData` when it is not one."""
        try:
            if doc["version"] != STATE_VERSION:
                raise BadData(f"backfill state version {doc['version']!r}, expected {STATE_VERSION}")
            return cls(
                phases=tuple(Phase(str(n), int(a), int(b)) for n, a, b in doc["phases"]),
                windows={int(i): (int(a), int(b)) for i, (a, b) in doc["windows"].items()},
                targets={int(i): int(n) for i, n in doc["targets"].items()},
                planned_at=float(doc["planned_at"]),
                phase_index=int(doc["phase_index"]),
                cursor_ns=None if doc["cursor_ns"] is None else int(doc["cursor_ns"]),
                tails={int(i): None if c is None else _candle(c) for i, c in doc["tails"].items()},
                requests=int(doc["requests"]),
                trades=int(doc["trades"]),
                written={int(i): int(n) for i, n in doc["written"].items()},
                saved_at=None if doc["saved_at"] is None else float(doc["saved_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadData(f"backfill state is malformed: {type(exc).__name__}: {exc}") from None


def _candle(row: Sequence[Any]) -> Candle:
    time, o, h, low, c, v, n = row
    return Candle(int(time), float(o), float(h), float(low), float(c), float(v), int(n))


def plan_backfill(now: float, targets: Mapping[int, int], runs: Mapping[int, tuple[int, int]]) -> BackfillJob:
    """What to fetch so each interval's store reaches its target depth.

    ``runs[interval]`` is the store's :func:`newest_run`. An interval whose run
    is shorter than its target needs ``[now - target intervals, run start)``
    (the start rounded down to 15 minutes). Phase "1m" fetches the primary's
    range first; phase "15m" fetches the secondary's range up to where phase
    "1m" starts (or its run's start when it is nearer), since phase "1m"'s
    trades yield the 15m candles of its own range.
    """
    phases: list[Phase] = []
    windows: dict[int, tuple[int, int]] = {}
    edge: int | None = None  # where the previous phase starts
    for interval in INTERVALS:
        run_start, run_length = runs[interval]
        if run_length >= targets[interval]:
            continue
        depth_start = math.floor(now - targets[interval] * interval * 60) // ALIGN_SEC * ALIGN_SEC
        windows[interval] = (depth_start, run_start)
        to_ts = run_start if edge is None else min(run_start, edge)
        if depth_start < to_ts:
            phases.append(Phase(PHASE_NAMES[interval], depth_start, to_ts))
            edge = depth_start
    return BackfillJob(tuple(phases), windows, dict(targets), planned_at=now)


# Progress through pages ---------------------------------------------------------


def next_since(job: BackfillJob) -> int:
    """The ``since`` of the job's next request (a phase starts a little early: :data:`PRICE_LEAD_SEC`)."""
    if job.phase is None:
        raise ValueError("the backfill job is done")
    if job.cursor_ns is not None:
        return job.cursor_ns
    return (job.phase.from_ts - PRICE_LEAD_SEC) * NS_PER_SEC - 1


def apply_page(job: BackfillJob, page: TradesPage) -> tuple[BackfillJob, dict[int, list[Candle]]]:
    """The job after one page of trades, and the candles to write per interval.

    The phase ends when the page holds a trade at or after its end (every
    earlier trade has been seen) or holds none (nothing newer exists yet).
    """
    phase = job.phase
    if phase is None:
        raise ValueError("the backfill job is done")
    since = next_since(job)
    if page.trades and page.last <= since:
        raise BadData(f"Kraken Trades: the cursor did not advance (since {since}, last {page.last})")
    inside = [t for t in page.trades if t.time < phase.to_ts]
    finished = len(inside) < len(page.trades) or not page.trades
    writes: dict[int, list[Candle]] = {}
    tails: dict[int, Candle | None] = {}
    for interval, (lo, hi) in job.windows.items():
        if hi <= phase.from_ts or lo >= phase.to_ts:
            continue  # none of this interval's candles to write lie in this phase
        agg = aggregate_trades(
            inside,
            interval,
            tail=job.tails.get(interval),
            complete_from=phase.from_ts,
            end=phase.to_ts if finished else None,
        )
        writes[interval] = [c for c in agg.closed if lo <= c.time < hi]
        tails[interval] = None if finished else agg.tail
    written = {i: job.written.get(i, 0) + len(writes.get(i, ())) for i in INTERVALS}
    advanced = replace(
        job,
        phase_index=job.phase_index + 1 if finished else job.phase_index,
        cursor_ns=None if finished else page.last,
        tails={} if finished else tails,
        requests=job.requests + 1,
        trades=job.trades + len(inside),
        written=written,
    )
    return advanced, writes


def covered_sec(job: BackfillJob) -> float:
    """Seconds of market time fetched so far, over all phases."""
    covered = float(sum(p.to_ts - p.from_ts for p in job.phases[: job.phase_index]))
    phase = job.phase
    if phase is not None and job.cursor_ns is not None:
        covered += min(max(job.cursor_ns / NS_PER_SEC - phase.from_ts, 0.0), phase.to_ts - phase.from_ts)
    return covered


def total_sec(job: BackfillJob) -> float:
    return float(sum(p.to_ts - p.from_ts for p in job.phases))


# The runner -------------------------------------------------------------------


class TradesBackfill:
    """Fills the store's older candles from Kraken's public trades, in its own daemon thread.

    At start it reloads its job from ``store.load_state("backfill:<PAIR>")``
    and resumes it when it is unfinished, made for the same targets and saved
    less than :data:`RESUME_WITHIN_SEC` ago (then Kraken's 12-hour OHLC window
    has covered the downtime). Otherwise (no job, a finished one, or a stale
    one) it plans afresh from the store, which costs no request when the
    store's newest gap-free runs already reach both targets: a finished
    backfill starts again only when a downtime longer than Kraken's window
    broke those runs. Requests start at least ``min_interval_sec`` apart; a
    failed page (:class:`RetryLater` after the client's own retries, or
    :class:`BadData`) is asked again after a back-off of 5 s doubling to 300 s
    (at least the server's ``Retry-After``). The job is saved after every
    page, so a restart asks at most the page that was in flight again.
    """

    def __init__(
        self,
        market: object,
        store: Store,
        pair: str,
        *,
        clock: Clock,
        target_1m: int,
        target_15m: int,
        enabled: bool = True,
        min_interval_sec: float = 1.0,
        page_size: int = DEFAULT_PAGE_SIZE,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.market = market
        self.store = store
        self.pair = pair
        self.clock = clock
        self.targets = {PRIMARY: target_1m, SECONDARY: target_15m}
        self.enabled = enabled
        self.min_interval_sec = min_interval_sec
        self.page_size = page_size
        self.state_key = f"backfill:{pair}"
        self.available = isinstance(market, TradesSource)
        self._stop = stop_event or threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._job: BackfillJob | None = None
        self._state = "running"
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._fresh = dict.fromkeys(INTERVALS, 0)
        self._rate_ref: tuple[float, float] | None = None  # (clock time, covered seconds) when this run began
        self._last_request_at: float | None = None

    # control ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (nothing when disabled, unavailable or already started)."""
        if not (self.enabled and self.available) or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="trades-backfill", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (at most ``timeout`` wall seconds)."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; ``True`` when it has (or never started)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # reads (any thread) ---------------------------------------------------------

    def take_written(self) -> dict[int, int]:
        """Candles written per interval (``{1: n, 15: m}``) since the last call."""
        with self._lock:
            fresh, self._fresh = self._fresh, dict.fromkeys(INTERVALS, 0)
        return fresh

    def status(self) -> dict[str, Any]:
        """The ``trades_backfill`` block of the status."""
        with self._lock:
            job, state, rate_ref = self._job, self._state, self._rate_ref
            last_error, last_error_at = self._last_error, self._last_error_at
        if not self.enabled:
            state = "disabled"
        elif not self.available:
            state = "unavailable"
        block: dict[str, Any] = {
            "enabled": self.enabled,
            "state": state,
            "phase": None,
            "from_ts": None,
            "to_ts": None,
            "cursor_ts": None,
            "pct": None,
            "requests": job.requests if job else 0,
            "trades": job.trades if job else 0,
            "candles_written": {str(i): job.written.get(i, 0) if job else 0 for i in INTERVALS},
            "eta_sec": None,
            "last_error": last_error,
            "last_error_at": last_error_at,
        }
        if job is None or state in ("disabled", "unavailable"):
            return block
        total = total_sec(job)
        phase = job.phase
        if phase is None:
            if job.phases:
                block["from_ts"] = float(min(p.from_ts for p in job.phases))
                block["to_ts"] = block["cursor_ts"] = float(max(p.to_ts for p in job.phases))
            block.update(pct=100.0, eta_sec=0.0)
            return block
        covered = covered_sec(job)
        cursor = phase.from_ts if job.cursor_ns is None else job.cursor_ns / NS_PER_SEC
        block.update(
            phase=phase.name,
            from_ts=float(phase.from_ts),
            to_ts=float(phase.to_ts),
            cursor_ts=float(min(max(cursor, phase.from_ts), phase.to_ts)),
            pct=round(100.0 * covered / total, 1) if total > 0 else 100.0,
            eta_sec=_eta(rate_ref, self.clock.now(), covered, total),
        )
        return block

    # the thread -----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    job = self._job or self._prepare()
                    if job.done:
                        self._finish(job)
                        return
                    self._pace()
                    if self._stop.is_set():
                        return
                    self._fetch_page(job)
                except (RetryLater, BadData) as exc:
                    retry_after = exc.retry_after_sec if isinstance(exc, RetryLater) else None
                    delay = backoff_delay(
                        failures, base=FIRST_BACKOFF_SEC, cap=MAX_BACKOFF_SEC, retry_after=retry_after
                    )
                    failures += 1
                    self._record_error(exc, delay)
                    self._sleep(delay)
                else:
                    failures = 0
        except Exception as exc:  # a bug: say so in the status instead of dying silently
            log.exception("trades backfill stopped")
            self._record_error(exc, None)

    def _prepare(self) -> BackfillJob:
        """The job to run: the saved one when it can be resumed, else a fresh plan (saved at once)."""
        now = self.clock.now()
        job = self._saved_job(now)
        if job is None:
            runs = {}
            for interval, target in self.targets.items():
                rows = self.store.load_candles(self.pair, interval, target)
                runs[interval] = newest_run(rows, interval, now)
            job = replace(plan_backfill(now, self.targets, runs), saved_at=now)
            self.store.save_state(self.state_key, job.to_doc(), now)
            for p in job.phases:
                log.info("trades backfill: phase %s from %d to %d", p.name, p.from_ts, p.to_ts)
        else:
            log.info("trades backfill: resuming phase %s at %s", job.phase and job.phase.name, job.cursor_ns)
        with self._lock:
            self._job = job
            self._rate_ref = (now, covered_sec(job))
        return job

    def _saved_job(self, now: float) -> BackfillJob | None:
        try:
            doc = self.store.load_state(self.state_key)
            if doc is None:
                return None
            job = BackfillJob.from_doc(doc)
        except BadData as exc:
            log.warning("trades backfill: planning afresh: %s", exc)
            return None
        fresh = job.saved_at is not None and now - job.saved_at <= RESUME_WITHIN_SEC
        if job.done or not fresh or dict(job.targets) != self.targets:
            return None
        return job

    def _fetch_page(self, job: BackfillJob) -> None:
        since = next_since(job)
        self._last_request_at = self.clock.now()
        page = cast(TradesSource, self.market).fetch_trades(since, count=self.page_size)
        advanced, writes = apply_page(job, page)
        for interval, candles in writes.items():
            self.store.upsert_candles(self.pair, interval, candles)
        now = self.clock.now()
        advanced = replace(advanced, saved_at=now)
        self.store.save_state(self.state_key, advanced.to_doc(), now)
        if advanced.phase_index != job.phase_index:
            log.info("trades backfill: phase %s done", job.phases[job.phase_index].name)
        with self._lock:
            self._job = advanced
            self._state = "running"
            for interval, candles in writes.items():
                self._fresh[interval] += len(candles)

    def _finish(self, job: BackfillJob) -> None:
        with self._lock:
            self._state = "done"
        log.info(
            "trades backfill: done (%d requests, %d trades, candles written %s)",
            job.requests,
            job.trades,
            dict(job.written),
        )

    def _record_error(self, exc: Exception, retry_in: float | None) -> None:
        now = self.clock.now()
        with self._lock:
            self._state = "error"
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._last_error_at = now
        if retry_in is not None:
            log.warning("trades backfill: %s; retry in %.0fs", exc, retry_in)

    def _pace(self) -> None:
        if self._last_request_at is not None:
            self._sleep(self._last_request_at + self.min_interval_sec - self.clock.now())

    def _sleep(self, seconds: float) -> None:
        """Let ``seconds`` of clock time pass, in slices, returning early once stopped."""
        until = self.clock.now() + seconds
        while not self._stop.is_set():
            left = until - self.clock.now()
            if left <= 0:
                return
            self.clock.sleep(min(left, SLEEP_SLICE_SEC))


def _eta(rate_ref: tuple[float, float] | None, now: float, covered: float, total: float) -> float | None:
    """Seconds left at the pace of this run so far (``None`` before any progress)."""
    if rate_ref is None:
        return None
    started_at, covered_then = rate_ref
    elapsed, gained = now - started_at, covered - covered_then
    if elapsed <= 0 or gained <= 0:
        return None
    return round((total - covered) * elapsed / gained, 1)
