import copy
import json

import numpy as np
import pytest
from hmmlearn.hmm import GaussianHMM

from candles import Candle
from errors import BadData
from hmm_regime_detector import (
    WARMUP_ROWS,
    FeatureStream,
    RegimeDetector,
    compute_features,
    stationary_distribution,
)
from market_sim import generate
from regime_policy import BEARISH, BULLISH, RANGING, REGIMES


@pytest.fixture(scope="module")
def sim_data():
    return generate(6000, seed=1)


@pytest.fixture(scope="module")
def fitted(sim_data):
    candles, _ = sim_data
    return RegimeDetector().fit(candles[:4000])


def test_features_shape_warmup_and_ranges(sim_data):
    candles, _ = sim_data
    f = compute_features(candles[:500])
    assert f.shape == (500, 4)
    assert np.isnan(f[:WARMUP_ROWS]).all()
    assert np.isfinite(f[WARMUP_ROWS:]).all()
    assert (np.abs(f[WARMUP_ROWS:, 2]) <= 1.0).all()  # RSI mapped to [-1, 1]
    assert (f[WARMUP_ROWS:, 3] > 0).all()  # volume ratio


def test_features_of_a_flat_market_are_neutral():
    flat = [Candle(60 * i, 1.0, 1.0, 1.0, 1.0, 100.0) for i in range(100)]
    f = compute_features(flat)[WARMUP_ROWS:]
    np.testing.assert_allclose(f, np.tile([0.0, 0.0, 0.0, 1.0], (len(f), 1)), atol=1e-12)


def test_rows_with_nan_are_dropped_zero_volume_history():
    candles = [Candle(60 * i, 1.0 + 0.001 * i, 1.01 + 0.001 * i, 0.99, 1.0 + 0.001 * i, 0.0) for i in range(80)]
    f = compute_features(candles)
    assert np.isnan(f).any(axis=1).all()  # volume ratio 0/0 everywhere: no usable row
    with pytest.raises(BadData):
        RegimeDetector().fit(candles)


def test_feature_stream_equals_batch_features(sim_data):
    candles, _ = sim_data
    batch = compute_features(candles[:1500])
    batch = batch[~np.isnan(batch).any(axis=1)]
    stream = FeatureStream(maxlen=10_000)
    for c in candles[:1500]:
        stream.push(c)
    np.testing.assert_array_equal(stream.matrix(), batch)
    short = FeatureStream(maxlen=100)
    short.extend(candles[:1500])
    np.testing.assert_array_equal(short.matrix(), batch[-100:])


def test_fit_is_reproducible_and_labels_by_ema_spread(sim_data, fitted):
    candles, _ = sim_data
    again = RegimeDetector().fit(candles[:4000])
    np.testing.assert_array_equal(again.transmat_, fitted.transmat_)
    np.testing.assert_array_equal(again.means_, fitted.means_)
    spread_means = fitted.means_[fitted.state_order_, 1]
    assert list(spread_means) == sorted(spread_means)  # bearish < ranging < bullish
    assert fitted.n_train_candles_ == 4000
    assert fitted.n_samples_ == 4000 - WARMUP_ROWS


def test_transition_matrix_getter(fitted):
    assert RegimeDetector().transition_matrix() is None
    tm = fitted.transition_matrix()
    assert len(tm) == 3 and all(len(row) == 3 for row in tm)
    assert all(isinstance(v, float) for row in tm for v in row)
    json.dumps(tm)  # JSON-safe
    o = fitted.state_order_
    assert tm[0][2] == pytest.approx(fitted.transmat_[o[0], o[2]])  # bearish -> bullish, in label order
    for row in tm:
        assert sum(row) == pytest.approx(1.0)
    tm[0][0] = 99.0  # a copy: the model is untouched
    assert fitted.transition_matrix()[0][0] != 99.0


PLAIN = {
    "emission_temperature": 1.0,
    "predictive": False,
    "transition_pseudocount": 0.0,
    "evidence_cap": False,
    "calibrate": False,
}
"""A plain HMM: no tempering, no predictive, no pseudo-transitions, no calibration."""


def test_posterior_matches_hmmlearn_forward_pass(sim_data):
    candles, _ = sim_data
    plain = RegimeDetector(**PLAIN).fit(candles[:4000])
    f = compute_features(candles[4000:4300])
    x = plain.standardise(f[~np.isnan(f).any(axis=1)][-100:])
    reference = GaussianHMM(3, covariance_type="full")
    reference.n_features = 4
    reference.startprob_ = stationary_distribution(plain.transmat_)
    reference.transmat_ = plain.transmat_
    reference.means_ = plain.means_
    reference.covars_ = plain.covars_
    expected = reference.predict_proba(x)[-1]
    np.testing.assert_allclose(plain.state_posterior(x), expected, rtol=1e-6, atol=1e-9)


def test_signal_rules(fitted):
    s = fitted.signal_from_probabilities([0.1, 0.2, 0.7])
    assert s.regime == BULLISH
    assert s.confidence == pytest.approx(0.5)
    assert s.bias_signal == pytest.approx(0.6)
    weak = fitted.signal_from_probabilities([0.30, 0.36, 0.34])  # confidence 0.02 < 0.15
    assert weak.regime == RANGING and weak.bias_signal == 0.0
    bear = fitted.signal_from_probabilities([0.9, 0.1, 0.0])
    assert bear.regime == BEARISH and bear.bias_signal == pytest.approx(-0.9)


def test_infer_uses_the_newest_window(sim_data, fitted):
    candles, _labels = sim_data
    s = fitted.infer(candles[4000:4300])
    assert s.regime in REGIMES
    assert sum(s.probabilities) == pytest.approx(1.0)
    assert 0.0 <= s.confidence <= 1.0
    with pytest.raises(BadData):
        RegimeDetector().infer(candles[:300])  # untrained


def test_detector_beats_chance_on_the_simulator(sim_data, fitted):
    candles, labels = sim_data
    hits = {r: [0, 0] for r in REGIMES}
    for i in range(4300, 6000, 5):
        truth = labels[i]
        hits[truth][1] += 1
        hits[truth][0] += fitted.infer(candles[i - 299 : i + 1]).regime == truth
    balanced = np.mean([h / n for h, n in hits.values() if n])
    assert balanced > 0.5  # chance is 1/3; labels are not inverted


def test_snapshot_round_trip_is_exact(sim_data, fitted):
    candles, _ = sim_data
    data = json.loads(json.dumps(fitted.to_dict()))
    restored = RegimeDetector().load_dict(data)
    window = candles[4500:4800]
    assert restored.infer(window) == fitted.infer(window)
    assert restored.transition_matrix() == fitted.transition_matrix()
    assert restored.n_train_candles_ == 4000


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.update(version=99),
        lambda d: d.pop("means"),
        lambda d: d.update(state_order=[0, 0, 1]),
        lambda d: d["transmat"].update(shape=[9]),
        lambda d: d["covars"].update(f64="not base64!"),
        lambda d: d.update(covars=_pack_like(d["covars"], -np.ones((3, 4, 4)))),
    ],
)
def test_malformed_snapshot_is_rejected_and_changes_nothing(fitted, corrupt):
    data = copy.deepcopy(fitted.to_dict())
    corrupt(data)
    target = RegimeDetector()
    with pytest.raises(BadData):
        target.load_dict(data)
    assert not target.is_trained


def _pack_like(_packed, arr):
    from hmm_regime_detector import _pack

    return _pack(arr)


def test_failed_fit_keeps_previous_parameters(sim_data, fitted):
    candles, _ = sim_data
    model = copy.deepcopy(fitted)
    before = model.transmat_.copy()
    with pytest.raises(BadData):
        model.fit(candles[:50])
    np.testing.assert_array_equal(model.transmat_, before)


def test_fit_with_copies_counts_effective_samples(sim_data):
    candles, _ = sim_data
    copies = np.ones(1000, dtype=int)
    copies[500:] = 3
    model = RegimeDetector(n_init=1).fit(candles[:1000], copies)
    assert model.n_samples_ == 1000 - WARMUP_ROWS
    assert model.n_effective_samples_ == (500 - WARMUP_ROWS) + 3 * 500


def test_stationary_distribution():
    a = np.array([[0.9, 0.1, 0.0], [0.05, 0.9, 0.05], [0.0, 0.1, 0.9]])
    pi = stationary_distribution(a)
    np.testing.assert_allclose(pi @ a, pi, atol=1e-9)
    assert pi.sum() == pytest.approx(1.0)
    # A reducible chain (no unique answer) still gives a usable prior.
    pi2 = stationary_distribution(np.eye(3))
    assert pi2.sum() == pytest.approx(1.0) and (pi2 > 0).all()


def test_fast_sufficient_statistics_fit_exactly_like_hmmlearn(sim_data):
    from hmm_regime_detector import _GaussianHMM

    candles, _ = sim_data
    f = compute_features(candles[:3000])
    x = f[~np.isnan(f).any(axis=1)]
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    for cov in ("full", "diag"):
        kw = {"n_components": 3, "covariance_type": cov, "n_iter": 30, "tol": 1e-9, "random_state": 3,
              "implementation": "scaling"}  # fmt: skip
        stock, fast = GaussianHMM(**kw).fit(x), _GaussianHMM(**kw).fit(x)
        assert fast.monitor_.iter == stock.monitor_.iter
        np.testing.assert_allclose(fast.means_, stock.means_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fast.covars_, stock.covars_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fast.transmat_, stock.transmat_, rtol=1e-9, atol=1e-12)
