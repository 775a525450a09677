"""Trades backfill: the pure aggregation and planning, the Trades parser, and the
runner against the real HTTP fake of Kraken with a SQLite store.

Every runner test uses a simulated clock that only its sleeps move, so pacing
and back-off are exact and nothing waits on the wall clock except bounded
joins of the runner's thread.
"""

from __future__ import annotations

import math
import random
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import requests
from fake_kraken import BAD_PRICE, TRADES_PATH, FakeKraken, trade_ns

from candles import Candle
from clock import SimClock
from errors import BadData, RetryLater
from kraken.public_client import KrakenPublicClient, Trade, TradesPage, parse_trades
from kraken.trades_backfill import (
    PRICE_LEAD_SEC,
    RESUME_WITHIN_SEC,
    BackfillJob,
    Phase,
    TradesBackfill,
    aggregate_trades,
    apply_page,
    newest_run,
    plan_backfill,
)
from market.pipeline import CandlePipeline, FeedSpec
from market.sim import SimulatedMarket
from store.sqlite import SQLiteStore

PAIR = "XDGUSD"
START = 1_767_225_600
NOW = START + 30 * 3600 + 30  # mid-minute, as a real clock would be
CURRENT_1M = NOW - 30  # the 1m bucket forming at NOW
T1, T15 = 600, 96  # targets: 10 hours of 1m, 24 hours of 15m candles
SYNCED_1M, SYNCED_15M = 120, 48  # what "the OHLC sync" stored: 2 hours of 1m, 12 hours of 15m
JOIN_SEC = 30.0
STATUS_KEYS = {
    "enabled",
    "state",
    "phase",
    "from_ts",
    "to_ts",
    "cursor_ts",
    "pct",
    "requests",
    "trades",
    "candles_written",
    "eta_sec",
    "last_error",
    "last_error_at",
}


def make_trades(seed: int, start: float, end: float, mean_gap: float = 15.0) -> list[Trade]:
    """A seeded trade stream: a random-walk price, steady arrivals, bursts and quiet spells.

    Times are whole microseconds and strictly increasing (Kraken's resolution).
    """
    rng = random.Random(seed)
    t_us, end_us = int(start * 1e6), int(end * 1e6)
    price = 0.1
    out: list[Trade] = []
    while True:
        r = rng.random()
        if r < 0.01:
            t_us += int(rng.uniform(600, 2400) * 1e6)  # quiet: several empty minutes, often a whole 15m bucket
            n = 1
        elif r < 0.04:
            t_us += int(rng.expovariate(1 / mean_gap) * 1e6)
            n = rng.randint(10, 40)  # a burst: one order filling many makers within a second or two
        else:
            t_us += int(rng.expovariate(1 / mean_gap) * 1e6) + 1
            n = 1
        for _ in range(n):
            t_us += rng.randint(1, 50_000)
            if t_us >= end_us:
                return out
            price = round(price * math.exp(rng.gauss(0.0, 0.0015)), 7)
            out.append(Trade(t_us / 1e6, price, round(rng.uniform(1.0, 5000.0), 8)))


def expected_candles(
    trades: Sequence[Trade], interval_min: int, end: float, complete_from: float = -math.inf
) -> list[Candle]:
    """The same candles built another way: a dict of buckets, then every bucket in turn.

    Buckets without trades repeat the previous close (volume and count 0); before the
    first trade there are none; buckets ending after ``end`` and opening before
    ``complete_from`` are left out.
    """
    width = interval_min * 60
    groups: dict[int, list[Trade]] = defaultdict(list)
    for t in trades:
        if t.time < end:
            groups[int(t.time // width) * width].append(t)
    if not groups:
        return []
    out: list[Candle] = []
    previous_close = None
    bucket = min(groups)
    while bucket + width <= end:
        group = groups.get(bucket)
        if group:
            prices = [t.price for t in group]
            candle = Candle(
                bucket, prices[0], max(prices), min(prices), prices[-1], sum(t.volume for t in group), len(group)
            )
            previous_close = prices[-1]
        else:
            p = previous_close
            candle = Candle(bucket, p, p, p, p, 0.0, 0)
        if bucket >= complete_from:
            out.append(candle)
        bucket += width
    return out


def aggregate_in_pages(trades: Sequence[Trade], interval_min: int, page_size: int, end: float) -> list[Candle]:
    closed: list[Candle] = []
    tail = None
    for i in range(0, len(trades), page_size):
        last_page = i + page_size >= len(trades)
        agg = aggregate_trades(trades[i : i + page_size], interval_min, tail=tail, end=end if last_page else None)
        closed += agg.closed
        tail = agg.tail
    return closed


# Aggregation ------------------------------------------------------------------

STREAM = make_trades(5, START, START + 30 * 3600)
STREAM_END = START + 30 * 3600


def test_the_stream_has_gaps_and_bursts() -> None:
    assert len(STREAM) > 5000
    gaps = [b.time - a.time for a, b in pairwise(STREAM)]
    assert max(gaps) > 2 * 900  # a quiet spell that empties whole 15m buckets
    per_second = defaultdict(int)
    for t in STREAM:
        per_second[int(t.time)] += 1
    assert max(per_second.values()) >= 10


@pytest.mark.parametrize("interval", [1, 15])
def test_aggregation_equals_an_independent_construction(interval: int) -> None:
    agg = aggregate_trades(STREAM, interval, end=STREAM_END)
    expected = expected_candles(STREAM, interval, STREAM_END)
    assert agg.closed == expected
    assert agg.tail is None
    assert sum(c.trade_count for c in agg.closed) == len(STREAM)
    assert any(c.trade_count == 0 and c.volume == 0 for c in agg.closed)  # the quiet spells are flat candles
    times = [c.time for c in agg.closed]
    assert times == list(range(times[0], times[-1] + 1, interval * 60))


@pytest.mark.parametrize("interval", [1, 15])
@pytest.mark.parametrize("page_size", [1, 7, 100, 999, len(STREAM)])
def test_page_boundaries_change_nothing(interval: int, page_size: int) -> None:
    whole = aggregate_trades(STREAM, interval, end=STREAM_END).closed
    assert aggregate_in_pages(STREAM, interval, page_size, STREAM_END) == whole


def test_open_bucket_is_carried_not_emitted_until_a_later_trade_or_the_end() -> None:
    trades = [Trade(START + 5.5, 2.0, 1.0), Trade(START + 20.0, 3.0, 2.0), Trade(START + 50.0, 1.0, 4.0)]
    first = aggregate_trades(trades, 1)
    assert first.closed == []
    assert first.tail == Candle(START, 2.0, 3.0, 1.0, 1.0, 7.0, 3)
    later = aggregate_trades([Trade(START + 200.25, 4.0, 1.0)], 1, tail=first.tail)
    flat = [Candle(START + 60, 1.0, 1.0, 1.0, 1.0, 0.0, 0), Candle(START + 120, 1.0, 1.0, 1.0, 1.0, 0.0, 0)]
    assert later.closed == [first.tail, *flat]
    assert later.tail == Candle(START + 180, 4.0, 4.0, 4.0, 4.0, 1.0, 1)
    ended = aggregate_trades([], 1, tail=later.tail, end=START + 300)
    assert ended.closed == [later.tail, Candle(START + 240, 4.0, 4.0, 4.0, 4.0, 0.0, 0)]
    assert ended.tail is None


def test_end_keeps_a_straddling_bucket_open_and_ignores_later_trades() -> None:
    trades = [Trade(START + 10, 1.0, 1.0), Trade(START + 70, 2.0, 1.0), Trade(START + 130, 3.0, 1.0)]
    agg = aggregate_trades(trades, 1, end=START + 100)
    assert agg.closed == [Candle(START, 1.0, 1.0, 1.0, 1.0, 1.0, 1)]
    assert agg.tail == Candle(START + 60, 2.0, 2.0, 2.0, 2.0, 1.0, 1)  # incomplete: never emitted


def test_buckets_opening_before_complete_from_are_left_out() -> None:
    trades = [Trade(START + 10, 1.0, 1.0), Trade(START + 190, 2.0, 1.0)]
    agg = aggregate_trades(trades, 1, complete_from=START + 120, end=START + 240)
    assert [c.time for c in agg.closed] == [START + 120, START + 180]
    assert agg.closed[0] == Candle(START + 120, 1.0, 1.0, 1.0, 1.0, 0.0, 0)  # the lead's price, repeated


def test_a_trade_older_than_the_open_bucket_is_bad_data() -> None:
    tail = Candle(START + 60, 1.0, 1.0, 1.0, 1.0, 1.0, 1)
    with pytest.raises(BadData, match="older than the open 1m bucket"):
        aggregate_trades([Trade(START + 10, 1.0, 1.0)], 1, tail=tail)


# Planning ---------------------------------------------------------------------


def flat_run(interval: int, first: int, n: int) -> list[Candle]:
    return [Candle(first + i * interval * 60, 1.0, 1.0, 1.0, 1.0, 0.0, 0) for i in range(n)]


def test_newest_run_stops_at_the_first_gap_and_ignores_a_stale_store() -> None:
    assert newest_run([], 1, NOW) == (CURRENT_1M, 0)
    run = flat_run(1, CURRENT_1M - 100 * 60, 100)
    older = flat_run(1, CURRENT_1M - 300 * 60, 50)
    assert newest_run(older + run, 1, NOW) == (CURRENT_1M - 100 * 60, 100)
    stale = flat_run(1, CURRENT_1M - 2000 * 60, 100)  # newest candle far older than Kraken's 720-candle window
    assert newest_run(stale, 1, NOW) == (CURRENT_1M, 0)


def test_plan_fills_the_primary_first_then_the_secondary_up_to_it() -> None:
    runs = {1: (CURRENT_1M - SYNCED_1M * 60, SYNCED_1M), 15: (NOW - 30 - 48 * 900 + 870, 48)}
    job = plan_backfill(NOW, {1: T1, 15: T15}, runs)
    from_1m = (NOW - T1 * 60) // 900 * 900
    from_15m = (NOW - T15 * 900) // 900 * 900
    assert job.phases == (Phase("1m", from_1m, runs[1][0]), Phase("15m", from_15m, runs[15][0]))
    assert job.windows == {1: (from_1m, runs[1][0]), 15: (from_15m, runs[15][0])}
    assert from_1m % 900 == 0 and from_1m <= NOW - T1 * 60


def test_plan_secondary_phase_stops_where_the_primary_phase_starts() -> None:
    runs = {1: (CURRENT_1M - SYNCED_1M * 60, SYNCED_1M), 15: (CURRENT_1M // 900 * 900, 0)}  # no 15m synced yet
    job = plan_backfill(NOW, {1: T1, 15: T15}, runs)
    assert [p.name for p in job.phases] == ["1m", "15m"]
    assert job.phases[1].to_ts == job.phases[0].from_ts


def test_plan_is_empty_when_the_store_is_deep_enough() -> None:
    runs = {1: (CURRENT_1M - T1 * 60, T1), 15: (NOW - T15 * 900, T15)}
    job = plan_backfill(NOW, {1: T1, 15: T15}, runs)
    assert job.phases == () and job.done


def test_plan_skips_a_deep_primary_and_fills_only_the_secondary() -> None:
    runs = {1: (CURRENT_1M - T1 * 60, T1), 15: (NOW - 30 - 10 * 900 + 870, 10)}
    job = plan_backfill(NOW, {1: T1, 15: T15}, runs)
    assert [p.name for p in job.phases] == ["15m"] and set(job.windows) == {15}


def test_apply_page_ends_a_phase_on_a_trade_past_its_end_and_writes_only_inside_the_windows() -> None:
    job = BackfillJob((Phase("1m", START, START + 300),), {1: (START, START + 240)}, {1: 5, 15: 1}, planned_at=START)
    trades = [Trade(START + 30 + 60 * i, 1.0 + i, 1.0) for i in range(6)]
    mid, writes = apply_page(job, TradesPage(trades[:2], trade_ns(trades[1].time)))
    assert [c.time for c in writes[1]] == [START]
    assert mid.cursor_ns == trade_ns(trades[1].time) and mid.tails[1].time == START + 60
    done, writes = apply_page(mid, TradesPage(trades[2:], trade_ns(trades[-1].time)))
    assert [c.time for c in writes[1]] == [START + 60, START + 120, START + 180]  # not START + 240: OHLC's
    assert done.done and done.requests == 2 and done.trades == 5 and done.written[1] == 4
    assert BackfillJob.from_doc(done.to_doc()) == done


def test_a_cursor_that_does_not_advance_is_bad_data() -> None:
    job = BackfillJob((Phase("1m", START, START + 300),), {1: (START, START + 300)}, {1: 5, 15: 1}, planned_at=START)
    job = replace(job, cursor_ns=10**18)
    with pytest.raises(BadData, match="did not advance"):
        apply_page(job, TradesPage([Trade(START + 1, 1.0, 1.0)], 10**18))


# Parsing ----------------------------------------------------------------------

KRAKEN_EXAMPLE = {
    "error": [],
    "result": {
        "XXBTZUSD": [
            ["30243.40000", "0.34507674", 1688669597.8277369, "b", "m", "", 61044952],
            ["30243.30000", "0.00376960", 1688669598.2804112, "s", "l", "", 61044953],
        ],
        "last": "1688671969993150842",
    },
}


def test_parse_trades_reads_kraken_string_fields_and_the_nanosecond_cursor() -> None:
    page = parse_trades(KRAKEN_EXAMPLE)
    assert page.trades == [
        Trade(1688669597.8277369, 30243.4, 0.34507674),
        Trade(1688669598.2804112, 30243.3, 0.0037696),
    ]
    assert page.last == 1688671969993150842


def test_parse_trades_accepts_rows_without_a_trade_id() -> None:
    payload = {
        "error": [],
        "result": {"XDGUSD": [["0.1", "5", 1767225600.5, "b", "l", ""]], "last": "1767225600500000000"},
    }
    assert parse_trades(payload).trades == [Trade(1767225600.5, 0.1, 5.0)]


@pytest.mark.parametrize(
    ("errors", "kind"),
    [
        (["EAPI:Rate limit exceeded"], RetryLater),
        (["EService:Unavailable"], RetryLater),
        (["EGeneral:Too many requests"], RetryLater),
        (["EQuery:Unknown asset pair"], BadData),
    ],
)
def test_parse_trades_error_arrays(errors: list[str], kind: type[Exception]) -> None:
    with pytest.raises(kind, match=errors[0]):
        parse_trades({"error": errors})


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([], "not a JSON object"),
        ({"error": "x"}, "'error' is not a list"),
        ({"error": []}, "no 'result'"),
        ({"error": [], "result": {"last": "1"}}, "exactly one pair"),
        ({"error": [], "result": {"A": [], "B": [], "last": "1"}}, "exactly one pair"),
        ({"error": [], "result": {"A": []}}, "'last' is not an integer"),
        ({"error": [], "result": {"A": [], "last": "soon"}}, "'last' is not an integer"),
        ({"error": [], "result": {"A": [["1", "2"]], "last": "1"}}, "row 0 is not"),
        ({"error": [], "result": {"A": ["x"], "last": "1"}}, "row 0 is not"),
        ({"error": [], "result": {"A": [["n/a", "2", 1.0]], "last": "1"}}, "row 0 has a non-numeric"),
        ({"error": [], "result": {"A": [["1", "2", True]], "last": "1"}}, "row 0 has a non-numeric"),
        ({"error": [], "result": {"A": [["-1", "2", 1.0]], "last": "1"}}, "price must be"),
        ({"error": [], "result": {"A": [["1", "nan", 1.0]], "last": "1"}}, "volume must be"),
        ({"error": [], "result": {"A": [["1", "2", -5]], "last": "1"}}, "time must be"),
        ({"error": [], "result": {"A": [["1", "2", 9.0], ["1", "2", 8.0]], "last": "1"}}, "row 1 .* is older"),
    ],
)
def test_parse_trades_malformed_answers_are_bad_data(payload: object, match: str) -> None:
    with pytest.raises(BadData, match=match):
        parse_trades(payload)


# The fake and the client ------------------------------------------------------

TRADES = make_trades(11, NOW - 26 * 3600, NOW - 1)


@pytest.fixture
def clock() -> SimClock:
    return SimClock(NOW)


@pytest.fixture
def fake(clock: SimClock) -> Iterator[FakeKraken]:
    with FakeKraken([], now=clock.now, pair=PAIR, trades=TRADES) as server:
        yield server


@pytest.fixture
def make_client(fake: FakeKraken, clock: SimClock):
    sessions: list[requests.Session] = []

    def make(max_retries: int = 3) -> KrakenPublicClient:
        session = requests.Session()
        sessions.append(session)
        return KrakenPublicClient(
            fake.url, PAIR, now=clock.now, sleep=clock.sleep, timeout=5.0, max_retries=max_retries, session=session
        )

    yield make
    for s in sessions:
        s.close()


def trades_requests(fake: FakeKraken) -> list[dict]:
    return [r for r in fake.requests if r["path"] == TRADES_PATH]


def test_fetch_trades_pages_with_the_cursor(make_client, fake: FakeKraken) -> None:
    client = make_client()
    since = trade_ns(TRADES[99].time)
    page = client.fetch_trades(since, count=50)
    assert page.trades == TRADES[100:150]
    assert page.last == trade_ns(TRADES[149].time)
    assert client.fetch_trades(page.last, count=50).trades == TRADES[150:200]
    assert trades_requests(fake)[0]["params"] == {"pair": PAIR, "since": str(since), "count": "50"}


def test_fake_serves_the_newest_trades_without_since_and_accepts_seconds(make_client, clock: SimClock) -> None:
    client = make_client()
    assert client.fetch_trades().trades == TRADES[-1000:]
    second = int(TRADES[500].time) + 1
    expected = [t for t in TRADES if t.time > second][:10]
    assert client.fetch_trades(second, count=10).trades == expected


def test_fake_serves_only_trades_done_by_its_now(make_client, fake: FakeKraken, clock: SimClock) -> None:
    fake.set_trades([*TRADES, Trade(NOW + 100.5, 0.2, 1.0)])
    client = make_client()
    late = client.fetch_trades(trade_ns(TRADES[-1].time))
    assert late.trades == [] and late.last == trade_ns(TRADES[-1].time)
    clock.advance(101)
    assert client.fetch_trades(trade_ns(TRADES[-1].time)).trades == [Trade(NOW + 100.5, 0.2, 1.0)]


def test_fake_rejects_a_bad_count(fake: FakeKraken) -> None:
    answer = requests.get(f"{fake.url}{TRADES_PATH}", params={"pair": PAIR, "count": "5000"}, timeout=5).json()
    assert answer == {"error": ["EGeneral:Invalid arguments"]}


def test_fetch_trades_retries_rate_limits_like_ohlc(make_client, fake: FakeKraken, clock: SimClock) -> None:
    fake.fail_next(2, "rate_limit")
    page = make_client().fetch_trades(trade_ns(TRADES[0].time), count=5)
    assert page.trades == TRADES[1:6]
    times = [r["at"] for r in trades_requests(fake)]
    assert [b - a for a, b in pairwise(times)] == [1.0, 2.0]


@pytest.mark.parametrize(("kind", "match"), [("bad_row", f"row 0 .*{BAD_PRICE}"), ("malformed", "not valid JSON")])
def test_fetch_trades_bad_answers_are_bad_data(make_client, fake: FakeKraken, kind: str, match: str) -> None:
    fake.fail_next(1, kind)
    with pytest.raises(BadData, match=match):
        make_client().fetch_trades(0, count=5)


# The runner -------------------------------------------------------------------


def synced_candles(interval: int, n: int) -> list[Candle]:
    """What the OHLC sync would have stored: the newest ``n`` closed candles, marked (count + 1000)
    so a test sees whether the backfill replaced any."""
    candles = expected_candles(TRADES, interval, NOW // (interval * 60) * interval * 60)
    return [c._replace(trade_count=c.trade_count + 1000) for c in candles[-n:]]


SYNCED = {1: synced_candles(1, SYNCED_1M), 15: synced_candles(15, SYNCED_15M)}


def backfilled_expectation() -> dict[int, list[Candle]]:
    """The rows each interval's store should hold after a complete backfill."""
    from_1m = (NOW - T1 * 60) // 900 * 900
    from_15m = (NOW - T15 * 900) // 900 * 900
    floor_1m, floor_15m = SYNCED[1][0].time, SYNCED[15][0].time
    lead_1m = [t for t in TRADES if t.time >= from_1m - PRICE_LEAD_SEC]
    lead_15m = [t for t in TRADES if t.time >= from_15m - PRICE_LEAD_SEC]
    return {
        1: expected_candles(lead_1m, 1, floor_1m, complete_from=from_1m) + SYNCED[1],
        15: expected_candles(lead_15m, 15, floor_15m, complete_from=from_15m) + SYNCED[15],
    }


def open_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    for interval, candles in SYNCED.items():
        store.upsert_candles(PAIR, interval, candles)
    return store


def all_candles(store: SQLiteStore, interval: int) -> list[Candle]:
    return store.load_candles(PAIR, interval, 10**6)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_store(tmp_path / "bot.sqlite3")
    yield s
    s.close()


def make_backfill(market: object, store: SQLiteStore, clock: SimClock, **kwargs) -> TradesBackfill:
    options = {"target_1m": T1, "target_15m": T15, "page_size": 100, **kwargs}
    return TradesBackfill(market, store, PAIR, clock=clock, **options)


def run_to_end(backfill: TradesBackfill) -> None:
    backfill.start()
    assert backfill.join(JOIN_SEC), "the backfill thread did not finish"


class StopAfter:
    """Wraps the client: after ``n`` pages it sets the backfill's stop event; with
    ``lose_page`` the n-th page is lost in flight (as in a crash before it was saved)."""

    def __init__(self, client: KrakenPublicClient, n: int, stop: threading.Event, *, lose_page: bool = False):
        self.client, self.n, self.stop, self.lose_page, self.calls = client, n, stop, lose_page, 0

    def fetch_trades(self, since: int | None = None, count: int | None = None) -> TradesPage:
        page = self.client.fetch_trades(since, count)
        self.calls += 1
        if self.calls == self.n:
            self.stop.set()
            if self.lose_page:
                raise RetryLater("interrupted")
        return page


def test_backfill_reaches_both_targets_with_the_expected_candles(make_client, store, fake, clock) -> None:
    backfill = make_backfill(make_client(), store, clock)
    assert backfill.status()["state"] == "running"
    run_to_end(backfill)
    expected = backfilled_expectation()
    for interval in (1, 15):
        assert all_candles(store, interval) == expected[interval]
        _start, length = newest_run(store.load_candles(PAIR, interval, 10**6), interval, clock.now())
        assert length >= (T1 if interval == 1 else T15)
    status = backfill.status()
    assert set(status) == STATUS_KEYS
    written = {str(i): len(expected[i]) - len(SYNCED[i]) for i in (1, 15)}
    assert status["state"] == "done" and status["phase"] is None and status["pct"] == 100.0
    assert status["candles_written"] == written
    assert status["requests"] == len(trades_requests(fake)) > 30
    assert status["last_error"] is None and status["eta_sec"] == 0.0
    assert status["from_ts"] == (NOW - T15 * 900) // 900 * 900 and status["to_ts"] == SYNCED[1][0].time
    assert backfill.take_written() == {1: written["1"], 15: written["15"]}
    assert backfill.take_written() == {1: 0, 15: 0}


def test_phase_1m_runs_first_and_never_asks_a_page_twice(make_client, store, fake, clock) -> None:
    run_to_end(make_backfill(make_client(), store, clock))
    sinces = [int(r["params"]["since"]) for r in trades_requests(fake)]
    assert len(set(sinces)) == len(sinces)
    from_1m = (NOW - T1 * 60) // 900 * 900
    assert sinces[0] == (from_1m - PRICE_LEAD_SEC) * 10**9 - 1
    second_phase = sinces.index((((NOW - T15 * 900) // 900 * 900) - PRICE_LEAD_SEC) * 10**9 - 1)
    assert sinces[:second_phase] == sorted(sinces[:second_phase])
    assert sinces[second_phase:] == sorted(sinces[second_phase:])


@pytest.mark.parametrize("min_interval", [1.0, 2.5])
def test_requests_are_paced(make_client, store, fake, clock, min_interval: float) -> None:
    run_to_end(make_backfill(make_client(), store, clock, min_interval_sec=min_interval))
    times = [r["at"] for r in trades_requests(fake)]
    assert len(times) > 30
    assert min(b - a for a, b in pairwise(times)) >= min_interval - 1e-9
    per_second = defaultdict(int)
    for t in times:
        per_second[math.floor(t)] += 1
    assert max(per_second.values()) <= math.ceil(1 / min_interval)


def test_rate_limits_back_off_and_the_result_is_unchanged(make_client, store, fake, clock) -> None:
    fake.fail_next(8, "rate_limit")  # two rounds of the client's four attempts
    backfill = make_backfill(make_client(max_retries=3), store, clock)
    run_to_end(backfill)
    times = [r["at"] for r in trades_requests(fake)]
    gaps = [b - a for a, b in pairwise(times)][:8]
    assert gaps == [1.0, 2.0, 4.0, 5.0, 1.0, 2.0, 4.0, 10.0]  # the client's retries, then the backfill's back-off
    status = backfill.status()
    assert status["state"] == "done"
    assert "Rate limit exceeded" in status["last_error"] and status["last_error_at"] == NOW + 7 + 5 + 7
    expected = backfilled_expectation()
    assert all_candles(store, 1) == expected[1] and all_candles(store, 15) == expected[15]


def test_retry_after_is_honoured_by_the_back_off(make_client, store, fake, clock) -> None:
    fake.fail_next(1, "http_429", retry_after=42)
    run_to_end(make_backfill(make_client(max_retries=0), store, clock))
    times = [r["at"] for r in trades_requests(fake)]
    assert times[1] - times[0] == 42.0


def test_a_bad_page_is_asked_again_after_a_back_off(make_client, store, fake, clock) -> None:
    fake.fail_next(1, "bad_row")
    backfill = make_backfill(make_client(), store, clock)
    run_to_end(backfill)
    requests_made = trades_requests(fake)
    assert requests_made[0]["params"] == requests_made[1]["params"]
    assert requests_made[1]["at"] - requests_made[0]["at"] == 5.0
    assert backfill.status()["state"] == "done" and BAD_PRICE in backfill.status()["last_error"]
    assert all_candles(store, 1) == backfilled_expectation()[1]


@pytest.mark.parametrize("lose_page", [False, True])
@pytest.mark.parametrize("stop_after", [3, 17, 18, 35])
def test_resume_after_interruption_continues_from_the_cursor(
    make_client, fake, clock, tmp_path: Path, stop_after: int, lose_page: bool
) -> None:
    reference_store = open_store(tmp_path / "reference.sqlite3")
    reference = make_backfill(make_client(), reference_store, SimClock(NOW))
    run_to_end(reference)
    reference_requests = len(trades_requests(fake))
    fake.requests.clear()

    store = open_store(tmp_path / "bot.sqlite3")
    stop = threading.Event()
    first = make_backfill(
        StopAfter(make_client(), stop_after, stop, lose_page=lose_page), store, clock, stop_event=stop
    )
    run_to_end(first)
    interrupted = first.status()
    assert set(interrupted) == STATUS_KEYS
    assert interrupted["state"] == ("error" if lose_page else "running")
    assert 0 < interrupted["pct"] < 100 and interrupted["phase"] in ("1m", "15m")
    assert interrupted["from_ts"] <= interrupted["cursor_ts"] <= interrupted["to_ts"]
    assert interrupted["eta_sec"] is None or interrupted["eta_sec"] > 0
    first_sinces = [r["params"]["since"] for r in trades_requests(fake)]
    assert len(first_sinces) == stop_after
    fake.requests.clear()

    second = make_backfill(make_client(), store, clock)
    run_to_end(second)
    second_sinces = [r["params"]["since"] for r in trades_requests(fake)]
    again = set(first_sinces) & set(second_sinces)
    assert again == ({first_sinces[-1]} if lose_page else set())  # at most the page in flight
    assert len(first_sinces) + len(second_sinces) == reference_requests + (1 if lose_page else 0)
    for interval in (1, 15):
        assert all_candles(store, interval) == all_candles(reference_store, interval)
    final = second.status()
    assert final["state"] == "done"
    assert final["requests"] == reference.status()["requests"]
    assert final["candles_written"] == reference.status()["candles_written"]
    store.close()
    reference_store.close()


def test_a_finished_backfill_does_not_start_again(make_client, store, fake, clock) -> None:
    run_to_end(make_backfill(make_client(), store, clock))
    fake.requests.clear()
    clock.advance(3600)
    again = make_backfill(make_client(), store, clock)
    run_to_end(again)
    assert trades_requests(fake) == []
    assert again.status()["state"] == "done"


def test_a_stale_unfinished_job_is_planned_afresh(make_client, store, fake, clock) -> None:
    stop = threading.Event()
    run_to_end(make_backfill(StopAfter(make_client(), 3, stop), store, clock, stop_event=stop))
    saved = BackfillJob.from_doc(store.load_state(f"backfill:{PAIR}"))
    assert not saved.done and saved.cursor_ns is not None
    clock.advance(RESUME_WITHIN_SEC + 60)
    restarted_at = clock.now()
    fake.requests.clear()
    stop_again = threading.Event()
    run_to_end(make_backfill(StopAfter(make_client(), 1, stop_again), store, clock, stop_event=stop_again))
    replanned = BackfillJob.from_doc(store.load_state(f"backfill:{PAIR}"))
    assert replanned.planned_at == restarted_at
    from_1m = math.floor(restarted_at - T1 * 60) // 900 * 900
    assert replanned.phases[0] == Phase("1m", from_1m, SYNCED[1][0].time)
    assert int(trades_requests(fake)[0]["params"]["since"]) == (from_1m - PRICE_LEAD_SEC) * 10**9 - 1


def test_opt_out_makes_no_request(make_client, store, fake, clock) -> None:
    backfill = make_backfill(make_client(), store, clock, enabled=False)
    backfill.start()
    assert backfill.join(0.1)
    status = backfill.status()
    assert status["enabled"] is False and status["state"] == "disabled"
    assert status["pct"] is None and status["candles_written"] == {"1": 0, "15": 0}
    assert trades_requests(fake) == [] and store.load_state(f"backfill:{PAIR}") is None
    assert backfill.take_written() == {1: 0, 15: 0}


def test_a_market_without_trades_is_unavailable(store, clock) -> None:
    market = SimulatedMarket(clock, seed=3, start=NOW)
    backfill = make_backfill(market, store, clock)
    backfill.start()
    assert backfill.join(0.1)
    status = backfill.status()
    assert status["enabled"] is True and status["state"] == "unavailable" and status["phase"] is None
    assert store.load_state(f"backfill:{PAIR}") is None


def test_recount_reads_rows_written_behind_the_pipelines_back(store, clock) -> None:
    market = SimulatedMarket(clock, seed=3, start=NOW)
    pipeline = CandlePipeline(
        store, market, PAIR, [FeedSpec(1, 60, T1, 50), FeedSpec(15, 300, T15, 20)], retention_days=14
    )
    pipeline.prime()
    window, newest = pipeline.window(1), pipeline.state[1].newest_time
    assert pipeline.available(1) == SYNCED_1M
    store.upsert_candles(PAIR, 1, flat_run(1, SYNCED[1][0].time - 300 * 60, 300))
    assert pipeline.available(1) == SYNCED_1M
    assert pipeline.recount(1) == SYNCED_1M + 300
    assert pipeline.available(1) == SYNCED_1M + 300 and pipeline.available(15) == SYNCED_15M
    assert pipeline.window(1) == window and pipeline.state[1].newest_time == newest
