"""(a) Detector quality on the simulator, per seed and model, for each candidate method.

    python research/detector_calibration.py                       # all variants, seeds 1-10
    python research/detector_calibration.py --variants before,after --seeds 1-3

Train on the first 4000 candles of a seeded simulator series, score the next
4000 online exactly as the bot infers (the newest 100 feature rows for the
1m model, 50 for the 15m one; features streamed from the first candle).
The 15m series aggregates the simulator's 1m candles; a 15m candle's true
regime is the regime of its last minute (the state the posterior at the
candle's close estimates, and the one in force when the bot acts on it).
Figures: balanced accuracy, switches vs true switches, ECE of the top-state
probability (10 equal-width bins), median confidence, fit time, rejected
fits. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import baseline_module, ece, feature_rows, online_probabilities, parse_seeds, score, sim_series

from errors import BadData
from hmm_regime_detector import EMISSION_TEMPERATURE, RegimeDetector
from regime.model_slot import detector_options

WINDOW = {1: 100, 15: 50}


class MapPriorDetector(RegimeDetector):
    """Research only: priors inside EM (MAP-EM) instead of after the fit.

    ``sticky`` adds pseudo-counts to the diagonal of the transition matrix
    (a fraction of the training rows per state, the lead in the issue);
    ``exit_prior`` adds pseudo-transitions to every off-diagonal entry;
    ``prior_rows`` puts a normal-inverse-Wishart prior on each state, centred
    on all rows, worth that many autocorrelation times of rows.
    """

    def __init__(self, *, sticky: float = 0.0, exit_prior: float = 0.0, prior_rows: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.sticky, self.exit_prior, self.prior_rows = sticky, exit_prior, prior_rows

    def get_params(self) -> dict:
        return {
            **super().get_params(),
            "sticky": self.sticky,
            "exit_prior": self.exit_prior,
            "prior_rows": self.prior_rows,
        }

    def _new_model(self, x, k):
        model = super()._new_model(x, k)
        prior = np.ones((3, 3))
        prior += self.sticky * len(x) / 3 * np.eye(3) + self.exit_prior * (1 - np.eye(3))
        model.transmat_prior = prior
        if self.prior_rows > 0:
            w = self.prior_rows * float(self.emission_temperature)
            model.means_prior, model.means_weight = np.zeros(4), w
            model.covars_prior, model.covars_weight = w * np.tile(np.cov(x.T), (3, 1, 1)), w + 4
        return model


def variants() -> dict:
    """Candidate detectors by name: ``factory(recent_candles) -> detector``.

    Names: ``T<x>`` emission temperature (``Ttau`` = 29.8, the EMA spread's
    autocorrelation time), ``+t`` the normal-inverse-Wishart predictive,
    ``+s1`` one Laplace pseudo-transition, ``+cap`` the window-evidence cap
    (temperature times 1 + 3 W / N), ``+boot`` the bootstrap posterior
    temperature. ``after`` is what the bot builds for the model.
    """
    old = baseline_module()
    bare = {"predictive": False, "transition_pseudocount": 0.0, "calibrate": False, "evidence_cap": False}

    def det(**kw):
        return lambda w: RegimeDetector(recent_candles=w, **{**bare, **kw})

    def research(**kw):
        return lambda w: MapPriorDetector(recent_candles=w, **{**bare, **kw})

    return {
        # today's detector (git 38676ec): plain EM, k-means/random starts, untempered
        "before": lambda w: old.RegimeDetector(recent_candles=w),
        # spread-quantile starts and the label check, nothing tempered
        "plain": det(emission_temperature=1.0),
        # tempered emissions at fit and inference
        "T10": det(emission_temperature=10.0),
        "T20": det(emission_temperature=20.0),
        "Ttau": det(),
        # the issue's lead: a sticky transition prior at fit (1 % of the rows per state) with tempering
        "Ttau+sticky": research(sticky=0.01),
        # priors inside EM: exit pseudo-counts, a normal-inverse-Wishart prior on the states
        "Ttau+exit1(EM)": research(exit_prior=1.0),
        "Ttau+niw1(EM)": research(prior_rows=1.0),
        # shared covariance: states can only differ in their means
        "Ttau tied": lambda w: TiedDetector(recent_candles=w, **bare),
        # the parts of the chosen detector, added one at a time
        "Ttau+t": det(predictive=True),
        "Ttau+t+s1": det(predictive=True, transition_pseudocount=1.0),
        "Ttau+t+s1+cap": det(predictive=True, transition_pseudocount=1.0, evidence_cap=True),
        "Ttau+t+s1+cap+boot": det(predictive=True, transition_pseudocount=1.0, evidence_cap=True, calibrate=True),
        # the 15m candidate: no tempering, the rest as the 1m
        "T1+t+s1+cap+boot": det(
            emission_temperature=1.0, predictive=True, transition_pseudocount=1.0, evidence_cap=True, calibrate=True
        ),
        # the bot's detector for this model (model_slot.detector_options)
        "after": lambda w: RegimeDetector(recent_candles=w, **detector_options("primary" if w == 100 else "secondary")),
    }


class TiedDetector(RegimeDetector):
    """Research only: one covariance shared by the three states (hmmlearn's ``tied``)."""

    def _new_model(self, x, k):
        model = super()._new_model(x, k)
        model.covariance_type = "tied"
        model.covars_ = np.cov(x.T) + 1e-3 * np.eye(4)
        return model


def run_seed(make, seed: int, interval: int, train: int = 4000, offset: int = 0) -> dict:
    """Train on candles ``offset .. offset+train`` of the seed's series, score the next ``train`` (at most 4000)."""
    candles, labels = sim_series(seed, interval)
    rows, row_of = feature_rows(candles)
    det = make(WINDOW[interval])
    started = time.perf_counter()
    try:
        det.fit(candles[offset : offset + train])
    except BadData as exc:
        return {"seed": seed, "rejected": str(exc), "fit_sec": time.perf_counter() - started}
    fit_sec = time.perf_counter() - started
    test = np.arange(offset + train, offset + train + min(train, 4000))
    probs = online_probabilities(det, rows, row_of, test)
    out = {"seed": seed, "rejected": None, "fit_sec": fit_sec, **score(probs, labels[test])}
    out["_top"], out["_correct"] = probs.max(axis=1), probs.argmax(axis=1) == labels[test]
    for name in ("emission_temperature_", "posterior_temperature_", "separation_"):
        if hasattr(det, name):
            out[name.rstrip("_")] = float(getattr(det, name))
    return out


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["rejected"]]
    if not ok:
        return {"rejected": len(rows)}
    sw, tsw = sum(r["switches"] for r in ok), sum(r["true_switches"] for r in ok)
    return {
        "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in ok])),
        "min_balanced_accuracy": float(min(r["balanced_accuracy"] for r in ok)),
        "switch_ratio": sw / tsw,
        "max_switch_ratio": float(max(r["switches"] / max(r["true_switches"], 1) for r in ok)),
        "pooled_ece": ece(np.concatenate([r["_top"] for r in ok]), np.concatenate([r["_correct"] for r in ok])),
        "ece": float(np.mean([r["ece"] for r in ok])),
        "max_ece": float(max(r["ece"] for r in ok)),
        "median_confidence": float(np.mean([r["median_confidence"] for r in ok])),
        "fit_sec": float(np.mean([r["fit_sec"] for r in ok])),
        "rejected": len(rows) - len(ok),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(variants()))
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--models", default="1,15", help="intervals in minutes: 1, 15 or both")
    ap.add_argument("--per-seed", action="store_true", help="print every seed's row")
    ap.add_argument(
        "--train", type=int, default=4000, help="training candles; the next as many (at most 4000) are scored"
    )
    ap.add_argument(
        "--offsets", type=int, default=1, help="fits per seed, at successive offsets (short --train: more samples)"
    )
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    table = variants()
    results: dict = {"emission_temperature_default": EMISSION_TEMPERATURE, "seeds": seeds, "models": {}}
    for interval in (int(m) for m in args.models.split(",")):
        print(
            f"\n{interval}m model: train {args.train}, score the next {min(args.train, 4000)} online "
            f"(window {WINDOW[interval]}), seeds {args.seeds}, {args.offsets} fit(s) per seed"
        )
        print(
            f"  {'variant':16} {'bal.acc':>7} {'min':>6} {'sw/true':>7} {'max':>6} {'ECE':>6} {'max':>6} "
            f"{'med conf':>8} {'fit s':>6} {'rej':>4} {'pooled ECE':>10}"
        )
        per_model = results["models"].setdefault(f"{interval}m", {})
        for name in args.variants.split(","):
            rows = [
                run_seed(table[name], seed, interval, args.train, k * 2 * args.train)
                for seed in seeds
                for k in range(args.offsets)
            ]
            s = summary(rows)
            per_model[name] = {"per_seed": [{k: v for k, v in r.items() if k[0] != "_"} for r in rows], "mean": s}
            if args.per_seed:
                for r in rows:
                    if r["rejected"]:
                        print(f"    seed {r['seed']:>2}: rejected ({r['rejected']})")
                    else:
                        extra = "".join(f" {k}={r[k]:.2f}" for k in ("posterior_temperature", "separation") if k in r)
                        print(
                            f"    seed {r['seed']:>2}: bal.acc {r['balanced_accuracy']:.3f} switches "
                            f"{r['switches']}/{r['true_switches']} ECE {r['ece']:.3f}{extra}"
                        )
            if "balanced_accuracy" not in s:
                print(f"  {name:16} every fit rejected")
                continue
            print(
                f"  {name:16} {s['balanced_accuracy']:>7.3f} {s['min_balanced_accuracy']:>6.3f} "
                f"{s['switch_ratio']:>7.2f} {s['max_switch_ratio']:>6.2f} {s['ece']:>6.3f} {s['max_ece']:>6.3f} "
                f"{s['median_confidence']:>8.3f} {s['fit_sec']:>6.3f} {s['rejected']:>4} {s['pooled_ece']:>10.3f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=float) + "\n")
    return 0


if __name__ == "__main__":
    import logging

    from threadpoolctl import threadpool_limits

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)  # MAP-EM's likelihood need not rise every step

    threadpool_limits(1)
    sys.exit(main())
