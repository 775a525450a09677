"""(b) What the regime signal knows on the six real files, and (c) the consensus rules there.

    python research/real_files.py                     # six files, detectors before and after
    python research/real_files.py --pairs DOGE --detectors after

Both models run over each file as the bot runs them in a replay
(:func:`lab.rolling_model`: trained at 500 / 200 candles, again at every
quality tier and daily, on the newest 4000 1m / 1440 15m candles; inferring
every candle from the newest 100 / 50 feature rows; the 15m signal is the one
of the newest closed 15m candle). Scored from minute 4000 on.

(b) per model: raw confidence (median, share >= 0.5); direction calls (the
model's argmax is BULLISH or BEARISH with a non-zero bias) against the sign
of the next 60 minutes' return, with coverage; how much larger the next 60
minutes' absolute move is when the model says directional than when it says
ranging, overall and within quintiles of the trailing 60-minute realised
volatility; and a regression, on non-overlapping hours, of
log |next 60m return| on log trailing 60m volatility and the directional
probability P(bull) + P(bear): its coefficient, t statistic and the R^2 it
adds to trailing volatility alone.

(c) per consensus rule: mechanical tier (``next_tier``, default settings,
training-depth modifiers as the bot applies them) hit rate of tier >= 1
against the sign of the next 60 minutes' return, coverage, and the same for
tier 2. Deterministic; a few minutes for six files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import (
    PAIRS,
    RULES,
    align_secondary,
    baseline_module,
    forward_return,
    real_candles,
    rolling_model,
    tier_run,
    trailing_volatility,
)

from candles import aggregate
from hmm_regime_detector import RegimeDetector
from regime.model_slot import detector_options

HORIZON = 60
SCORE_FROM = 4000


def detector_pairs() -> dict:
    """(1m factory, 15m factory) per detector name."""
    old = baseline_module()
    return {
        "before": (lambda: old.RegimeDetector(recent_candles=100), lambda: old.RegimeDetector(recent_candles=50)),
        "after": (
            lambda: RegimeDetector(recent_candles=100, **detector_options("primary")),
            lambda: RegimeDetector(recent_candles=50, **detector_options("secondary")),
        ),
        # both models tempered by the spread's autocorrelation time (the 15m alternative)
        "after-15m-tempered": (
            lambda: RegimeDetector(recent_candles=100, **detector_options("primary")),
            lambda: RegimeDetector(recent_candles=50, **detector_options("primary")),
        ),
    }


def model_figures(p: np.ndarray, r60: np.ndarray, tv60: np.ndarray, idx: np.ndarray) -> dict:
    """(b) for one model's label-ordered probabilities ``p`` at minutes ``idx``."""
    idx = idx[~np.isnan(p[idx, 0]) & ~np.isnan(r60[idx]) & ~np.isnan(tv60[idx])]
    q = p[idx]
    srt = np.sort(q, axis=1)
    conf = srt[:, 2] - srt[:, 1]
    bias = np.where(conf >= 0.15, q[:, 2] - q[:, 0], 0.0)
    arg = q.argmax(axis=1)
    directional = (arg != 1) & (bias != 0)
    r, tv = r60[idx], tv60[idx]
    moves = r != 0
    call = directional & moves
    hit = float((np.sign(bias[call]) == np.sign(r[call])).mean()) if call.any() else math.nan
    absr = np.abs(r)
    ratio = (
        float(absr[directional].mean() / absr[~directional].mean())
        if directional.any() and (~directional).any()
        else math.nan
    )
    edges = np.quantile(tv, [0.2, 0.4, 0.6, 0.8])
    bucket = np.searchsorted(edges, tv)
    within = []
    for b in range(5):
        m = bucket == b
        d, nd = m & directional, m & ~directional
        if d.sum() >= 30 and nd.sum() >= 30:
            within.append(absr[d].mean() / absr[nd].mean())
    # non-overlapping hours: every 60th minute
    hourly = np.arange(0, len(idx), HORIZON)
    y = np.log(absr[hourly] + 1e-6)
    x0 = np.log(tv[hourly] + 1e-6)
    dmass = q[hourly, 0] + q[hourly, 2]
    reg = _regression(y, x0, dmass)
    return {
        "minutes": len(idx),
        "median_confidence": float(np.median(conf)),
        "share_confidence_ge_0_5": float((conf >= 0.5).mean()),
        "direction_hit_rate": hit,
        "direction_coverage": float(directional.mean()),
        "abs_move_ratio_directional": ratio,
        "abs_move_ratio_within_vol_quintiles": float(np.mean(within)) if within else math.nan,
        "regression": reg,
    }


def _regression(y: np.ndarray, x0: np.ndarray, extra: np.ndarray) -> dict:
    """OLS of y on [1, x0] and on [1, x0, extra]: the coefficient of ``extra``, its t and the R^2 it adds."""
    ok = np.isfinite(y) & np.isfinite(x0) & np.isfinite(extra)
    y, x0, extra = y[ok], x0[ok], extra[ok]
    n = len(y)
    if n < 30 or extra.std() < 1e-9:
        return {"n": n, "coef": math.nan, "t": math.nan, "r2_base": math.nan, "r2_added": math.nan}
    base = np.column_stack([np.ones(n), x0])
    full = np.column_stack([base, extra])

    def fit(a):
        beta, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ beta
        return beta, resid

    _, rb = fit(base)
    beta, rf = fit(full)
    tss = ((y - y.mean()) ** 2).sum()
    sigma2 = (rf @ rf) / (n - full.shape[1])
    cov = sigma2 * np.linalg.inv(full.T @ full)
    return {
        "n": n,
        "coef": float(beta[2]),
        "t": float(beta[2] / math.sqrt(cov[2, 2])),
        "r2_base": float(1 - (rb @ rb) / tss),
        "r2_added": float((rb @ rb - rf @ rf) / tss),
    }


def rule_figures(tiers: np.ndarray, sides: np.ndarray, r60: np.ndarray, idx: np.ndarray) -> dict:
    idx = idx[~np.isnan(r60[idx])]
    t, s, r = tiers[idx], sides[idx], r60[idx]
    out = {}
    for name, on in (("tier1", t >= 1), ("tier2", t == 2)):
        call = on & (r != 0)
        out[f"{name}_hit_rate"] = float((s[call] == np.sign(r[call])).mean()) if call.any() else math.nan
        out[f"{name}_coverage"] = float(on.mean())
    return out


def file_run(pair: str, make1, make15) -> dict:
    ones = real_candles(pair, 1)
    fifteens = aggregate(ones, 15, closed_before=math.inf)
    run1 = rolling_model(ones, make1, target=4000, min_samples=500, interval_sec=60)
    run15 = rolling_model(fifteens, make15, target=1440, min_samples=200, interval_sec=900)
    p15 = align_secondary(ones, fifteens, run15.probs)
    mod15 = np.nan_to_num(align_secondary(ones, fifteens, run15.modifier))
    r60 = forward_return(ones, HORIZON)
    tv60 = trailing_volatility(ones, HORIZON)
    idx = np.arange(SCORE_FROM, len(ones))
    out = {
        "candles": len(ones),
        "fits_1m": len(run1.fits),
        "rejected_1m": sum(1 for f in run1.fits if not f[3]),
        "fits_15m": len(run15.fits),
        "rejected_15m": sum(1 for f in run15.fits if not f[3]),
        "model_1m": model_figures(run1.probs, r60, tv60, idx),
        "model_15m": model_figures(p15, r60, tv60, idx),
        "rules": {},
    }
    times = np.array([c.time + 60 for c in ones], dtype=float)
    for name, rule in RULES.items():
        tiers, sides = tier_run(run1.probs, p15, run1.modifier, mod15, rule, times)
        out["rules"][name] = rule_figures(tiers, sides, r60, idx)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--detectors", default="before,after")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    pairs = detector_pairs()
    results: dict = {}
    for det in args.detectors.split(","):
        make1, make15 = pairs[det]
        results[det] = {}
        print(f"\n=== detectors '{det}' ===")
        for pair in args.pairs.split(","):
            r = file_run(pair, make1, make15)
            results[det][pair] = r
            print(
                f"{pair}: fits 1m {r['fits_1m']} ({r['rejected_1m']} rejected), "
                f"15m {r['fits_15m']} ({r['rejected_15m']} rejected)"
            )
            for m in ("model_1m", "model_15m"):
                f = r[m]
                g = f["regression"]
                print(
                    f"  {m[6:]:>3}: conf median {f['median_confidence']:.3f}, "
                    f">=0.5 {f['share_confidence_ge_0_5']:.2f}; "
                    f"direction hit {f['direction_hit_rate']:.3f} at coverage {f['direction_coverage']:.2f}; "
                    f"|move| directional/ranging {f['abs_move_ratio_directional']:.2f}, within vol quintiles "
                    f"{f['abs_move_ratio_within_vol_quintiles']:.2f}; regression on P(bull)+P(bear) coef "
                    f"{g['coef']:+.3f} t {g['t']:+.2f}, R^2 {g['r2_base']:.3f} + {g['r2_added']:.4f}"
                )
            for name, f in r["rules"].items():
                print(
                    f"  rule {name:8}: tier>=1 hit {f['tier1_hit_rate']:.3f} coverage {f['tier1_coverage']:.3f}; "
                    f"tier 2 hit {f['tier2_hit_rate']:.3f} coverage {f['tier2_coverage']:.3f}",
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
