"""Per-minute regime signals of a replay, cached for the grid laboratory.

    python research/signal_cache.py                 # the six shared files
    python research/signal_cache.py FILE.csv ...

Runs the bot's own replay loop (store, pipeline, both models, consensus, tier
gating) over each file and saves, per cycle, what the regime layer knew then:
the price, both models' probabilities, the policy signal, the training-depth
modifier and quality tier, and the mechanical tier. The grid laboratory then
tries grid responses on these signals without re-running the models. Files go to
``research/.cache/<file stem>.npz`` (not committed); a cache is rebuilt when the
code that makes it changes (``--force``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot import build_bot  # noqa: E402
from candles import read_candles_csv  # noqa: E402
from clock import SimClock  # noqa: E402
from config import load_settings  # noqa: E402
from market.replay import ReplayMarket  # noqa: E402
from store.sqlite import SQLiteStore  # noqa: E402
from vocabulary import REGIMES  # noqa: E402

CACHE = ROOT / "research" / ".cache"
DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
SIX = [DATA / f"{p}USDT_1m.csv" for p in ("DOGE", "ADA", "XRP", "LTC", "LINK", "MATIC")]
DIRECTIONS = {"symmetric": 0, "long_bias": 1, "short_bias": -1}
QUALITY = {None: -1, "shallow": 0, "baseline": 1, "deep": 2, "full": 3}


def cache_path(path: str | Path) -> Path:
    return CACHE / (Path(path).name.removesuffix(".csv") + ".npz")


def build(path: str, overrides: dict | None = None) -> str:
    import logging

    logging.disable(logging.WARNING)
    s = load_settings({"LOG_LEVEL": "WARNING", **(overrides or {})}, environ={}, env_file=None)
    candles = read_candles_csv(path)
    clock = SimClock(candles[0].time + 60, math.inf, threading.Event())
    market = ReplayMarket(clock, candles)
    bot = build_bot(s, mode="replay", clock=clock, market=market, store=SQLiteStore(":memory:"), autosave=False)
    bot.start()
    rows: dict[str, list] = {k: [] for k in ("t", "price", "p1", "p15", "conf", "bias", "regime", "modifier",
                                             "quality", "tier", "direction", "conf1", "conf15")}  # fmt: skip
    nan3 = (math.nan, math.nan, math.nan)
    while True:  # as the bot's Runner: a cycle, then stop once the file is done (one cycle per candle)
        bot.tick()
        price = bot.pipeline.price()
        mech = bot.mechanical_state()
        prim, sec = bot.primary, bot.secondary
        depth = prim.depth(bot.pipeline.available(1), clock.now())
        rows["t"].append(clock.now())
        rows["price"].append(price if price is not None else math.nan)
        rows["p1"].append(prim.signal.probabilities or nan3 if prim.trained else nan3)
        rows["p15"].append(sec.signal.probabilities or nan3 if sec and sec.trained else nan3)
        rows["conf1"].append(prim.signal.confidence if prim.trained else math.nan)
        rows["conf15"].append(sec.signal.confidence if sec and sec.trained else math.nan)
        rows["conf"].append(bot.policy.confidence)
        rows["bias"].append(bot.policy.bias_signal)
        rows["regime"].append(REGIMES.index(bot.policy.regime))
        rows["modifier"].append(bot.confidence_modifier())
        rows["quality"].append(QUALITY[depth.quality_tier])
        rows["tier"].append(mech.tier)
        rows["direction"].append(DIRECTIONS[mech.direction])
        if market.finished:
            break
        clock.advance(60)
    CACHE.mkdir(parents=True, exist_ok=True)
    out = cache_path(path)
    np.savez_compressed(out, **{k: np.asarray(v, dtype=float) for k, v in rows.items()})
    return str(out)


def load(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(cache_path(path)) as z:
        return {k: z[k] for k in z.files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=[str(p) for p in SIX])
    ap.add_argument("--force", action="store_true", help="rebuild caches that exist")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    todo = [f for f in args.files if args.force or not cache_path(f).exists()]
    with ProcessPoolExecutor(args.jobs) as pool:
        for out in pool.map(build, todo):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
