"""Label check: how separated fitted states are on the EMA spread, simulator vs real files.

    python research/label_check.py

For every fit the bot would make (the simulator: seeds 1-10 at 500, 1000,
2500 and 4000 candles; the real files: the newest 4000 1m / 1440 15m
candles once a day), the :func:`spread_separation` of the best-likelihood
fit, with the check switched off. Prints its quantiles and how many fits a
margin would reject. Deterministic; a couple of minutes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import PAIRS, real_candles, sim_series

from candles import aggregate
from hmm_regime_detector import RegimeDetector
from regime.model_slot import detector_options

MARGINS = (0.0, 0.05, 0.1, 0.15, 0.25)


def separation(candles, role: str, window: int) -> float:
    det = RegimeDetector(recent_candles=window, min_separation=-math.inf, calibrate=False, **detector_options(role))
    return det.fit(candles).separation_


def report(name: str, seps: list[float]) -> None:
    a = np.array(seps)
    q = np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95])
    rejected = "  ".join(f"<{m}: {np.mean(a < m):.2f}" for m in MARGINS[1:])
    print(f"  {name:28} n={len(a):>3}  quantiles 5/25/50/75/95% {np.round(q, 2)}  share rejected {rejected}")


def main() -> None:
    print("spread separation of fitted states (gap between adjacent spread means / pooled within-state sd)")
    for size in (500, 1000, 2500, 4000):
        report(
            f"simulator 1m, {size} candles",
            [separation(sim_series(s, 1)[0][:size], "primary", 100) for s in range(1, 11)],
        )
    report(
        "simulator 15m, 1440 candles", [separation(sim_series(s, 15)[0][:1440], "secondary", 50) for s in range(1, 11)]
    )
    for pair in PAIRS:
        ones = real_candles(pair, 1)
        fifteens = aggregate(ones, 15, closed_before=math.inf)
        report(
            f"{pair} 1m, 4000 daily",
            [separation(ones[i - 4000 : i], "primary", 100) for i in range(4000, len(ones), 1440)],
        )
        report(f"{pair} 1m, 500 (first fit)", [separation(ones[:500], "primary", 100)])
        report(
            f"{pair} 15m, 1440 daily",
            [separation(fifteens[i - 1440 : i], "secondary", 50) for i in range(1440, len(fifteens), 96)],
        )


if __name__ == "__main__":
    import logging

    from threadpoolctl import threadpool_limits

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    threadpool_limits(1)
    main()
