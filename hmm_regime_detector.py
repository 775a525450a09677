"""Regime detector: a 3-state Gaussian HMM over four candle features (SPEC section 3).

Features per candle, in column order:

0. MACD(12, 26, 9) histogram slope, in percent of price;
1. EMA spread in percent, (EMA9 - EMA21) / EMA21 * 100;
2. RSI(14) (Wilder) mapped from [0, 100] to [-1, 1];
3. volume ratio to its EMA(20).

The first :data:`WARMUP_ROWS` rows of any sequence are NaN (indicators still
settling) and, like any other row with a NaN, are dropped. So is the row of a
minute without trades (volume 0): it says nothing about the regime, and a run of
them (O=H=L=C at the last price) repeats one row that a state would collapse onto.
The averages still take such a minute in.

Fitting uses ``hmmlearn``; states are labelled BEARISH / RANGING / BULLISH by
their mean EMA spread. Inference only needs the fitted parameters, so a model
restored from the state snapshot infers without refitting. The posterior of
the newest row of a window equals the normalised forward variable, which is
what :meth:`RegimeDetector.infer` computes (from the stationary distribution;
see :meth:`RegimeDetector.state_posterior`).
"""

from __future__ import annotations

import base64
import logging
import math
from collections import deque
from collections.abc import Sequence

import numpy as np
from hmmlearn.base import BaseHMM
from hmmlearn.hmm import GaussianHMM
from scipy.signal import lfilter

from candles import Candle, as_arrays
from errors import BadData
from regime_policy import REGIMES, RegimeSignal

log = logging.getLogger(__name__)

N_STATES = 3
N_FEATURES = 4
FEATURE_NAMES = ("macd_hist_slope_pct", "ema_spread_pct", "rsi_centered", "volume_ratio")
SPREAD_FEATURE = 1
WARMUP_ROWS = 35  # MACD slow EMA (26) + signal EMA (9)
INFERENCE_WARMUP = 200  # extra rows before an inference window so the EMAs settle
Z_CLIP = 6.0  # standardised features are clipped here so one wild candle cannot own a state
SNAPSHOT_VERSION = 1


def _ema(x: np.ndarray, span: float | None = None, *, alpha: float | None = None) -> np.ndarray:
    """Exponential moving average seeded with the first value."""
    a = alpha if alpha is not None else 2.0 / (span + 1.0)
    y, _ = lfilter([a], [1.0, a - 1.0], x, zi=[(1.0 - a) * x[0]])
    return y


def compute_features(candles: Sequence[Candle]) -> np.ndarray:
    """Feature matrix of shape ``(n_candles, 4)``; unusable rows are NaN."""
    n = len(candles)
    out = np.full((n, N_FEATURES), np.nan)
    if n <= WARMUP_ROWS:
        return out
    cols = as_arrays(candles)
    close, volume = cols["close"], cols["volume"]

    macd = _ema(close, 12) - _ema(close, 26)
    hist = macd - _ema(macd, 9)
    slope = np.empty(n)
    slope[0] = np.nan
    slope[1:] = np.diff(hist) / close[1:] * 100.0

    ema_slow = _ema(close, 21)
    spread = (_ema(close, 9) - ema_slow) / ema_slow * 100.0

    change = np.diff(close, prepend=close[0])
    avg_gain = _ema(np.maximum(change, 0.0), alpha=1.0 / 14.0)
    avg_loss = _ema(np.maximum(-change, 0.0), alpha=1.0 / 14.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = avg_gain + avg_loss
        # RSI = 100 * gain / (gain + loss); a flat market reads neutral (50).
        rsi = np.where(total > 0, 100.0 * avg_gain / np.where(total > 0, total, 1.0), 50.0)
        vol_ema = _ema(volume, 20)
        traded = (vol_ema > 0) & (volume > 0)
        vol_ratio = np.where(traded, volume / np.where(traded, vol_ema, 1.0), np.nan)

    out[:, 0] = slope
    out[:, 1] = spread
    out[:, 2] = (rsi - 50.0) / 50.0
    out[:, 3] = vol_ratio
    out[:WARMUP_ROWS] = np.nan
    out[~np.isfinite(out).all(axis=1)] = np.nan
    return out


class _GaussianHMM(GaussianHMM):
    """hmmlearn's ``GaussianHMM`` with a faster E-step statistic for full covariances.

    hmmlearn 0.3.3 accumulates the per-state second moments with a
    three-operand ``einsum``, about a third of a fit's time here; one matrix
    product per state gives the same numbers (tested against the stock class)
    in a fraction of the time. Everything else is hmmlearn's.
    """

    def _accumulate_sufficient_statistics(self, stats, X, lattice, posteriors, fwdlattice, bwdlattice):  # noqa: N803 (hmmlearn passes X by name)
        if self.covariance_type != "full":
            return super()._accumulate_sufficient_statistics(stats, X, lattice, posteriors, fwdlattice, bwdlattice)
        BaseHMM._accumulate_sufficient_statistics(
            self, stats=stats, X=X, lattice=lattice, posteriors=posteriors, fwdlattice=fwdlattice,
            bwdlattice=bwdlattice,
        )  # fmt: skip
        if self._needs_sufficient_statistics_for_mean():
            stats["post"] += posteriors.sum(axis=0)
            stats["obs"] += posteriors.T @ X
        if self._needs_sufficient_statistics_for_covars():
            for k in range(self.n_components):
                stats["obs*obs.T"][k] += (X * posteriors[:, k, None]).T @ X
        return None


def stationary_distribution(transmat: np.ndarray) -> np.ndarray:
    """The distribution ``pi`` with ``pi @ transmat == pi`` (uniform if it is not unique)."""
    values, vectors = np.linalg.eig(np.asarray(transmat, dtype=float).T)
    k = int(np.argmin(np.abs(values - 1.0)))
    pi = np.real(vectors[:, k])
    total = pi.sum()
    if abs(values[k] - 1.0) > 1e-8 or not np.isfinite(pi).all() or abs(total) < 1e-12:
        return np.full(len(transmat), 1.0 / len(transmat))
    pi = np.clip(pi / total, 0.0, None)
    if pi.sum() <= 0:
        return np.full(len(transmat), 1.0 / len(transmat))
    # Keep every state reachable at the window start, however rare.
    pi = np.maximum(pi, 1e-6)
    return pi / pi.sum()


class FeatureStream:
    """:func:`compute_features`, one candle at a time.

    Fed the same candles from the same first one, it yields the same usable
    rows as :func:`compute_features` (the same recursions in the same order),
    but each new candle costs O(1) instead of a pass over the window. Keeps
    the newest ``maxlen`` usable rows.
    """

    A12, A26, A9, A21, A20, A14 = (2.0 / 13.0, 2.0 / 27.0, 2.0 / 10.0, 2.0 / 22.0, 2.0 / 21.0, 1.0 / 14.0)

    def __init__(self, maxlen: int) -> None:
        self.rows: deque[tuple[float, float, float, float]] = deque(maxlen=maxlen)
        self.count = 0
        self.last_time: int | None = None

    @staticmethod
    def _step(a: float, x: float, y: float) -> float:
        return a * x + (1.0 - a) * y

    def push(self, candle: Candle) -> None:
        c, v = float(candle.close), float(candle.volume)
        if self.count == 0:
            # Seed every average with its first input, as compute_features does.
            self._close = c
            self._e12 = self._e26 = self._e9c = self._e21 = c
            self._sig = 0.0
            self._hist = 0.0
            self._gain = self._loss = 0.0
            self._vol = v
        change = c - self._close
        self._close = c
        step = self._step
        self._e12 = step(self.A12, c, self._e12)
        self._e26 = step(self.A26, c, self._e26)
        macd = self._e12 - self._e26
        self._sig = step(self.A9, macd, self._sig)
        hist = macd - self._sig
        slope = (hist - self._hist) / c * 100.0
        self._hist = hist
        self._e9c = step(self.A9, c, self._e9c)
        self._e21 = step(self.A21, c, self._e21)
        spread = (self._e9c - self._e21) / self._e21 * 100.0
        self._gain = step(self.A14, max(change, 0.0), self._gain)
        self._loss = step(self.A14, max(-change, 0.0), self._loss)
        total = self._gain + self._loss
        rsi = 100.0 * self._gain / total if total > 0 else 50.0
        self._vol = step(self.A20, v, self._vol)
        ratio = v / self._vol if self._vol > 0 and v > 0 else math.nan
        self.count += 1
        self.last_time = candle.time
        row = (slope, spread, (rsi - 50.0) / 50.0, ratio)
        if self.count > WARMUP_ROWS and all(math.isfinite(x) for x in row):
            self.rows.append(row)

    def extend(self, candles: Sequence[Candle]) -> None:
        for candle in candles:
            self.push(candle)

    def matrix(self) -> np.ndarray:
        """The kept usable rows, shape ``(n, 4)``, oldest first."""
        return np.array(self.rows, dtype=np.float64).reshape(-1, N_FEATURES)


class RegimeDetector:
    """3-state Gaussian HMM regime detector.

    Parameters are only stored by the constructor; fitted attributes end in
    ``_``. :meth:`fit` returns ``self``.

    Parameters
    ----------
    recent_candles : int
        Rows of the inference window (after warm-up).
    confidence_threshold : float
        Below this confidence the bias signal is 0.
    covariance_type : {"full", "diag"}
    n_iter : int
        EM iterations per initialisation.
    n_init : int
        Initialisations; the fit with the highest log-likelihood is kept.
    random_state : int
        Seed; the same data and seed give the same model.
    """

    def __init__(
        self,
        *,
        recent_candles: int = 100,
        confidence_threshold: float = 0.15,
        covariance_type: str = "full",
        n_iter: int = 100,
        n_init: int = 4,
        random_state: int = 42,
        tol: float = 1e-3,
    ) -> None:
        self.recent_candles = recent_candles
        self.confidence_threshold = confidence_threshold
        self.covariance_type = covariance_type
        self.n_iter = n_iter
        self.n_init = n_init
        self.random_state = random_state
        self.tol = tol

    # -- fitting ----------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        return hasattr(self, "transmat_")

    @property
    def window_size(self) -> int:
        """Candles an inference call should be given (window plus warm-up)."""
        return self.recent_candles + INFERENCE_WARMUP

    def fit(self, candles: Sequence[Candle], copies: np.ndarray | None = None) -> RegimeDetector:
        """Fit on ``candles`` (oldest first).

        ``copies`` optionally repeats each candle's feature row in place (deep
        decay resampling); features are always computed on the true sequence.
        Raises :class:`BadData` when the candles cannot support a model; the
        detector is then left exactly as it was.
        """
        features = compute_features(candles)
        keep = ~np.isnan(features).any(axis=1)
        if copies is not None:
            if len(copies) != len(candles):
                raise ValueError("copies must have one entry per candle")
            rows = np.repeat(features[keep], np.asarray(copies)[keep], axis=0)
        else:
            rows = features[keep]
        n_rows = int(keep.sum())
        if n_rows < 10 * N_STATES:
            raise BadData(f"only {n_rows} usable feature rows in {len(candles)} candles")
        mean = rows.mean(axis=0)
        std = rows.std(axis=0)
        std[std < 1e-12] = 1.0
        x = np.clip((rows - mean) / std, -Z_CLIP, Z_CLIP)

        best: GaussianHMM | None = None
        best_score = -math.inf
        for k in range(self.n_init):
            model = self._new_model(self.random_state + k)
            if k > 0:
                # Spread the other starts: means drawn from distinct data rows.
                rng = np.random.default_rng(self.random_state + k)
                model.init_params = "stc"
                model.means_ = x[rng.choice(len(x), N_STATES, replace=False)]
            try:
                model.fit(x)
                score = model.score(x)
            except (ValueError, np.linalg.LinAlgError) as exc:
                log.debug("initialisation %d failed: %s", k, exc)
                continue
            if math.isfinite(score) and score > best_score:
                best, best_score = model, score
        if best is None:
            raise BadData("every initialisation of the HMM failed")

        order = np.argsort(best.means_[:, SPREAD_FEATURE], kind="stable")
        self._set_params(
            startprob=best.startprob_,
            transmat=best.transmat_,
            means=best.means_,
            covars=best.covars_,
            state_order=order,
            feature_mean=mean,
            feature_std=std,
        )
        self.n_train_candles_ = len(candles)
        self.n_samples_ = n_rows
        self.n_effective_samples_ = len(rows)
        self.log_likelihood_ = float(best_score)
        self.n_iter_run_ = int(best.monitor_.iter)
        self.converged_ = bool(best.monitor_.converged)
        return self

    def _new_model(self, seed: int) -> GaussianHMM:
        return _GaussianHMM(
            n_components=N_STATES,
            covariance_type=self.covariance_type,
            n_iter=self.n_iter,
            tol=self.tol,
            random_state=seed,
            implementation="scaling",
        )

    def _set_params(
        self,
        *,
        startprob: np.ndarray,
        transmat: np.ndarray,
        means: np.ndarray,
        covars: np.ndarray,
        state_order: np.ndarray,
        feature_mean: np.ndarray,
        feature_std: np.ndarray,
    ) -> None:
        chol = np.linalg.cholesky(covars)  # raises LinAlgError when not positive definite
        self.startprob_ = np.asarray(startprob, dtype=float)
        self.transmat_ = np.asarray(transmat, dtype=float)
        self.means_ = np.asarray(means, dtype=float)
        self.covars_ = np.asarray(covars, dtype=float)
        self.state_order_ = np.asarray(state_order, dtype=int)
        self.feature_mean_ = np.asarray(feature_mean, dtype=float)
        self.feature_std_ = np.asarray(feature_std, dtype=float)
        self._chol_inv_t = np.ascontiguousarray(np.linalg.inv(chol).transpose(0, 2, 1))
        self._log_norm = -np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1) - 0.5 * N_FEATURES * math.log(
            2 * math.pi
        )
        self._transmat_list = self.transmat_.tolist()
        self._window_prior = stationary_distribution(self.transmat_).tolist()

    # -- inference --------------------------------------------------------

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return np.clip((features - self.feature_mean_) / self.feature_std_, -Z_CLIP, Z_CLIP)

    def state_posterior(self, x: np.ndarray) -> list[float]:
        """Filtered posterior of the last row of standardised rows ``x``, model state order.

        The window starts from the stationary distribution of the transition
        matrix, not from ``startprob_``: fitted on one sequence, the start
        probability says only where the training history began (usually one
        state with probability 1), which is no prior for a window that starts
        anywhere.
        """
        z = (x[None, :, :] - self.means_[:, None, :]) @ self._chol_inv_t
        loglik = (-0.5 * np.square(z).sum(axis=2) + self._log_norm[:, None]).T
        lik = np.exp(loglik - loglik.max(axis=1, keepdims=True)).tolist()
        a = self._transmat_list
        p0, p1, p2 = self._window_prior
        for b0, b1, b2 in lik:
            q0 = (p0 * a[0][0] + p1 * a[1][0] + p2 * a[2][0]) * b0
            q1 = (p0 * a[0][1] + p1 * a[1][1] + p2 * a[2][1]) * b1
            q2 = (p0 * a[0][2] + p1 * a[1][2] + p2 * a[2][2]) * b2
            total = q0 + q1 + q2
            if not total > 0.0:
                # Every path to this row underflowed: restart from its likelihood alone.
                q0, q1, q2 = b0, b1, b2
                total = q0 + q1 + q2
            p0, p1, p2 = q0 / total, q1 / total, q2 / total
        return [p0, p1, p2]

    def infer(self, candles: Sequence[Candle]) -> RegimeSignal:
        """Regime of the newest candle, from the last ``recent_candles`` usable rows.

        Pass at least :attr:`window_size` candles so the indicators settle.
        Raises :class:`BadData` when untrained or the window has no usable rows.
        """
        features = compute_features(candles)
        return self.infer_rows(features[~np.isnan(features).any(axis=1)])

    def infer_rows(self, rows: np.ndarray) -> RegimeSignal:
        """Like :meth:`infer`, from raw feature rows (e.g. a :class:`FeatureStream`'s)."""
        if not self.is_trained:
            raise BadData("model is not trained")
        rows = rows[-self.recent_candles :]
        if len(rows) == 0:
            raise BadData("no usable feature rows to infer from")
        posterior = self.state_posterior(self.standardise(rows))
        return self.signal_from_probabilities([posterior[i] for i in self.state_order_])

    def signal_from_probabilities(self, probs: Sequence[float]) -> RegimeSignal:
        """Signal from probabilities in label order (bearish, ranging, bullish)."""
        p = tuple(float(v) for v in probs)
        top, second = sorted(p, reverse=True)[:2]
        confidence = top - second
        bias = max(-1.0, min(1.0, p[2] - p[0])) if confidence >= self.confidence_threshold else 0.0
        regime = REGIMES[int(np.argmax(p))]
        return RegimeSignal(regime, confidence, bias, (p[0], p[1], p[2]))

    def transition_matrix(self) -> list[list[float]] | None:
        """Transition probabilities in label order, as JSON-safe nested lists, or ``None``."""
        if not self.is_trained:
            return None
        o = self.state_order_
        return [[float(self.transmat_[i, j]) for j in o] for i in o]

    # -- persistence ------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe fitted parameters (for the state snapshot).

        Arrays are packed as base64 float64 bytes: the round trip is exact, so
        a restored model infers exactly as the one that was saved, and
        encoding costs microseconds instead of a float-by-float repr.
        """
        if not self.is_trained:
            raise BadData("model is not trained")
        return {
            "version": SNAPSHOT_VERSION,
            "covariance_type": self.covariance_type,
            "startprob": _pack(self.startprob_),
            "transmat": _pack(self.transmat_),
            "means": _pack(self.means_),
            "covars": _pack(self.covars_),
            "state_order": self.state_order_.tolist(),
            "feature_mean": _pack(self.feature_mean_),
            "feature_std": _pack(self.feature_std_),
            "n_train_candles": self.n_train_candles_,
            "n_samples": self.n_samples_,
            "n_effective_samples": self.n_effective_samples_,
            "log_likelihood": self.log_likelihood_,
            "n_iter_run": self.n_iter_run_,
            "converged": self.converged_,
        }

    def load_dict(self, data: dict) -> RegimeDetector:
        """Restore fitted parameters written by :meth:`to_dict`.

        Raises :class:`BadData` (leaving the detector unchanged) when the data
        is malformed, of another version, or not a valid HMM.
        """
        try:
            if data.get("version") != SNAPSHOT_VERSION:
                raise BadData(f"model snapshot version {data.get('version')!r} is not {SNAPSHOT_VERSION}")
            arrays = {
                "startprob": (_unpack(data["startprob"]), (N_STATES,)),
                "transmat": (_unpack(data["transmat"]), (N_STATES, N_STATES)),
                "means": (_unpack(data["means"]), (N_STATES, N_FEATURES)),
                "covars": (_unpack(data["covars"]), (N_STATES, N_FEATURES, N_FEATURES)),
                "feature_mean": (_unpack(data["feature_mean"]), (N_FEATURES,)),
                "feature_std": (_unpack(data["feature_std"]), (N_FEATURES,)),
            }
            for name, (arr, shape) in arrays.items():
                if arr.shape != shape or not np.isfinite(arr).all():
                    raise BadData(f"model snapshot field {name} is malformed")
            order = np.asarray(data["state_order"], dtype=int)
            if sorted(order.tolist()) != list(range(N_STATES)):
                raise BadData("model snapshot state_order is not a permutation")
            if not np.allclose(arrays["transmat"][0].sum(axis=1), 1.0, atol=1e-6):
                raise BadData("model snapshot transmat rows do not sum to 1")
            if (arrays["feature_std"][0] <= 0).any():
                raise BadData("model snapshot feature_std is not positive")
            counts = {k: int(data[k]) for k in ("n_train_candles", "n_samples", "n_effective_samples")}
            extra = (float(data["log_likelihood"]), int(data["n_iter_run"]), bool(data["converged"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadData(f"model snapshot is malformed: {exc}") from None
        try:
            self._set_params(
                startprob=arrays["startprob"][0],
                transmat=arrays["transmat"][0],
                means=arrays["means"][0],
                covars=arrays["covars"][0],
                state_order=order,
                feature_mean=arrays["feature_mean"][0],
                feature_std=arrays["feature_std"][0],
            )
        except np.linalg.LinAlgError:
            raise BadData("model snapshot covariances are not positive definite") from None
        self.n_train_candles_ = counts["n_train_candles"]
        self.n_samples_ = counts["n_samples"]
        self.n_effective_samples_ = counts["n_effective_samples"]
        self.log_likelihood_, self.n_iter_run_, self.converged_ = extra
        return self


def _pack(arr: np.ndarray) -> dict:
    """An array as JSON: shape plus base64 of its little-endian float64 bytes (exact, compact)."""
    a = np.ascontiguousarray(arr, dtype="<f8")
    return {"shape": list(a.shape), "f64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(obj: dict) -> np.ndarray:
    raw = base64.b64decode(obj["f64"], validate=True)
    return np.frombuffer(raw, dtype="<f8").reshape([int(n) for n in obj["shape"]]).copy()
