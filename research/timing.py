"""Fit and inference time of today's detector and the new one, interleaved in one process.

    python research/timing.py

Fit: the benchmark's windows (five 4000-candle DOGE windows, three simulator
seeds), n_init 4. Inference: one ``infer_rows`` call on a 100-row (1m) and a
50-row (15m) window, as ``ModelSlot.evaluate`` makes every cycle. One BLAS
thread, as the bot runs. Medians over repeats; the machine is shared, so
before and after are interleaved.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import baseline_module, feature_rows, real_candles, sim_series

from hmm_regime_detector import RegimeDetector
from regime.model_slot import detector_options


def main() -> None:
    old = baseline_module()
    doge = real_candles("DOGE", 1)
    windows = [doge[k * 9000 : k * 9000 + 4000] for k in range(5)] + [sim_series(s, 1)[0][:4000] for s in (1, 2, 3)]
    makers = {
        "before": lambda w: old.RegimeDetector(recent_candles=w),
        "after": lambda w: RegimeDetector(recent_candles=w, **detector_options("primary" if w == 100 else "secondary")),
    }
    fits: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(2):
        for candles in windows:
            for name, make in makers.items():
                t = time.perf_counter()
                make(100).fit(candles)
                fits[name].append(time.perf_counter() - t)
    print("fit on 4000 1m candles (n_init 4): median / max over 16 fits")
    for name, v in fits.items():
        print(f"  {name:7} {statistics.median(v):.3f} s / {max(v):.3f} s")

    rows, _ = feature_rows(doge[:6000])
    print("one inference call (infer_rows on the newest window), median over 3000 calls")
    for window in (100, 50):
        models = {name: make(window).fit(doge[:4000]) for name, make in makers.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(3000):
            x = rows[4000 + i % 1500 - window : 4000 + i % 1500]
            for name, m in models.items():
                t = time.perf_counter()
                m.infer_rows(x)
                times[name].append(time.perf_counter() - t)
        for name, v in times.items():
            med, p99 = statistics.median(v) * 1e3, np.percentile(v, 99) * 1e3
            print(f"  {window}-row window, {name:7} {med:.3f} ms (p99 {p99:.3f} ms)")


if __name__ == "__main__":
    import logging

    from threadpoolctl import threadpool_limits

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    threadpool_limits(1)
    main()
