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

Why the probabilities needed work. The features are smoothed (EMAs, RSI,
MACD): one candle's return moves the EMA spread for about
:data:`EMISSION_TEMPERATURE` rows, so neighbouring rows are the same evidence
counted again. A plain HMM treats every row as independent, piles that
evidence up, and its posteriors sit near 1.0 whatever the market does. The
detector therefore (README "Calibrated probabilities"; research/ measures
each step):

1. tempers the emission log-likelihood by ``emission_temperature`` (default
   :data:`EMISSION_TEMPERATURE`, the integrated autocorrelation time of the
   EMA-spread filter under serially uncorrelated returns, derived from its
   spans by :func:`filter_autocorrelation_time`), at fit (tempered EM) and at
   inference alike, so one autocorrelation time of rows counts as one
   observation;
2. starts EM from states cut at quantiles of the EMA spread (the feature that
   names the states), because under tempering k-means or random starts
   collapse two or three states into one;
3. rejects a fit whose states do not separate on the EMA spread
   (:func:`spread_separation`, :class:`UnseparatedStates`): its labels would
   mean nothing;
4. infers with each state's posterior predictive given the independent rows
   it was fitted on (:func:`predictive_student_t`), smooths the transition
   matrix with one pseudo-transition per move (Laplace), and caps what one
   window can tell by what the states are known from (a factor
   ``1 + 3 W / N`` on the temperature): together they keep a model fitted on
   few candles from claiming what those candles cannot support;
5. calibrates the posterior with one more temperature, fitted without labels
   by a state-conditional bootstrap (:meth:`RegimeDetector.fit_posterior_temperature`):
   synthetic candles follow the fitted regime chain, each state's candles are
   resampled from the training candles that follow the rows it explains,
   their features are computed as the bot computes them and the online
   posterior is scored against the synthetic states. States that differ in
   what the price does keep their confidence; states that only differ in how
   the lagging features looked lose it.

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
from scipy.special import gammaln

from candles import Candle, as_arrays
from errors import BadData
from vocabulary import REGIMES, RegimeSignal

log = logging.getLogger(__name__)

N_STATES = 3
N_FEATURES = 4
FEATURE_NAMES = ("macd_hist_slope_pct", "ema_spread_pct", "rsi_centered", "volume_ratio")
SPREAD_FEATURE = 1
WARMUP_ROWS = 35  # MACD slow EMA (26) + signal EMA (9)
INFERENCE_WARMUP = 200  # extra rows before an inference window so the EMAs settle
Z_CLIP = 6.0  # standardised features are clipped here so one wild candle cannot own a state
SNAPSHOT_VERSION = 2  # 2: temperatures, effective counts and prior covariance (calibrated probabilities)
EMA_FAST_SPAN, EMA_SLOW_SPAN = 9, 21


class MalformedModel(BadData):
    """Saved parameters that are not a model at all (not finite, wrong shapes, not probabilities)."""


class UnseparatedStates(BadData):
    """A fit (or snapshot) whose states do not separate on the EMA spread: its labels would mean nothing."""


def filter_autocorrelation_time(fast_span: float = EMA_FAST_SPAN, slow_span: float = EMA_SLOW_SPAN) -> float:
    """Integrated autocorrelation time, in rows, of the EMA spread of a random walk.

    The spread ``EMA_fast(price) - EMA_slow(price)`` is a linear filter of the
    returns with impulse response ``h_k = (1 - a_slow)^(k+1) - (1 - a_fast)^(k+1)``.
    With serially uncorrelated returns its integrated autocorrelation time is
    ``(sum h)^2 / sum h^2``: how many consecutive rows carry about one row's
    worth of independent evidence. For the 9/21 spread it is 29.8 (RSI(14)'s
    Wilder average gives 27 by the same formula). It depends only on the
    feature definitions, never on data, so it holds for any pair and period.
    """
    a_fast, a_slow = 2.0 / (fast_span + 1.0), 2.0 / (slow_span + 1.0)
    k = np.arange(4000)
    h = (1.0 - a_slow) ** (k + 1) - (1.0 - a_fast) ** (k + 1)
    return float(h.sum() ** 2 / np.square(h).sum())


EMISSION_TEMPERATURE = round(filter_autocorrelation_time(), 1)
"""Default emission temperature (29.8): one autocorrelation time of rows counts as one observation."""
MIN_SPREAD_SEPARATION = 0.05
"""Smallest accepted gap between adjacent states' EMA-spread means, in pooled within-state standard deviations.

Below it two states' spread distributions overlap over 98 % of their mass (2 * Phi(-0.025)), so which one is
"bullish" is arbitrary. No simulator fit comes near it (smallest of 50 fits at 500-4000 candles: 0.07, 5th
percentile 0.18); collapsed fits sit at 0.00-0.04 (research/label_check.py)."""
PRIOR_OBSERVATIONS = 1.0  # the predictive's prior is worth one independent row (a unit-information prior)
TRANSITION_PSEUDOCOUNT = 1.0  # rows; Laplace's rule of succession
CALIBRATION_CANDLES = 24_000  # synthetic candles per calibration (after a warm-up)
CALIBRATION_STRIDE = 6  # every 6th synthetic row is scored: neighbours add little but cost as much
POSTERIOR_TEMPERATURE_BOUNDS = (1.0, 100.0)


def _ema(x: np.ndarray, span: float | None = None, *, alpha: float | None = None) -> np.ndarray:
    """Exponential moving average seeded with the first value."""
    a = alpha if alpha is not None else 2.0 / (span + 1.0)
    y, _ = lfilter([a], [1.0, a - 1.0], x, zi=[(1.0 - a) * x[0]])
    return y


def compute_features(candles: Sequence[Candle]) -> np.ndarray:
    """Feature matrix of shape ``(n_candles, 4)``; unusable rows are NaN."""
    if len(candles) <= WARMUP_ROWS:
        return np.full((len(candles), N_FEATURES), np.nan)
    cols = as_arrays(candles)
    return feature_matrix(cols["close"], cols["volume"])


def feature_matrix(close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """:func:`compute_features` from close and volume arrays of shape ``(n,)``."""
    n = len(close)
    out = np.full((n, N_FEATURES), np.nan)
    if n <= WARMUP_ROWS:
        return out

    macd = _ema(close, 12) - _ema(close, 26)
    hist = macd - _ema(macd, 9)
    slope = np.empty(n)
    slope[0] = np.nan
    slope[1:] = np.diff(hist) / close[1:] * 100.0

    ema_slow = _ema(close, EMA_SLOW_SPAN)
    spread = (_ema(close, EMA_FAST_SPAN) - ema_slow) / ema_slow * 100.0

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


class _TemperedGaussianHMM(_GaussianHMM):
    """:class:`_GaussianHMM` whose emission log-likelihoods are divided by ``temperature``.

    EM on the tempered likelihood (a power likelihood) fits means and
    covariances as usual, but the state posteriors of the E-step, and so the
    transition matrix, see each row as ``1 / temperature`` of an observation.
    ``temperature`` is set after construction (hmmlearn's estimators take
    only their own arguments).
    """

    temperature = 1.0

    def _compute_log_likelihood(self, X):  # noqa: N803 (hmmlearn's name)
        if self.covariance_type != "full":
            return super()._compute_log_likelihood(X) / self.temperature
        # hmmlearn's density, batched: one Cholesky factor and inverse for the three states and one
        # matrix product, instead of a triangular solve per state (half a fit's time otherwise).
        covars = self.covars_
        try:
            chol = np.linalg.cholesky(covars)
        except np.linalg.LinAlgError:
            # as hmmlearn: a state with too few rows gets its covariance nudged, else the fit fails
            try:
                chol = np.linalg.cholesky(covars + 1e-7 * np.eye(X.shape[1]))
            except np.linalg.LinAlgError:
                raise ValueError("'covars' must be symmetric, positive-definite") from None
        z = (X[None, :, :] - self.means_[:, None, :]) @ np.linalg.inv(chol).transpose(0, 2, 1)
        log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        loglik = -0.5 * (np.square(z).sum(axis=2) + log_det[:, None] + X.shape[1] * math.log(2 * math.pi))
        return loglik.T / self.temperature


def spread_separation(means: np.ndarray, covars: np.ndarray) -> float:
    """How far apart the states are on the EMA spread: the smaller of the two adjacent gaps.

    States are sorted by their spread mean; each gap between neighbours is
    divided by the pooled within-state standard deviation of the spread of
    the two states, so 1.0 means the means are one typical within-state
    spread apart. ``means`` is ``(3, 4)``, ``covars`` ``(3, 4, 4)``.
    """
    mu = means[:, SPREAD_FEATURE]
    var = covars[:, SPREAD_FEATURE, SPREAD_FEATURE]
    order = np.argsort(mu, kind="stable")
    mu, var = mu[order], var[order]
    gaps = np.diff(mu) / np.sqrt(0.5 * (var[1:] + var[:-1]))
    return float(gaps.min())


def window_posteriors(
    loglik: np.ndarray, transmat: np.ndarray, prior: np.ndarray, ends: np.ndarray, window: int
) -> np.ndarray:
    """Filtered posterior of row ``e`` from a forward pass over rows ``e - window + 1 .. e``, for each ``e``.

    What :meth:`RegimeDetector.state_posterior` computes for one window (before
    the posterior temperature), vectorised over many windows, for calibration
    and research. ``loglik`` is ``(n_rows, 3)`` and already tempered; a window
    that would start before row 0 starts at row 0. Returns ``(len(ends), 3)``
    in model state order.
    """
    lik = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    alpha = np.tile(np.asarray(prior, dtype=float), (len(ends), 1))
    first = np.asarray(ends) - window + 1
    transmat = np.asarray(transmat, dtype=float)
    if (first >= 0).all() and (transmat > 0).all():
        # Every window whole, every move possible: each row's likelihood peaks at 1 and every state
        # keeps some mass after a step, so nothing underflows and nothing needs masking.
        for k in range(window):
            alpha = alpha @ transmat
            alpha *= lik[first + k]
            alpha /= alpha.sum(axis=1, keepdims=True)
        return alpha
    for k in range(window):
        row = first + k
        step = (alpha @ transmat) * lik[np.maximum(row, 0)]
        total = step.sum(axis=1, keepdims=True)
        # Every path underflowed (never seen in practice): restart from the row's likelihood.
        step = np.where(total > 0, step, lik[np.maximum(row, 0)])
        step /= step.sum(axis=1, keepdims=True)
        alpha = np.where((row >= 0)[:, None], step, alpha)
    return alpha


def predictive_student_t(
    means: np.ndarray, covars: np.ndarray, counts: np.ndarray, prior_cov: np.ndarray, prior_rows: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior predictive of each state's Gaussian given how many independent rows it rests on.

    Conjugate normal-inverse-Wishart prior centred on all training rows
    together (mean 0 and covariance ``prior_cov`` in standardised units),
    worth ``prior_rows`` independent rows; the state's fitted mean and
    covariance stand for ``counts`` independent rows. The predictive is a
    multivariate Student-t (Murphy 2007, section 9): returns its locations
    ``(3, d)``, scale matrices ``(3, d, d)`` and degrees of freedom ``(3,)``.
    A state seen on many independent rows keeps its Gaussian; one seen on a
    handful is pulled towards the whole sample and grows heavy tails, so it
    cannot claim a new row with a confidence its few rows do not support.
    """
    d = means.shape[1]
    k0, nu0 = prior_rows, d - 1.0 + prior_rows
    n = np.asarray(counts, dtype=float)
    kn, nun = k0 + n, nu0 + n
    loc = means * (n / kn)[:, None]  # prior mean 0
    spread = np.einsum("ki,kj->kij", means, means) * (k0 * n / kn)[:, None, None]
    psi = prior_rows * prior_cov[None, :, :] + covars * n[:, None, None] + spread
    dof = nun - d + 1.0
    scale = psi * ((kn + 1.0) / (kn * dof))[:, None, None]
    return loc, scale, dof


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities raised to ``1 / temperature`` and renormalised, along the last axis."""
    logp = np.log(np.clip(probs, 1e-300, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=-1, keepdims=True)


def _sample_chain(transmat: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` steps of the Markov chain ``transmat`` from its stationary distribution, episode by episode."""
    stay = np.clip(np.diag(transmat), 0.0, 1.0 - 1e-12)
    moves = transmat * (1.0 - np.eye(len(transmat)))
    moves = np.where(moves.sum(axis=1, keepdims=True) > 0, moves, 1.0 - np.eye(len(transmat)))
    moves /= moves.sum(axis=1, keepdims=True)
    out = np.empty(n, dtype=np.int64)
    state = int(rng.choice(len(transmat), p=stationary_distribution(transmat)))
    t = 0
    while t < n:
        dwell = int(rng.geometric(1.0 - stay[state]))
        out[t : t + dwell] = state
        t += dwell
        state = int(rng.choice(len(transmat), p=moves[state]))
    return out


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
    """3-state Gaussian HMM regime detector with calibrated probabilities.

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
        Initialisations; initialisation ``k`` cuts the EMA spread at its
        ``1/(3+k)`` and ``1 - 1/(3+k)`` quantiles. Of the fits whose states
        separate, the one with the highest likelihood is kept.
    random_state : int
        Seed of the calibration bootstrap; the same data and seed give the same model.
    tol : float
        EM convergence threshold on the log-likelihood, in untempered units.
    emission_temperature : float
        Emission log-likelihoods are divided by this at fit and inference:
        how many consecutive rows count as one independent observation
        (default :data:`EMISSION_TEMPERATURE`; 1 is a plain HMM).
    predictive : bool
        Infer with each state's posterior predictive (:func:`predictive_student_t`)
        given the independent rows it was fitted on, instead of its fitted Gaussian.
    transition_pseudocount : float
        Pseudo-transitions added from each state to each other one after the
        fit (Laplace's rule of succession), in rows.
    calibrate : bool
        Fit the posterior temperature by the state-conditional bootstrap
        (:meth:`fit_posterior_temperature`); otherwise it is 1.
    min_separation : float
        A fit whose :func:`spread_separation` is below this is rejected
        (:class:`BadData`); default :data:`MIN_SPREAD_SEPARATION`.
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
        emission_temperature: float = EMISSION_TEMPERATURE,
        predictive: bool = True,
        transition_pseudocount: float = TRANSITION_PSEUDOCOUNT,
        evidence_cap: bool = True,
        calibrate: bool = True,
        min_separation: float = MIN_SPREAD_SEPARATION,
    ) -> None:
        self.recent_candles = recent_candles
        self.confidence_threshold = confidence_threshold
        self.covariance_type = covariance_type
        self.n_iter = n_iter
        self.n_init = n_init
        self.random_state = random_state
        self.tol = tol
        self.emission_temperature = emission_temperature
        self.predictive = predictive
        self.transition_pseudocount = transition_pseudocount
        self.evidence_cap = evidence_cap
        self.calibrate = calibrate
        self.min_separation = min_separation

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

        Tempered EM from each of :attr:`n_init` spread-quantile starts; of the
        fits whose states separate on the EMA spread, the one with the highest
        likelihood is kept. Then the effective counts (each state's posterior
        weight over the emission temperature), the Laplace-smoothed transition
        matrix, the window-evidence cap and the bootstrap posterior
        temperature are derived from it.

        Parameters
        ----------
        candles : sequence of Candle
            The training history, at least ``WARMUP_ROWS + 30`` candles.
        copies : ndarray of int, shape (n_candles,), optional
            Repeats each candle's feature row in place (deep decay
            resampling); features, effective counts and the calibration
            always use the true sequence.

        Returns
        -------
        RegimeDetector
            ``self``.

        Raises
        ------
        BadData
            When the candles cannot support a model, every start fails, or
            (:class:`UnseparatedStates`) no fit separates its states on the
            EMA spread by :attr:`min_separation`. The detector is then left
            exactly as it was.
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

        fits: list[tuple[float, float, GaussianHMM]] = []
        for k in range(self.n_init):
            model = self._new_model(x, k)
            try:
                model.fit(x)
                score = model.score(x)
            except (ValueError, np.linalg.LinAlgError) as exc:
                log.debug("initialisation %d failed: %s", k, exc)
                continue
            if math.isfinite(score):
                fits.append((score, spread_separation(model.means_, model.covars_), model))
        if not fits:
            raise BadData("every initialisation of the HMM failed")
        separated = [f for f in fits if f[1] >= self.min_separation]
        if not separated:
            best_sep = max(f[1] for f in fits)
            raise UnseparatedStates(
                f"the states do not separate on the EMA spread (separation {best_sep:.3f} < {self.min_separation})"
            )
        best_score, separation, best = max(separated, key=lambda f: f[0])

        # Everything is built on a fresh detector and swapped in at the end, so a
        # failure anywhere (calibration included) leaves this one as it was.
        fitted = type(self)(**self.get_params())
        # Smoothed (forward-backward) state posteriors of the true training sequence, tempered as
        # fitted: which state explains each candle. Each state's weight over the autocorrelation time
        # is the number of independent rows its parameters rest on.
        explained = best.predict_proba(np.clip((features[keep] - mean) / std, -Z_CLIP, Z_CLIP))
        occupancy = explained.sum(axis=0)
        counts = occupancy / float(self.emission_temperature) if self.predictive else None
        transmat = best.transmat_
        if self.transition_pseudocount > 0:
            # Laplace's rule of succession on the transition counts: a move never seen in the
            # training rows is rare, not impossible (a shallow fit otherwise makes states unreachable).
            c = self.transition_pseudocount
            moves = transmat * occupancy[:, None] + c * (1.0 - np.eye(N_STATES))
            transmat = moves / moves.sum(axis=1, keepdims=True)
        temperature = float(self.emission_temperature)
        if self.evidence_cap:
            # A window of m independent rows cannot tell states apart better than the states are known:
            # with a state fitted on n independent rows, the joint predictive of the window shrinks the
            # log-likelihood ratio by about n / (n + m). With m = W / T and n = N / (3 T) on average
            # (N usable training rows shared by three states), the factor is 1 + 3 W / N.
            temperature *= 1.0 + N_STATES * self.recent_candles / n_rows
        params = {
            "startprob": best.startprob_,
            "transmat": transmat,
            "means": best.means_,
            "covars": best.covars_,
            "state_order": np.argsort(best.means_[:, SPREAD_FEATURE], kind="stable"),
            "feature_mean": mean,
            "feature_std": std,
            "emission_temperature": temperature,
            "effective_counts": counts,
            "prior_covariance": np.cov(x.T) if self.predictive else None,
        }
        try:
            fitted._set_params(**params, posterior_temperature=1.0)
            if self.calibrate:
                cols = as_arrays(candles)
                temperature = fitted.fit_posterior_temperature(cols["close"], cols["volume"], keep, explained)
                fitted._set_params(**params, posterior_temperature=temperature)
        except np.linalg.LinAlgError as exc:
            raise BadData(f"the fitted covariances are degenerate: {exc}") from None
        fitted.n_train_candles_ = len(candles)
        fitted.n_samples_ = n_rows
        fitted.n_effective_samples_ = len(rows)
        fitted.log_likelihood_ = float(best_score) * float(self.emission_temperature)  # in untempered units
        fitted.n_iter_run_ = int(best.monitor_.iter)
        fitted.converged_ = bool(best.monitor_.converged)
        fitted.separation_ = separation
        self.__dict__.update(fitted.__dict__)
        return self

    def get_params(self) -> dict:
        """Constructor arguments (a fresh, unfitted copy is ``RegimeDetector(**get_params())``)."""
        names = (
            "recent_candles", "confidence_threshold", "covariance_type", "n_iter", "n_init", "random_state", "tol",
            "emission_temperature", "predictive", "transition_pseudocount", "evidence_cap", "calibrate",
            "min_separation",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def _new_model(self, x: np.ndarray, k: int) -> GaussianHMM:
        """Initialisation ``k``: states cut at the ``q = 1/(3+k)`` and ``1-q`` quantiles of the EMA spread.

        Under tempered emissions the likelihood is flat enough that k-means or
        random starts often end with two or three identical states; starting
        from bearish / middle / bullish slices of the spread, the feature
        that names the states, lands on separated states.
        """
        temperature = float(self.emission_temperature)
        model = _TemperedGaussianHMM(
            n_components=N_STATES,
            covariance_type=self.covariance_type,
            n_iter=self.n_iter,
            tol=self.tol / temperature,
            random_state=self.random_state + k,
            implementation="scaling",
            init_params="",
        )
        model.temperature = temperature
        q = 1.0 / (3.0 + k)
        by_spread = np.argsort(x[:, SPREAD_FEATURE], kind="stable")
        parts = np.split(by_spread, [round(q * len(x)), round((1.0 - q) * len(x))])
        means = np.array([x[p].mean(axis=0) for p in parts])
        covars = np.array([np.cov(x[p].T) + 1e-3 * np.eye(N_FEATURES) for p in parts])
        model.n_features = N_FEATURES
        model.startprob_ = np.full(N_STATES, 1.0 / N_STATES)
        model.transmat_ = np.full((N_STATES, N_STATES), 0.005) + np.eye(N_STATES) * (1.0 - 0.005 * N_STATES)
        model.means_ = means
        model.covars_ = covars if self.covariance_type == "full" else np.diagonal(covars, axis1=1, axis2=2).copy()
        return model

    def fit_posterior_temperature(
        self, close: np.ndarray, volume: np.ndarray, keep: np.ndarray, explained: np.ndarray
    ) -> float:
        """The posterior temperature that calibrates this (fitted) model, from unlabeled candles.

        State-conditional bootstrap. ``explained`` (``(keep.sum(), 3)``, model
        state order) is the smoothed posterior of the training rows, one per
        candle where ``keep``: which state explains each candle. A synthetic
        series of :data:`CALIBRATION_CANDLES` candles follows the fitted
        transition matrix; each synthetic candle's return and volume are
        drawn from the training candles *following* the rows its state
        explains (what the price does next while the state holds, not the
        returns its lagging features were built from). Its features are
        computed as the bot computes them; the online posterior of every
        :data:`CALIBRATION_STRIDE`-th row (the window of
        :attr:`recent_candles` rows, as at inference) is compared with the
        synthetic state, and the temperature ``T`` minimising the log loss of
        ``p ** (1/T)`` (renormalised) is returned, clipped to
        :data:`POSTERIOR_TEMPERATURE_BOUNDS`: the calibration only ever
        removes confidence.

        The synthetic truth is the model's own states, so this measures how
        well the features recover a state from what the price does while it
        holds: states that differ in drift or volatility stay recognisable,
        states that only differ in how the lagging features looked do not,
        and their confidence goes. Deterministic for a given ``random_state``.
        """
        from scipy.optimize import minimize_scalar

        rng = np.random.default_rng(self.random_state)
        log_close = np.log(close)
        following = np.flatnonzero(keep[:-1])  # kept rows that have a next candle
        returns = np.diff(log_close)[following]
        volumes = volume[following + 1]
        weights = np.asarray(explained, dtype=float)[: len(following)]
        weights = weights / weights.sum(axis=0, keepdims=True)

        warm = WARMUP_ROWS + INFERENCE_WARMUP
        states = _sample_chain(self.transmat_, CALIBRATION_CANDLES + warm + self.recent_candles, rng)
        picks = np.empty(len(states), dtype=np.int64)
        for s in range(N_STATES):
            at = np.flatnonzero(states == s)
            picks[at] = rng.choice(len(returns), size=len(at), p=weights[:, s])
        features = feature_matrix(close[0] * np.exp(np.cumsum(returns[picks])), volumes[picks])
        usable = ~np.isnan(features).any(axis=1)
        x = self.standardise(features[usable])
        first = max(warm - WARMUP_ROWS, self.recent_candles - 1)
        ends = np.arange(first, len(x), CALIBRATION_STRIDE)
        posteriors = window_posteriors(
            self._loglik(x), self.transmat_, np.asarray(self._window_prior), ends, self.recent_candles
        )
        log_p = np.log(np.clip(posteriors, 1e-300, None))
        truth = states[usable][ends]  # model state order on both sides

        def log_loss(log_t: float) -> float:
            z = log_p / math.exp(log_t)
            z = z - z.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(z).sum(axis=1))
            return float(np.mean(log_norm - z[np.arange(len(z)), truth]))

        lo, hi = POSTERIOR_TEMPERATURE_BOUNDS
        found = minimize_scalar(
            log_loss, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-3}
        )
        return float(np.clip(math.exp(found.x), lo, hi))

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
        emission_temperature: float,
        posterior_temperature: float,
        effective_counts: np.ndarray | None,
        prior_covariance: np.ndarray | None,
    ) -> None:
        """Set the fitted parameters and what inference precomputes from them.

        Everything is computed before anything is assigned: a
        :class:`numpy.linalg.LinAlgError` (a covariance that is not positive
        definite) leaves the detector as it was.
        """
        means, covars = np.asarray(means, dtype=float), np.asarray(covars, dtype=float)
        np.linalg.cholesky(covars)  # raises LinAlgError when not positive definite
        d = N_FEATURES
        if effective_counts is None:
            loc, scale, dof = means, covars, None
            log_norm = -0.5 * d * math.log(2 * math.pi) * np.ones(N_STATES)
        else:
            effective_counts = np.asarray(effective_counts, dtype=float)
            prior_covariance = np.asarray(prior_covariance, dtype=float)
            loc, scale, dof = predictive_student_t(
                means, covars, effective_counts, prior_covariance, PRIOR_OBSERVATIONS
            )
            log_norm = gammaln((dof + d) / 2.0) - gammaln(dof / 2.0) - 0.5 * d * np.log(dof * math.pi)
        chol = np.linalg.cholesky(scale)
        transmat = np.asarray(transmat, dtype=float)
        window_prior = stationary_distribution(transmat).tolist()

        self.startprob_ = np.asarray(startprob, dtype=float)
        self.transmat_ = transmat
        self.means_ = means
        self.covars_ = covars
        self.state_order_ = np.asarray(state_order, dtype=int)
        self.feature_mean_ = np.asarray(feature_mean, dtype=float)
        self.feature_std_ = np.asarray(feature_std, dtype=float)
        self.emission_temperature_ = float(emission_temperature)
        self.posterior_temperature_ = float(posterior_temperature)
        self.effective_counts_ = effective_counts
        self.prior_covariance_ = None if effective_counts is None else prior_covariance
        # What a forward pass needs, precomputed: whitening by the (predictive) scale, normalising
        # constants, the tempering factors, the transition matrix as lists, the window's prior.
        self._loc = np.asarray(loc, dtype=float)
        self._dof = dof
        self._chol_inv_t = np.ascontiguousarray(np.linalg.inv(chol).transpose(0, 2, 1))
        self._log_norm = log_norm - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        self._inv_emission_temperature = 1.0 / self.emission_temperature_
        # ... folded: log p / T = log_norm / T - (nu + d) / (2 T) * log1p(m / nu)  (Gaussian: - m / (2 T))
        self._log_norm_t = self._log_norm * self._inv_emission_temperature
        if dof is None:
            self._half_t, self._inv_dof = 0.5 * self._inv_emission_temperature, None
        else:
            self._half_t = (0.5 * (dof + d) * self._inv_emission_temperature)[:, None]
            self._inv_dof = (1.0 / dof)[:, None]
        self._inv_posterior_temperature = 1.0 / self.posterior_temperature_
        self._transmat_list = transmat.tolist()
        self._window_prior = window_prior

    # -- inference --------------------------------------------------------

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return np.clip((features - self.feature_mean_) / self.feature_std_, -Z_CLIP, Z_CLIP)

    def _loglik(self, x: np.ndarray) -> np.ndarray:
        """Tempered emission log-likelihoods of standardised rows ``x``, shape ``(n, 3)``, model state order."""
        z = (x[None, :, :] - self._loc[:, None, :]) @ self._chol_inv_t
        m = np.square(z).sum(axis=2)  # squared Mahalanobis distance, (3, n)
        if self._dof is None:
            return (self._log_norm_t[:, None] - self._half_t * m).T
        return (self._log_norm_t[:, None] - self._half_t * np.log1p(m * self._inv_dof)).T

    def state_posterior(self, x: np.ndarray) -> list[float]:
        """Calibrated filtered posterior of the last row of standardised rows ``x``, model state order.

        A forward pass over the tempered emissions, then the posterior
        temperature. The window starts from the stationary distribution of
        the transition matrix, not from ``startprob_``: fitted on one
        sequence, the start probability says only where the training history
        began (usually one state with probability 1), which is no prior for a
        window that starts anywhere.
        """
        loglik = self._loglik(x)
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
        k = self._inv_posterior_temperature
        if k != 1.0:
            top = max(p0, p1, p2)
            p0, p1, p2 = (p0 / top) ** k, (p1 / top) ** k, (p2 / top) ** k
            total = p0 + p1 + p2
            p0, p1, p2 = p0 / total, p1 / total, p2 / total
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
            "emission_temperature": self.emission_temperature_,
            "posterior_temperature": self.posterior_temperature_,
            "effective_counts": None if self.effective_counts_ is None else _pack(self.effective_counts_),
            "prior_covariance": None if self.prior_covariance_ is None else _pack(self.prior_covariance_),
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
        is malformed (:class:`MalformedModel`: not finite, wrong shapes, not
        probabilities), of another version (an older model is retrained, not
        reinterpreted), not a valid HMM, or its states do not separate on the
        EMA spread.
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
                    raise MalformedModel(f"model snapshot field {name} is malformed")
            order = np.asarray(data["state_order"], dtype=int)
            if sorted(order.tolist()) != list(range(N_STATES)):
                raise MalformedModel("model snapshot state_order is not a permutation")
            if not np.isclose(arrays["startprob"][0].sum(), 1.0, atol=1e-6) or (arrays["startprob"][0] < 0).any():
                raise MalformedModel("model snapshot startprob is not a probability vector")
            if (arrays["transmat"][0] < 0).any() or not np.allclose(arrays["transmat"][0].sum(axis=1), 1.0, atol=1e-6):
                raise MalformedModel("model snapshot transmat rows do not sum to 1")
            if (arrays["feature_std"][0] <= 0).any():
                raise MalformedModel("model snapshot feature_std is not positive")
            temperatures = {k: float(data[k]) for k in ("emission_temperature", "posterior_temperature")}
            predictive = {"effective_counts": None, "prior_covariance": None}
            if (data["effective_counts"] is None) != (data["prior_covariance"] is None):
                raise MalformedModel("model snapshot has effective_counts without prior_covariance or the reverse")
            if data["effective_counts"] is not None:
                effective, prior_cov = _unpack(data["effective_counts"]), _unpack(data["prior_covariance"])
                if effective.shape != (N_STATES,) or not (np.isfinite(effective).all() and (effective > 0).all()):
                    raise MalformedModel("model snapshot field effective_counts is malformed")
                if prior_cov.shape != (N_FEATURES, N_FEATURES) or not np.isfinite(prior_cov).all():
                    raise MalformedModel("model snapshot field prior_covariance is malformed")
                predictive = {"effective_counts": effective, "prior_covariance": prior_cov}
            if not all(math.isfinite(t) and t > 0 for t in temperatures.values()):
                raise MalformedModel("model snapshot temperatures must be finite and positive")
            lo, hi = POSTERIOR_TEMPERATURE_BOUNDS
            if not lo <= temperatures["posterior_temperature"] <= hi:
                raise BadData(f"model snapshot posterior_temperature is outside [{lo}, {hi}]")
            np.linalg.cholesky(arrays["covars"][0])  # positive definite before anything is derived from it
            separation = spread_separation(arrays["means"][0], arrays["covars"][0])
            if not separation >= self.min_separation:
                raise UnseparatedStates(f"model snapshot states do not separate on the EMA spread ({separation:.3f})")
            counts = {k: int(data[k]) for k in ("n_train_candles", "n_samples", "n_effective_samples")}
            extra = (float(data["log_likelihood"]), int(data["n_iter_run"]), bool(data["converged"]))
        except np.linalg.LinAlgError:
            raise MalformedModel("model snapshot covariances are not positive definite") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedModel(f"model snapshot is malformed: {exc}") from None
        try:
            self._set_params(
                startprob=arrays["startprob"][0],
                transmat=arrays["transmat"][0],
                means=arrays["means"][0],
                covars=arrays["covars"][0],
                state_order=order,
                feature_mean=arrays["feature_mean"][0],
                feature_std=arrays["feature_std"][0],
                **temperatures,
                **predictive,
            )
        except np.linalg.LinAlgError:
            raise MalformedModel("model snapshot covariances are not positive definite") from None
        self.n_train_candles_ = counts["n_train_candles"]
        self.n_samples_ = counts["n_samples"]
        self.n_effective_samples_ = counts["n_effective_samples"]
        self.log_likelihood_, self.n_iter_run_, self.converged_ = extra
        self.separation_ = separation
        return self


def _pack(arr: np.ndarray) -> dict:
    """An array as JSON: shape plus base64 of its little-endian float64 bytes (exact, compact)."""
    a = np.ascontiguousarray(arr, dtype="<f8")
    return {"shape": list(a.shape), "f64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(obj: dict) -> np.ndarray:
    raw = base64.b64decode(obj["f64"], validate=True)
    return np.frombuffer(raw, dtype="<f8").reshape([int(n) for n in obj["shape"]]).copy()
