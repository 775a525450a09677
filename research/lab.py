"""Shared helpers of the research scripts: data, online scoring, metrics.

Not imported by the bot. Every function is deterministic for a given input.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from candles import Candle, aggregate, read_candles_csv  # noqa: E402
from hmm_regime_detector import compute_features, stationary_distribution  # noqa: E402
from market.sim import generate  # noqa: E402
from vocabulary import REGIMES  # noqa: E402

DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
PAIRS = ("DOGE", "ADA", "XRP", "LTC", "LINK", "MATIC")
LABEL = {r: i for i, r in enumerate(REGIMES)}  # bearish 0, ranging 1, bullish 2


# --- data ---------------------------------------------------------------------------------


@cache
def real_candles(pair: str, interval: int = 1) -> list[Candle]:
    return read_candles_csv(DATA / f"{pair}USDT_{interval}m.csv")


@cache
def sim_series(seed: int, interval: int, n_out: int = 8000, warmup: int = 300) -> tuple[list[Candle], np.ndarray]:
    """Simulator candles of ``interval`` minutes and their true labels (0/1/2).

    ``n_out`` candles of the interval are produced after ``warmup`` extra ones.
    A 15-minute candle's true label is the regime of its last minute: the
    state in force when the candle closes, which is what an online posterior
    at that close estimates and what the bot acts on next.
    """
    n_min = (n_out + warmup) * interval + interval
    ones, labels = generate(n_min, seed=seed)
    lab = np.array([LABEL[x] for x in labels], dtype=np.int8)
    if interval == 1:
        return ones, lab
    width = interval * 60
    agg = aggregate(ones, interval, closed_before=math.inf)
    t0 = ones[0].time
    # Only whole buckets: drop a partial first and last bucket.
    whole = [c for c in agg if c.time >= t0 and c.time + width <= ones[-1].time + 60]
    idx_last = np.array([(c.time + width - 60 - t0) // 60 for c in whole], dtype=int)
    keep = [i for i, c in enumerate(whole) if 0 <= idx_last[i] < len(ones) and whole[i].time >= t0]
    whole = [whole[i] for i in keep]
    return whole, lab[idx_last[keep]]


def sim_majority_labels(seed: int, interval: int, candles: Sequence[Candle]) -> np.ndarray:
    """Majority true regime of each ``interval``-minute candle (for comparison with last-minute labels)."""
    n_min = (len(candles) + 1) * interval + 600
    ones, labels = generate(n_min, seed=seed)
    t0 = ones[0].time
    lab = np.array([LABEL[x] for x in labels], dtype=np.int8)
    out = np.empty(len(candles), dtype=np.int8)
    for k, c in enumerate(candles):
        i = (c.time - t0) // 60
        out[k] = np.bincount(lab[i : i + interval], minlength=3).argmax()
    return out


def feature_rows(candles: Sequence[Candle]) -> tuple[np.ndarray, np.ndarray]:
    """Usable feature rows and, per candle, the index of the newest usable row at or before it (-1: none)."""
    f = compute_features(candles)
    ok = ~np.isnan(f).any(axis=1)
    row_of = np.cumsum(ok) - 1
    return f[ok], row_of


# --- online inference -----------------------------------------------------------------------


def gaussian_loglik(x: np.ndarray, means: np.ndarray, covars: np.ndarray) -> np.ndarray:
    """Log density of rows ``x`` (n, d) under each state, shape (n, k)."""
    n, d = x.shape
    out = np.empty((n, len(means)))
    for k, (m, c) in enumerate(zip(means, covars, strict=True)):
        chol = np.linalg.cholesky(c)
        z = np.linalg.solve(chol, (x - m).T)
        out[:, k] = -0.5 * (z * z).sum(axis=0) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)
    return out


def online_posteriors(
    loglik: np.ndarray, transmat: np.ndarray, ends: np.ndarray, window: int, prior: np.ndarray | None = None
) -> np.ndarray:
    """Filtered posterior of row ``e`` from a forward pass over rows ``e-window+1 .. e``, for each ``e`` in ``ends``.

    Exactly what the bot computes each cycle (the window starts from the
    stationary distribution), vectorised over all windows at once.
    ``loglik`` already carries any tempering.
    """
    prior = stationary_distribution(transmat) if prior is None else prior
    lik = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    alpha = np.tile(prior, (len(ends), 1))
    starts = ends - window + 1
    for k in range(window):
        idx = starts + k
        valid = idx >= 0
        step = (alpha @ transmat) * lik[np.maximum(idx, 0)]
        step /= step.sum(axis=1, keepdims=True)
        alpha = np.where(valid[:, None], step, alpha)
    return alpha


# --- metrics -------------------------------------------------------------------------------


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    recalls = [float((pred[truth == c] == c).mean()) for c in range(3) if (truth == c).any()]
    return float(np.mean(recalls))


def switches(labels: np.ndarray) -> int:
    return int((np.diff(labels) != 0).sum())


def ece(top_p: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top-state probability over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(top_p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - top_p[m].mean())
    return float(total)


def reliability(top_p: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[tuple[float, float, float]]:
    """(share, mean probability, accuracy) per equal-width bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(top_p, edges[1:-1]), 0, bins - 1)
    return [
        (float((which == b).mean()), float(top_p[which == b].mean()), float(correct[which == b].mean()))
        for b in range(bins)
        if (which == b).any()
    ]


def score(probs: np.ndarray, truth: np.ndarray) -> dict:
    """The issue's figures for label-ordered posteriors ``probs`` (n, 3) against ``truth``."""
    pred = probs.argmax(axis=1)
    top = probs.max(axis=1)
    srt = np.sort(probs, axis=1)
    return {
        "balanced_accuracy": balanced_accuracy(truth, pred),
        "switches": switches(pred),
        "true_switches": switches(truth),
        "ece": ece(top, pred == truth),
        "median_confidence": float(np.median(srt[:, 2] - srt[:, 1])),
        "share_top_ge_09": float((top >= 0.9).mean()),
        "acc_top_ge_09": float((pred == truth)[top >= 0.9].mean()) if (top >= 0.9).any() else float("nan"),
    }


# --- the detector before this work, for "before" figures ------------------------------------

BASELINE_COMMIT = "38676ec"  # main when the calibration work started


@cache
def baseline_module():
    """``hmm_regime_detector`` as it was at :data:`BASELINE_COMMIT`, loaded from git (not a copy in the tree)."""
    import subprocess
    import types

    source = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:hmm_regime_detector.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("hmm_regime_detector_baseline")
    module.__file__ = f"{BASELINE_COMMIT}:hmm_regime_detector.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


# --- scoring a detector online, exactly as the bot infers ----------------------------------


def online_probabilities(det, rows: np.ndarray, row_of: np.ndarray, candle_idx: np.ndarray) -> np.ndarray:
    """Label-ordered probabilities at each candle of ``candle_idx``, through ``det.infer_rows``.

    ``rows``/``row_of`` come from :func:`feature_rows` over the whole series:
    features streamed from the first candle, as the bot's FeatureStream keeps
    them; each call sees the newest ``det.recent_candles`` rows, as
    ``ModelSlot.evaluate`` does.
    """
    out = np.empty((len(candle_idx), 3))
    w = det.recent_candles
    for k, i in enumerate(candle_idx):
        r = row_of[i]
        out[k] = det.infer_rows(rows[max(0, r - w + 1) : r + 1]).probabilities
    return out


def parse_seeds(text: str) -> list[int]:
    """``"1-10"``, ``"1,3,5"`` or ``"1-3,7"`` as a list of ints."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


# --- rolling replay of both models, as the bot trains and infers them ---------------------

from dataclasses import dataclass, field  # noqa: E402

from errors import BadData  # noqa: E402
from hmm_regime_detector import temper, window_posteriors  # noqa: E402
from regime.training_depth import quality_tier, retrain_reason  # noqa: E402


def window_probabilities(det, rows: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Label-ordered probabilities at row indices ``ends`` (windows of ``det.recent_candles`` rows).

    The same numbers as ``det.infer_rows`` per window (checked by :func:`check_against_bot`),
    vectorised; works for today's detector and the new one.
    """
    x = det.standardise(rows)
    if hasattr(det, "_loglik"):
        loglik = det._loglik(x)
    else:  # the detector at BASELINE_COMMIT
        z = (x[None, :, :] - det.means_[:, None, :]) @ det._chol_inv_t
        loglik = (-0.5 * np.square(z).sum(axis=2) + det._log_norm[:, None]).T
    post = window_posteriors(loglik, det.transmat_, np.asarray(det._window_prior), ends, det.recent_candles)
    post = temper(post, getattr(det, "posterior_temperature_", 1.0))
    return post[:, det.state_order_]


def check_against_bot(det, rows: np.ndarray, ends: np.ndarray, probs: np.ndarray) -> None:
    """Assert that a few vectorised rows equal what ``infer_rows`` (the bot's call) returns."""
    w = det.recent_candles
    for k in np.linspace(0, len(ends) - 1, 5).astype(int):
        e = ends[k]
        bot = det.infer_rows(rows[max(0, e - w + 1) : e + 1]).probabilities
        assert np.allclose(bot, probs[k], atol=1e-9), (bot, probs[k])


@dataclass
class ModelRun:
    """One model's online probabilities over a series, trained on the bot's schedule."""

    probs: np.ndarray  # (n_candles, 3), NaN where untrained
    modifier: np.ndarray  # (n_candles,) training-depth modifier of the model in use (0: none)
    tier: list  # quality tier name of the model in use per candle (None: none)
    fits: list = field(default_factory=list)  # (candle index, candles, tier, ok, error)


def rolling_model(candles, make, *, target: int, min_samples: int, interval_sec: int) -> ModelRun:
    """Train ``make()`` as ``ModelSlot`` would over ``candles`` and infer every candle.

    At candle ``i`` the bot holds candles ``0..i``; it trains on the newest
    ``target`` of them when :func:`training_depth.retrain_reason` says so (a
    failed fit is retried ``retry_sec`` later), and the model then in use
    infers candle ``i`` from its newest ``recent_candles`` feature rows.
    """
    from hmm_regime_detector import UnseparatedStates
    from regime.model_slot import RETRY_AFTER_FAILURE_SEC, RETRY_AFTER_REJECTION_SEC

    rows, row_of = feature_rows(candles)
    n = len(candles)
    probs = np.full((n, 3), np.nan)
    modifier = np.zeros(n)
    tiers: list = [None] * n
    run = ModelRun(probs, modifier, tiers)
    det, trained_at, trained_n, failed_at, failures = None, None, None, None, 0
    first_wait = RETRY_AFTER_FAILURE_SEC
    spans = []  # (det, first candle, last candle + 1)
    start = 0
    for i in range(n):
        now = (i + 1) * interval_sec
        retry_sec = min(first_wait * 2.0 ** max(0, failures - 1), 86400.0)
        if failed_at is not None and now - failed_at < retry_sec:
            continue
        reason = retrain_reason(
            trained_candles=trained_n, last_trained_at=trained_at, available=i + 1, target=target,
            min_samples=min_samples, now=now, interval_sec=86400,
        )  # fmt: skip
        if reason is None:
            continue
        train = candles[max(0, i + 1 - target) : i + 1]
        tier = quality_tier(len(train), target, min_samples)
        try:
            new = make().fit(train)
        except (BadData, ValueError, np.linalg.LinAlgError) as exc:
            run.fits.append((i, len(train), tier.name, False, str(exc)))
            if failures == 0:
                rejected = isinstance(exc, UnseparatedStates)
                first_wait = RETRY_AFTER_REJECTION_SEC if rejected else RETRY_AFTER_FAILURE_SEC
            failed_at, failures = now, failures + 1
            continue
        run.fits.append((i, len(train), tier.name, True, None))
        if det is not None:
            spans.append((det, start, i, trained_n))
        det, trained_at, trained_n, failed_at, failures, start = new, now, len(train), None, 0, i
    if det is not None:
        spans.append((det, start, n, trained_n))
    for model, a, b, n_train in spans:
        idx = np.arange(a, b)
        idx = idx[row_of[idx] >= 0]
        if not len(idx):
            continue
        p = window_probabilities(model, rows, row_of[idx])
        check_against_bot(model, rows, row_of[idx], p)
        probs[idx] = p
        tier = quality_tier(n_train, target, min_samples)
        modifier[a:b] = tier.confidence_modifier
        for k in range(a, b):
            tiers[k] = tier.name
    return run


def align_secondary(candles_1m, candles_15m, values: np.ndarray) -> np.ndarray:
    """Per 1m candle, the value of the newest 15m candle closed when that minute closes (NaN before)."""
    close_1m = np.array([c.time + 60 for c in candles_1m])
    close_15m = np.array([c.time + 900 for c in candles_15m])
    j = np.searchsorted(close_15m, close_1m, side="right") - 1
    out = np.full((len(candles_1m), *values.shape[1:]), np.nan)
    ok = j >= 0
    out[ok] = values[j[ok]]
    return out


def forward_return(candles, horizon: int) -> np.ndarray:
    """log(close[i + horizon] / close[i]) per candle (NaN at the end)."""
    c = np.log(np.array([x.close for x in candles]))
    out = np.full(len(c), np.nan)
    out[:-horizon] = c[horizon:] - c[:-horizon]
    return out


def trailing_volatility(candles, horizon: int) -> np.ndarray:
    """Realised volatility of the last ``horizon`` 1m log returns (sqrt of the sum of squares; NaN at the start)."""
    c = np.log(np.array([x.close for x in candles]))
    r2 = np.r_[0.0, np.diff(c) ** 2]
    cs = np.cumsum(r2)
    out = np.full(len(c), np.nan)
    out[horizon:] = np.sqrt(cs[horizon:] - cs[:-horizon])
    return out


# --- consensus rules and tier runs (research copies of the candidates) ---------------------

from regime.policy import TierSettings, next_tier, policy_signal  # noqa: E402
from vocabulary import BEARISH, BULLISH, RANGING, PolicySignal, RegimeSignal, TierState  # noqa: E402

DEFAULT_TIERS = TierSettings(
    tier1_confidence=0.20, tier2_confidence=0.50, tier1_bias_floor=0.10, tier2_bias_floor=0.25,
    hysteresis=0.05, min_dwell_sec=300.0,
)  # fmt: skip
CONFIDENCE_THRESHOLD = 0.15


def signal(p: np.ndarray) -> RegimeSignal:
    """The detector's rule (SPEC section 3) on label-ordered probabilities."""
    srt = sorted(p, reverse=True)
    conf = srt[0] - srt[1]
    bias = max(-1.0, min(1.0, p[2] - p[0])) if conf >= CONFIDENCE_THRESHOLD else 0.0
    return RegimeSignal(REGIMES[int(np.argmax(p))], float(conf), float(bias), tuple(float(v) for v in p))


def _directional(source: str, agreement, conf: float, bias: float, tier1: float) -> PolicySignal:
    regime = RANGING if conf < tier1 or bias == 0.0 else (BULLISH if bias > 0 else BEARISH)
    return PolicySignal(source, agreement, regime, conf, bias)


def rule_table(s1, s15):
    return policy_signal(s1, s15, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.20, rule="table")


def rule_primary(s1, s15):
    return policy_signal(s1, s15, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.20, rule="primary")


def rule_swapped(s1, s15):
    """The table with the roles swapped: the 1m sets direction, the 15m timing."""
    if s15 is None:
        return rule_primary(s1, s15)
    p = policy_signal(s15, s1, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.20, rule="table")
    names = {"15m_neutral": "1m_neutral", "1m_cooling": "15m_cooling"}
    return PolicySignal(p.source, names.get(p.agreement, p.agreement), p.regime, p.confidence, p.bias_signal)


def rule_product(s1, s15):
    """Both models as independent evidence: probabilities multiplied and renormalised."""
    if s15 is None or s15.probabilities is None or s1.probabilities is None:
        return rule_primary(s1, s15)
    p = np.asarray(s1.probabilities) * np.asarray(s15.probabilities)
    p = p / p.sum()
    s = signal(p)
    return _directional("consensus", "product", s.confidence, s.bias_signal, 0.20)


RULES = {"table": rule_table, "primary": rule_primary, "swapped": rule_swapped, "product": rule_product}


def tier_run(p1: np.ndarray, p15: np.ndarray, mod1: np.ndarray, mod15: np.ndarray, rule, times: np.ndarray):
    """Mechanical tier (tier, direction sign) per minute under ``rule``, as Bot._update_tier computes it."""
    n = len(p1)
    tiers = np.zeros(n, dtype=np.int8)
    sides = np.zeros(n, dtype=np.int8)
    state = TierState(0, "symmetric", float(times[0]) - 10_000)
    for i in range(n):
        if np.isnan(p1[i, 0]):
            s1 = RegimeSignal(RANGING, 0.0, 0.0, None)
            trained1 = False
        else:
            s1, trained1 = signal(p1[i]), True
        s15 = None if np.isnan(p15[i, 0]) else signal(p15[i])
        pol = rule(s1 if trained1 else RegimeSignal(RANGING, 0.0, 0.0, None), s15)
        modifier = mod1[i] if pol.source == "primary" else min(mod1[i], mod15[i])
        dec = next_tier(
            state, effective_confidence=pol.confidence * modifier, bias_signal=pol.bias_signal, regime=pol.regime,
            capacity_band="normal", settings=DEFAULT_TIERS, now=float(times[i]),
        )  # fmt: skip
        state = dec.state
        tiers[i] = state.tier
        sides[i] = 0 if state.tier == 0 else (1 if state.direction == "long_bias" else -1)
    return tiers, sides
