import pytest

from errors import BadData
from hmm_regime_detector import EMISSION_TEMPERATURE, RegimeDetector, UnseparatedStates
from market.sim import generate
from regime.model_slot import RETRY_AFTER_FAILURE_SEC, RETRY_AFTER_REJECTION_SEC, ModelSlot, SlotSpec, detector_options

SPEC = SlotSpec("primary", 1, target=4000, min_samples=500, retrain_interval_sec=86_400)


class Failing(RegimeDetector):
    """A detector whose fits fail (too few usable rows, degenerate covariances...)."""

    def fit(self, candles, copies=None):
        raise BadData("only 12 usable feature rows")


class Refusing(RegimeDetector):
    """A detector whose fits are rejected by the label check."""

    def fit(self, candles, copies=None):
        raise UnseparatedStates("the states do not separate on the EMA spread")


def test_failed_fits_back_off_exponentially_up_to_the_retrain_interval():
    slot = ModelSlot(SPEC, Failing)
    candles, _ = generate(600, seed=1)
    now = 1_767_225_600.0
    waits = []
    for _ in range(10):
        record = slot.train(candles, now, "initial")
        assert not record.ok and "usable" in record.error
        waits.append(slot.retry_after_sec)
        assert slot.retrain_reason(600, now + slot.retry_after_sec - 1) is None  # still waiting
        now += slot.retry_after_sec
        assert slot.retrain_reason(600, now) == "initial"
    assert waits[:4] == [RETRY_AFTER_FAILURE_SEC, 2 * RETRY_AFTER_FAILURE_SEC, 4 * RETRY_AFTER_FAILURE_SEC, 4800]
    assert waits[-1] == SPEC.retrain_interval_sec  # never longer than the retrain interval


def test_a_rejected_fit_waits_an_hour_first():
    slot = ModelSlot(SPEC, Refusing)
    candles, _ = generate(600, seed=1)
    record = slot.train(candles, 0.0, "initial")
    assert not record.ok and "do not separate" in record.error and slot.last_error.startswith("training failed")
    assert slot.retry_after_sec == RETRY_AFTER_REJECTION_SEC
    slot.train(candles, 3600.0, "initial")
    assert slot.retry_after_sec == 2 * RETRY_AFTER_REJECTION_SEC


def test_a_successful_fit_resets_the_back_off():
    slot = ModelSlot(SPEC, Failing)
    candles, _ = generate(600, seed=1)
    slot.train(candles, 0.0, "initial")
    slot.train(candles, 600.0, "initial")
    assert slot.retry_after_sec == 2 * RETRY_AFTER_FAILURE_SEC
    slot._make_detector = RegimeDetector
    assert slot.train(candles, 1800.0, "initial").ok
    assert slot.retry_after_sec == RETRY_AFTER_FAILURE_SEC and slot.last_error is None


def test_the_models_differ_only_in_their_emission_temperature():
    assert detector_options("primary") == {"emission_temperature": EMISSION_TEMPERATURE}
    assert detector_options("secondary") == {"emission_temperature": 1.0}
    with pytest.raises(KeyError):
        detector_options("tertiary")
