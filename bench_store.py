"""Store benchmarks: the Supabase store through the local PostgREST-protocol server.

    python bench_store.py

Prints the median (and worst) time of a 4000-candle load (newest first, paged
past the 1000-row cap, returned oldest first) through the real ``supabase``
client over loopback HTTP, and the time to upsert one new closed candle (the
per-minute sync). Issue 5's target for the load is under 1 s.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from candles import Candle
from supabase_store import SupabaseStore

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
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


def main() -> int:
    figures = bench_supabase_load()
    print(
        f"supabase store, 4000-candle load via the local PostgREST server: median "
        f"{figures['load_4000_median_sec'] * 1000:.0f} ms, worst {figures['load_4000_max_sec'] * 1000:.0f} ms "
        f"(target < 1000 ms)"
    )
    print(f"supabase store, upsert of one new candle: median {figures['upsert_one_median_sec'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
