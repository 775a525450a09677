import pytest

from candles import Candle, OhlcPage
from clock import SimClock
from errors import RetryLater
from market.pipeline import CandlePipeline, FeedSpec
from market.replay import ReplayMarket
from market.sim import generate
from store.sqlite import SQLiteStore

PAIR = "XDGUSD"


class FlakyMarket:
    """Wraps a market; fails while ``failing`` is set and counts calls."""

    def __init__(self, inner):
        self.inner, self.failing, self.calls = inner, False, 0

    def fetch_ohlc(self, interval_min, since=None):
        self.calls += 1
        if self.failing:
            raise RetryLater("Kraken: EService:Unavailable")
        return self.inner.fetch_ohlc(interval_min, since)


@pytest.fixture
def setup(tmp_path):
    candles, _ = generate(6000, seed=3)
    clock = SimClock(candles[0].time + 60 * 1000)  # 1000 candles closed
    market = FlakyMarket(ReplayMarket(clock, candles))
    store = SQLiteStore(tmp_path / "p.sqlite3")
    feeds = [FeedSpec(1, 60, 4000, 300), FeedSpec(15, 300, 1440, 250)]
    pipeline = CandlePipeline(store, market, PAIR, feeds, retention_days=14)
    yield pipeline, clock, market, store, candles
    store.close()


def test_first_sync_stores_the_market_window_of_closed_candles(setup):
    pipeline, clock, _market, store, candles = setup
    assert pipeline.sync_due(1, clock.now())
    added = pipeline.sync(1, clock.now())
    assert added == 720
    assert store.count_candles(PAIR, 1) == 720
    assert store.load_candles(PAIR, 1, 1)[0] == candles[999]  # newest closed; the forming one is not stored
    assert pipeline.available(1) == 720
    assert pipeline.take_new(1) == 720 and pipeline.take_new(1) == 0
    assert len(pipeline.window(1)) == 300 and pipeline.window(1)[-1] == candles[999]
    assert pipeline.newest(1, 2) == candles[998:1000]
    assert pipeline.price() == candles[1000].open  # replay's forming candle reveals only its open


def test_sync_cadence_and_incremental_fetch(setup):
    pipeline, clock, _market, store, _candles = setup
    pipeline.sync_due_feeds(clock.now())
    clock.advance(30)
    assert not pipeline.sync_due(1, clock.now())
    clock.advance(150)
    assert pipeline.sync_due(1, clock.now()) and not pipeline.sync_due(15, clock.now())
    assert pipeline.sync_due_feeds(clock.now()) == 3
    assert pipeline.available(1) == 723
    assert store.count_candles(PAIR, 1) == 723


def test_failed_sync_records_the_error_and_changes_nothing(setup):
    pipeline, clock, market, store, _candles = setup
    pipeline.sync(1, clock.now())
    market.failing = True
    clock.advance(300)
    assert pipeline.sync(1, clock.now()) == 0
    health = pipeline.health(clock.now())["1m"]
    assert "EService:Unavailable" in health["last_error"]
    assert health["last_error_at"] == clock.now()
    assert store.count_candles(PAIR, 1) == 720
    assert pipeline.available(1) == 720
    market.failing = False
    clock.advance(60)
    assert pipeline.sync(1, clock.now()) == 6  # the gap is filled from `since`


def test_health_freshness_and_status(setup):
    pipeline, clock, market, _store, _candles = setup
    h = pipeline.health(clock.now())
    assert h["1m"]["status"] == "empty" and h["1m"]["freshness_sec"] is None
    pipeline.sync_due_feeds(clock.now())
    h = pipeline.health(clock.now())
    assert h["1m"]["status"] == "ok"
    assert h["1m"]["freshness_sec"] == 0.0  # the newest candle closed just now
    assert h["1m"]["freshness_limit_sec"] == 180.0
    assert h["15m"]["freshness_limit_sec"] == 2700.0
    assert h["1m"]["rows_available"] == 720 and h["1m"]["coverage_pct"] == 18.0
    market.failing = True
    clock.advance(181)
    pipeline.sync_due_feeds(clock.now())
    assert pipeline.health(clock.now())["1m"]["status"] == "stale"


def test_invalid_candles_are_rejected_not_stored(tmp_path):
    good = Candle(60_000, 1.0, 1.1, 0.9, 1.0, 10.0)
    bad = Candle(60_060, 1.0, 0.5, 0.9, 1.0, 10.0)  # high below open

    class Market:
        def fetch_ohlc(self, interval_min, since=None):
            return OhlcPage([good, bad], None, 60_060)

    store = SQLiteStore(tmp_path / "x.sqlite3")
    pipeline = CandlePipeline(store, Market(), PAIR, [FeedSpec(1, 60, 4000, 300)], retention_days=14)
    assert pipeline.sync(1, 61_000) == 1
    assert store.load_candles(PAIR, 1, 10) == [good]
    assert pipeline.health(61_000)["1m"]["rejected_rows"] == 1


def test_prime_reads_counts_and_window_from_the_store(setup, tmp_path):
    pipeline, clock, market, store, candles = setup
    store.upsert_candles(PAIR, 1, candles[:500])
    pipeline.prime()
    assert pipeline.available(1) == 500
    assert pipeline.window(1) == candles[200:500]
    assert pipeline.take_new(1) == 300
    assert pipeline.sync(1, clock.now()) == 500  # from candles[500] on
    assert market.calls == 1


def test_loader_reads_the_store_first_and_merges_the_market_window(setup):
    pipeline, _clock, market, store, candles = setup
    store.upsert_candles(PAIR, 1, candles[:100])
    rows = pipeline.load_recent_ohlcv_rows(1, 4000)
    # 100 stored + the market's 720-candle window (candles[280:1000]), de-duplicated, oldest first.
    assert rows == candles[:100] + candles[280:1000]
    assert market.calls == 1
    store.upsert_candles(PAIR, 1, candles[:1000])
    calls = market.calls
    assert pipeline.load_recent_ohlcv_rows(1, 800) == candles[200:1000]
    assert market.calls == calls  # enough in the store: the market is not asked
    market.failing = True
    assert pipeline.load_recent_ohlcv_rows(1, 4000) == candles[:1000]  # fallback failed: the store's rows


def test_pruning_keeps_the_training_target_beyond_retention(tmp_path):
    store = SQLiteStore(tmp_path / "r.sqlite3")
    start = 1_767_225_600
    fifteen = [Candle(start + 900 * i, 1.0, 1.0, 1.0, 1.0, 1.0) for i in range(20 * 96)]  # 20 days
    store.upsert_candles(PAIR, 15, fifteen)
    pipeline = CandlePipeline(store, None, PAIR, [FeedSpec(15, 300, 1440, 250)], retention_days=14)
    now = fifteen[-1].time + 900
    pipeline.prune_if_due(now)
    # 14 days are only 1344 candles; the 1440-candle target survives.
    assert store.count_candles(PAIR, 15) == 1440
    assert pipeline.available(15) == 1440
    store.upsert_candles(PAIR, 15, [Candle(now, 1.0, 1.0, 1.0, 1.0, 1.0)])
    assert pipeline.prune_if_due(now + 60) == 0  # at most hourly
    assert pipeline.prune_if_due(now + 3600) == 1
    store.close()
