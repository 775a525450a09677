"""(d) tier2_share_while_shallow on the six real files, as the bot runs a replay.

    python research/tier2_shallow.py                    # detectors before and after
    python research/tier2_shallow.py --detectors after --rules primary
    python research/tier2_shallow.py --check-bot DOGE      # the replica against the bot

A replay starts with an empty store. Both models are trained and infer on the
bot's schedule (:func:`lab.rolling_model`: the primary at 500 1m candles,
``shallow`` with the 4000 target, replaced at 1000 (``baseline``) if that
fit succeeds; failed fits retried with the slot's back-off; the secondary
from 200 15m candles, i.e. minute 3000). Each minute the consensus rule and
``next_tier`` (default settings, training-depth modifiers as the bot applies
them, capacity ``normal``) give the mechanical tier. Reported: the minutes a
primary trained at ``shallow`` depth is in use, and the share of them at
tier 2. The first 8000 minutes of each file are run. Deterministic.

``--check-bot PAIR`` runs the real ``Bot`` (replay market, in-memory store,
one cycle per candle, as ``python bot.py --replay``) over the file's first
6000 minutes (shallow, baseline and deep 1m models; the 15m from minute
3000) and compares its mechanical tier, minute by minute, with this
replica's (same detector, the configured rule).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import PAIRS, RULES, align_secondary, real_candles, rolling_model, tier_run
from real_files import detector_pairs

from candles import aggregate

MINUTES = 8000


def shallow_figures(pair: str, make1, make15, rules: list[str]) -> dict:
    ones = real_candles(pair, 1)[:MINUTES]
    fifteens = aggregate(ones, 15, closed_before=math.inf)
    run1 = rolling_model(ones, make1, target=4000, min_samples=500, interval_sec=60)
    run15 = rolling_model(fifteens, make15, target=1440, min_samples=200, interval_sec=900)
    p15 = align_secondary(ones, fifteens, run15.probs)
    mod15 = np.nan_to_num(align_secondary(ones, fifteens, run15.modifier))
    times = np.array([c.time + 60 for c in ones], dtype=float)
    shallow = np.array([t == "shallow" for t in run1.tier])
    srt = np.sort(run1.probs[shallow], axis=1)
    out = {
        "shallow_minutes": int(shallow.sum()),
        "median_raw_confidence": float(np.median(srt[:, 2] - srt[:, 1])) if shallow.any() else math.nan,
        "primary_fits": [(i, n, tier, ok) for i, n, tier, ok, _ in run1.fits],
    }
    for name in rules:
        tiers, _ = tier_run(run1.probs, p15, run1.modifier, mod15, RULES[name], times)
        out[name] = float((tiers[shallow] == 2).mean()) if shallow.any() else 0.0
    return out


def check_against_bot(pair: str, minutes: int = 6000) -> None:
    """The real bot's mechanical tier per minute against the replica's, over the first ``minutes``."""
    from bot import build_bot
    from clock import SimClock
    from config import load_settings
    from market.replay import ReplayMarket
    from store.sqlite import SQLiteStore

    ones = real_candles(pair, 1)[:minutes]
    settings = load_settings({"LOG_LEVEL": "WARNING"}, environ={}, env_file=None)
    clock = SimClock(ones[0].time + 60)
    market = ReplayMarket(clock, ones)
    bot = build_bot(settings, mode="replay", clock=clock, market=market, store=SQLiteStore(":memory:"), truth=None)
    bot.start()
    bot_tiers, quality = [], []
    while not market.finished:
        bot.tick()
        bot_tiers.append(bot.mechanical_state().tier)
        quality.append(bot.primary.depth(0, clock.now()).quality_tier if bot.primary.trained else None)
        clock.advance(60)
    bot.store.close()
    make1, make15 = detector_pairs()["after"]
    fifteens = aggregate(ones, 15, closed_before=math.inf)
    run1 = rolling_model(ones, make1, target=4000, min_samples=500, interval_sec=60)
    run15 = rolling_model(fifteens, make15, target=1440, min_samples=200, interval_sec=900)
    p15 = align_secondary(ones, fifteens, run15.probs)
    mod15 = np.nan_to_num(align_secondary(ones, fifteens, run15.modifier))
    times = np.array([c.time + 60 for c in ones], dtype=float)
    rule = RULES[settings.CONSENSUS_RULE]
    tiers, _ = tier_run(run1.probs, p15, run1.modifier, mod15, rule, times)
    n = min(len(bot_tiers), len(tiers))
    same = np.mean(np.array(bot_tiers[:n]) == tiers[:n])
    shallow = np.array([q == "shallow" for q in quality[:n]])
    print(
        f"{pair}: {n} minutes; mechanical tier equal in {same:.1%} of them; shallow minutes bot {shallow.sum()} "
        f"vs replica {sum(t == 'shallow' for t in run1.tier[:n])}; tier 2 while shallow bot "
        f"{np.mean(np.array(bot_tiers[:n])[shallow] == 2) if shallow.any() else 0.0:.3f}; minutes at tier 0/1/2: "
        f"bot {np.bincount(bot_tiers[:n], minlength=3).tolist()}, "
        f"replica {np.bincount(tiers[:n], minlength=3).tolist()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--detectors", default="before,after")
    ap.add_argument("--rules", default="table,primary")
    ap.add_argument("--check-bot", metavar="PAIR", help="compare the replica with the real bot on PAIR's file")
    args = ap.parse_args(argv)
    if args.check_bot:
        check_against_bot(args.check_bot)
        return 0
    rules = args.rules.split(",")
    pairs = detector_pairs()
    print(
        f"{'file':6} {'detectors':10} {'shallow min':>11} {'med conf':>8} "
        + " ".join(f"{'t2 ' + r:>12}" for r in rules)
        + "  primary fits"
    )
    for pair in args.pairs.split(","):
        for det in args.detectors.split(","):
            r = shallow_figures(pair, *pairs[det], rules)
            fits = ", ".join(f"{i}:{tier}{'' if ok else ' rejected'}" for i, _, tier, ok in r["primary_fits"][:6])
            print(
                f"{pair:6} {det:10} {r['shallow_minutes']:>11} {r['median_raw_confidence']:>8.3f} "
                + " ".join(f"{r[x]:>12.3f}" for x in rules)
                + f"  {fits}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    import logging

    from threadpoolctl import threadpool_limits

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    threadpool_limits(1)
    sys.exit(main())
