"""Store benchmarks: the Supabase store through the local PostgREST-protocol server.

    python -m tools.bench_store

Prints the median (and worst) time of a 4000-candle load (newest first, paged
past the 1000-row cap, returned oldest first) through the real ``supabase``
client over loopback HTTP, and the time to upsert one new closed candle (the
per-minute sync). Issue 5's target for the load is under 1 s.

Then the main loop's side: a paper bot on Kraken's protocol (the local fake)
and a simulated clock, four cycles a minute with one new candle a minute,
on the plain SQLite store and on Supabase behind its mirror (healthy, and
with the server gone). Issue 5's target: the mirrored store adds no
measurable time to a cycle.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from bot import build_bot
from candles import Candle
from clock import SimClock
from config import load_settings
from kraken.public_client import KrakenPublicClient
from market.sim import generate
from store.interface import Store
from store.mirrored import LocalMirror, MirroredStore
from store.sqlite import SQLiteStore
from store.supabase import SupabaseStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_kraken import FakeKraken
from fake_postgrest import FakePostgrest

PAIR = "XDGUSD"
START = 1_767_225_600
TARGET = 4000


def _candles(n: int, start: int = START) -> list[Candle]:
    return [Candle(start + 60 * i, 0.1, 0.101, 0.099, 0.1 + 1e-5 * (i % 7), 1000.0 + i, i % 40) for i in range(n)]


def bench_supabase_load(repeat: int = 10) -> dict[str, float]:
    """Seconds for one 4000-candle load and one single-candle upsert, through the local server."""
    with FakePostgrest() as fake:
        store = SupabaseStore(fake.url, fake.key)
        try:
            history = _candles(TARGET + 1000)
            store.upsert_candles(PAIR, 1, history)
            loads = []
            for _ in range(repeat):
                t = time.perf_counter()
                rows = store.load_candles(PAIR, 1, TARGET)
                loads.append(time.perf_counter() - t)
                if rows != history[-TARGET:]:
                    raise AssertionError("the load did not return the newest 4000 candles")
            syncs = []
            for i in range(repeat):
                t = time.perf_counter()
                store.upsert_candles(PAIR, 1, _candles(1, START + 60 * (TARGET + 1000 + i)))
                syncs.append(time.perf_counter() - t)
        finally:
            store.close()
    return {
        "load_4000_median_sec": statistics.median(loads),
        "load_4000_max_sec": max(loads),
        "upsert_one_median_sec": statistics.median(syncs),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cycle_times(make_store, minutes: int = 60) -> dict[str, float]:
    """Cycle times (ms) of a paper bot over ``minutes`` simulated minutes, 4 cycles a minute.

    The clock is simulated, but after each cycle that synced the wall clock gets
    the pause a real loop has (its 15 s cut to 0.4 s), in which the Supabase
    writer sends; back-to-back cycles would instead measure the writer and the
    loop fighting over one core, which a paced loop never does.
    """
    start = START + 2000 * 60
    history, _ = generate(2000 + minutes + 5, seed=11, start=START)
    clock = SimClock(start)
    settings = load_settings(
        {"HMM_SECONDARY_ENABLED": False, "TRADES_BACKFILL_ENABLED": False, "HMM_OHLCV_SYNC_INTERVAL_SEC": 60},
        environ={},
        env_file=None,
    )
    with FakeKraken(history, now=clock.now) as kraken:
        store = _Timed(make_store(clock))
        market = KrakenPublicClient(kraken.url, PAIR, now=clock.now, sleep=clock.sleep, timeout=5.0, max_retries=0)
        bot = build_bot(settings, mode="paper", clock=clock, market=market, store=store, truth=None, panel=None)
        bot.start()
        bot.tick()  # the first cycle syncs the whole window and trains
        clock.advance(15)
        sync, other, in_store = [], [], []
        for _ in range(minutes * 4):
            store.spent = 0.0
            t = time.perf_counter()
            bot.tick()
            synced = bot.pipeline.state[1].last_sync_at == clock.now()
            (sync if synced else other).append((time.perf_counter() - t) * 1000)
            in_store.append(store.spent * 1000)
            if synced:
                time.sleep(0.4)
            clock.advance(15)
        bot.shutdown()
        store.close()
    return {
        "sync_p50": statistics.median(sync),
        "sync_p99": _percentile(sync, 0.99),
        "other_p50": statistics.median(other),
        "store_per_minute": sum(in_store) / minutes,
        "store_p99": _percentile(in_store, 0.99),
        "store_max": max(in_store),
    }


class _Timed:
    """A store that adds up the time the loop spends in it (``spent``, seconds)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.spent = 0.0

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - started

        return timed


def bench_loop(tmp: Path) -> dict[str, dict[str, float]]:
    """Cycle times on SQLite, on Supabase behind its mirror, and on the mirror with Supabase down."""
    out = {"sqlite": _cycle_times(lambda clock: SQLiteStore(tmp / "plain.sqlite3"))}
    with FakePostgrest() as fake:

        def mirrored(name: str):
            def make(clock) -> MirroredStore:
                store = MirroredStore(
                    LocalMirror(tmp / f"{name}.sqlite3"),
                    SupabaseStore(fake.url, fake.key),
                    SupabaseStore(fake.url, fake.key),
                    now=clock.now,
                    retry_max_sec=1.0,
                )
                store.start()
                return store

            return make

        out["supabase"] = _cycle_times(mirrored("mirror"))
        rows, local = len(fake.rows("ohlcv_candles")), SQLiteStore(tmp / "mirror.sqlite3")
        if rows != local.count_candles(PAIR, 1) or local.count_candles(PAIR, 1) < 719 + 50:
            raise AssertionError(f"the writer did not send every candle ({rows} rows in Supabase)")
        local.close()
        fake.stop()
        out["supabase down"] = _cycle_times(mirrored("mirror-down"))
    return out


def bench_write(tmp: Path, n: int = 2000) -> dict[str, float]:
    """Median and p99 microseconds of one single-candle upsert as the loop sees it."""
    out = {}
    with FakePostgrest() as fake:
        stores = {
            "sqlite": SQLiteStore(tmp / "w-plain.sqlite3"),
            "supabase (mirrored)": MirroredStore(
                LocalMirror(tmp / "w-mirror.sqlite3"),
                SupabaseStore(fake.url, fake.key),
                SupabaseStore(fake.url, fake.key),
                now=time.time,
            ),
        }
        stores["supabase (mirrored)"].start()
        for name, store in stores.items():
            times = []
            for i in range(n):
                time.sleep(0.001)  # writes come one at a time, as the loop makes them
                t = time.perf_counter()
                store.upsert_candles(PAIR, 1, _candles(1, START + 60 * i))
                times.append((time.perf_counter() - t) * 1e6)
            out[f"{name} p50"] = statistics.median(times)
            out[f"{name} p99"] = _percentile(times, 0.99)
            store.close()
    return out


def main() -> int:
    import tempfile

    figures = bench_supabase_load()
    print(
        f"supabase store, 4000-candle load via the local PostgREST server: median "
        f"{figures['load_4000_median_sec'] * 1000:.0f} ms, worst {figures['load_4000_max_sec'] * 1000:.0f} ms "
        f"(target < 1000 ms)"
    )
    print(f"supabase store, upsert of one new candle: median {figures['upsert_one_median_sec'] * 1000:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        for name, us in bench_write(Path(tmp)).items():
            print(f"one-candle write as the loop sees it, {name}: {us:.0f} µs")
        for name, ms in bench_loop(Path(tmp)).items():
            print(
                f"paper bot cycle, store {name}: with the 1m sync p50 {ms['sync_p50']:.2f} ms, "
                f"p99 {ms['sync_p99']:.2f} ms; other cycles p50 {ms['other_p50']:.2f} ms; in store calls "
                f"{ms['store_per_minute']:.3f} ms per simulated minute, p99 {ms['store_p99']:.3f} ms "
                f"and max {ms['store_max']:.3f} ms per cycle"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
