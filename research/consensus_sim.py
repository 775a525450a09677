"""(c) Consensus rules on the simulator: direction precision of tier >= 1 and false alarms.

    python research/consensus_sim.py                  # seeds 1-10, detectors before and after
    python research/consensus_sim.py --seeds 1-3 --detectors after
    python research/consensus_sim.py --cold-start      # from an empty store instead

Per seed, both models trained at full depth as the bot trains them (the 1m on
the newest 4000 1m candles, the 15m on 1440 15m candles, both ending at the
same minute), then the next 8000 minutes run through each consensus rule and
the bot's tier gating (``next_tier``, default settings, modifier 1). Scored
against the simulator's truth: precision = share of tier >= 1 minutes whose
direction is the true regime's (long in BULLISH, short in BEARISH); false
alarms = share of truly RANGING minutes at tier >= 1; coverage = share of
minutes at tier >= 1 (and the same for tier 2). Deterministic.

``--cold-start``: instead, both models train on the bot's schedule from an
empty store (the 1m at 500 candles, then at each quality tier and daily; the
15m from 200 candles, minute 3000), and the first three days after the
first fit are scored: shallow, baseline and deep models, as a new bot lives
them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import LABEL, RULES, align_secondary, feature_rows, parse_seeds, rolling_model, tier_run, window_probabilities
from real_files import detector_pairs

from candles import aggregate
from market.sim import generate

TRAIN_1M, TRAIN_15M, TEST = 4000, 1440, 8000


def seed_run(seed: int, make1, make15) -> dict:
    split = TRAIN_15M * 15  # minute at which both models finish training
    ones, labels = generate(split + TEST + 60, seed=seed)
    truth = np.array([LABEL[x] for x in labels])
    fifteens = aggregate(ones, 15, closed_before=math.inf)
    m1 = make1().fit(ones[split - TRAIN_1M : split])
    m15 = make15().fit(fifteens[:TRAIN_15M])
    rows1, row_of1 = feature_rows(ones)
    test = np.arange(split, split + TEST)
    p1 = window_probabilities(m1, rows1, row_of1[test])
    rows15, row_of15 = feature_rows(fifteens)
    # the newest 15m candle closed when minute i closes
    j = (test + 1) // 15 - 1
    p15 = window_probabilities(m15, rows15, row_of15[j])
    times = np.array([ones[i].time + 60 for i in test], dtype=float)
    ones_mod = np.ones(TEST)
    out = {"seed": seed}
    for name, rule in RULES.items():
        tiers, sides = tier_run(p1, p15, ones_mod, ones_mod, rule, times)
        out[name] = scores(tiers, sides, truth[test])
    return out


def scores(tiers: np.ndarray, sides: np.ndarray, t: np.ndarray) -> dict:
    true_side = np.where(t == 2, 1, np.where(t == 0, -1, 0))
    on, on2 = tiers >= 1, tiers == 2
    return {
        "coverage": float(on.mean()),
        "precision": float((sides[on] == true_side[on]).mean()) if on.any() else math.nan,
        "false_alarms": float(on[t == 1].mean()) if (t == 1).any() else math.nan,
        "tier2_coverage": float(on2.mean()),
        "tier2_precision": float((sides[on2] == true_side[on2]).mean()) if on2.any() else math.nan,
        "recall": float((sides == true_side)[t != 1].mean()) if (t != 1).any() else math.nan,
    }


COLD_DAYS = 3


def cold_start_run(seed: int, make1, make15) -> dict:
    minutes = 500 + COLD_DAYS * 1440
    ones, labels = generate(minutes, seed=seed)
    truth = np.array([LABEL[x] for x in labels])
    fifteens = aggregate(ones, 15, closed_before=math.inf)
    run1 = rolling_model(ones, make1, target=4000, min_samples=500, interval_sec=60)
    run15 = rolling_model(fifteens, make15, target=1440, min_samples=200, interval_sec=900)
    p15 = align_secondary(ones, fifteens, run15.probs)
    mod15 = np.nan_to_num(align_secondary(ones, fifteens, run15.modifier))
    times = np.array([c.time + 60 for c in ones], dtype=float)
    scored = np.arange(500, minutes)
    out = {"seed": seed}
    for name, rule in RULES.items():
        tiers, sides = tier_run(run1.probs, p15, run1.modifier, mod15, rule, times)
        out[name] = scores(tiers[scored], sides[scored], truth[scored])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--detectors", default="before,after")
    ap.add_argument("--cold-start", action="store_true", help="models trained from an empty store, first 3 days")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    pairs = detector_pairs()
    results = {}
    for det in args.detectors.split(","):
        make1, make15 = pairs[det]
        run = cold_start_run if args.cold_start else seed_run
        runs = [run(s, make1, make15) for s in parse_seeds(args.seeds)]
        results[det] = runs
        scenario = f"cold start, first {COLD_DAYS} days" if args.cold_start else "both models at full depth"
        print(f"\ndetectors '{det}', {scenario}, seeds {args.seeds}: mean over seeds (tier >= 1 unless marked)")
        print(
            f"  {'rule':9} {'precision':>9} {'false alarms':>12} {'coverage':>8} {'recall':>7} "
            f"{'t2 precision':>12} {'t2 coverage':>11}"
        )
        for rule in RULES:
            m = {k: float(np.nanmean([r[rule][k] for r in runs])) for k in runs[0][rule]}
            print(
                f"  {rule:9} {m['precision']:>9.3f} {m['false_alarms']:>12.3f} {m['coverage']:>8.3f} "
                f"{m['recall']:>7.3f} "
                f"{m['tier2_precision']:>12.3f} {m['tier2_coverage']:>11.3f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    import logging

    from threadpoolctl import threadpool_limits

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    threadpool_limits(1)
    sys.exit(main())
