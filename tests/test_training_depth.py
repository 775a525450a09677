from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import make_settings

from regime.training_depth import (
    QUALITY_TIERS,
    decay_copies,
    decay_weights,
    quality_tier,
    retrain_reason,
    tier_rank,
    training_depth,
)

NOW = 1_767_225_600.0


def test_default_training_targets():
    s = make_settings()
    assert s.HMM_TRAINING_CANDLES == 4000
    assert s.HMM_SECONDARY_TRAINING_CANDLES == 1440
    assert s.HMM_MIN_TRAIN_SAMPLES == 500
    assert s.HMM_SECONDARY_MIN_TRAIN_SAMPLES == 200
    assert s.HMM_DEEP_DECAY_ENABLED is False
    assert s.HMM_DEEP_DECAY_HALFLIFE == 1440


@pytest.mark.parametrize(
    ("current", "tier", "modifier"),
    [
        (499, None, None),
        (500, "shallow", 0.70),
        (999, "shallow", 0.70),
        (1000, "baseline", 0.85),
        (2499, "baseline", 0.85),
        (2500, "deep", 0.95),
        (3999, "deep", 0.95),
        (4000, "full", 1.00),
        (9000, "full", 1.00),
    ],
)
def test_tier_edges_with_default_target(current, tier, modifier):
    got = quality_tier(current, 4000, 500)
    if tier is None:
        assert got is None
    else:
        assert (got.name, got.confidence_modifier) == (tier, modifier)


def test_secondary_edges_with_default_target():
    # 1440 target: 360 / 900 / 1440, minimum 200.
    assert quality_tier(199, 1440, 200) is None
    assert quality_tier(200, 1440, 200).name == "shallow"
    assert quality_tier(359, 1440, 200).name == "shallow"
    assert quality_tier(360, 1440, 200).name == "baseline"
    assert quality_tier(899, 1440, 200).name == "baseline"
    assert quality_tier(900, 1440, 200).name == "deep"
    assert quality_tier(1439, 1440, 200).name == "deep"
    assert quality_tier(1440, 1440, 200).name == "full"


def test_rollback_target_720_makes_720_full():
    assert quality_tier(720, 720, 500).name == "full"
    assert quality_tier(720, 720, 500).confidence_modifier == 1.0


def test_tier_table_and_colours():
    assert [(t.name, t.confidence_modifier, t.colour) for t in QUALITY_TIERS] == [
        ("shallow", 0.70, "grey"),
        ("baseline", 0.85, "yellow"),
        ("deep", 0.95, "lightgreen"),
        ("full", 1.00, "green"),
    ]
    assert tier_rank(None) < tier_rank("shallow") < tier_rank("baseline") < tier_rank("deep") < tier_rank("full")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_training_depth_block_schema_primary():
    d = training_depth(
        current=2400,
        target=4000,
        min_samples=500,
        available=2400,
        interval_sec=60,
        now=NOW,
        raw_samples=2365,
        effective_samples=2365,
    ).to_dict()
    assert set(d) == {
        "current_candles",
        "target_candles",
        "quality_tier",
        "confidence_modifier",
        "pct_complete",
        "estimated_full_at",
        "estimated_full_in_sec",
        "available_candles",
        "raw_samples",
        "effective_samples",
    }
    assert d["current_candles"] == 2400
    assert d["target_candles"] == 4000
    assert d["quality_tier"] == "baseline"
    assert d["confidence_modifier"] == 0.85
    assert d["pct_complete"] == 60.0
    assert d["estimated_full_at"] == _iso(NOW + 1600 * 60)
    assert d["estimated_full_in_sec"] == 1600 * 60


def test_training_depth_block_schema_secondary():
    d = training_depth(current=720, target=1440, min_samples=200, available=725, interval_sec=900, now=NOW).to_dict()
    assert d["quality_tier"] == "baseline"
    assert d["pct_complete"] == 50.0
    # Counted from what the store holds: 715 more 15-minute candles.
    assert d["estimated_full_at"] == _iso(NOW + 715 * 900)


def test_estimated_full_at_is_null_when_full():
    d = training_depth(current=4000, target=4000, min_samples=500, available=4100, interval_sec=60, now=NOW)
    assert d.quality_tier == "full"
    assert d.estimated_full_at is None and d.estimated_full_in_sec is None
    assert d.pct_complete == 100.0


def test_below_minimum_has_no_tier_and_no_trust():
    d = training_depth(current=0, target=4000, min_samples=500, available=300, interval_sec=60, now=NOW)
    assert d.quality_tier is None
    assert d.confidence_modifier == 0.0
    assert d.estimated_full_at == _iso(NOW + 3700 * 60)


def test_pct_complete_has_one_decimal():
    d = training_depth(current=1234, target=4000, min_samples=500, available=1234, interval_sec=60, now=NOW)
    assert d.pct_complete == 30.9


def test_retrain_reasons():
    common = {"target": 4000, "min_samples": 500, "interval_sec": 86400.0}
    assert retrain_reason(trained_candles=None, last_trained_at=None, available=499, now=NOW, **common) is None
    assert retrain_reason(trained_candles=None, last_trained_at=None, available=720, now=NOW, **common) == "initial"
    # Same tier, not yet a day: nothing.
    assert retrain_reason(trained_candles=720, last_trained_at=NOW, available=999, now=NOW + 100, **common) is None
    # Crossing into a better tier retrains at once.
    assert (
        retrain_reason(trained_candles=720, last_trained_at=NOW, available=1000, now=NOW + 100, **common)
        == "tier_improvement"
    )
    assert (
        retrain_reason(trained_candles=720, last_trained_at=NOW, available=900, now=NOW + 86400, **common)
        == "scheduled"
    )
    # Full stays full: the daily schedule only.
    assert retrain_reason(trained_candles=4000, last_trained_at=NOW, available=9000, now=NOW + 3600, **common) is None


def test_decay_weights_formula():
    w = decay_weights(5, 2.0)
    assert w[-1] == 1.0
    np.testing.assert_allclose(w, [2 ** (-4 / 2), 2 ** (-3 / 2), 2 ** (-2 / 2), 2 ** (-1 / 2), 1.0])


def test_decay_resampling_keeps_order_and_favours_recent_rows():
    n = 4000
    copies = decay_copies(n, 1440)
    assert len(copies) == n
    assert copies.min() >= 1  # every row at least once
    assert copies[0] == 1  # the oldest exactly once
    assert np.all(np.diff(copies) >= 0)  # never fewer copies for a newer row
    resampled = np.repeat(np.arange(n), copies)  # what the detector trains on, as row indices
    assert np.all(np.diff(resampled) >= 0)  # sequence order kept
    newer, older = (resampled >= n // 2).sum(), (resampled < n // 2).sum()
    assert newer > older
    # Copies proportional to the weight: the newest gets ~2^((n-1)/h) times the oldest.
    assert copies[-1] == round(2 ** ((n - 1) / 1440))
    assert int(copies.sum()) > n


def test_decay_copies_are_capped_for_long_histories():
    copies = decay_copies(20_000, 100)
    assert copies.max() == 8
    assert copies.min() == 1
