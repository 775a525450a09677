import pytest

from regime.policy import NO_SIGNAL, RegimeHistory, TierSettings, entry_size, next_tier, policy_signal
from vocabulary import BEARISH, BULLISH, LONG_BIAS, RANGING, SHORT_BIAS, SYMMETRIC, RegimeSignal, TierState

T0 = 1_767_225_600.0
SETTINGS = TierSettings(
    tier1_confidence=0.20,
    tier2_confidence=0.50,
    tier1_bias_floor=0.10,
    tier2_bias_floor=0.25,
    hysteresis=0.05,
    min_dwell_sec=300.0,
)


def sig(regime: str, conf: float, bias: float) -> RegimeSignal:
    return RegimeSignal(regime, conf, bias, None)


def consensus(primary, secondary):
    return policy_signal(primary, secondary, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.20, rule="table")


# consensus rules -------------------------------------------------------------


def test_primary_rule_is_the_1m_model_alone_even_with_a_trained_secondary():
    bull, bear = sig(BULLISH, 0.6, 0.7), sig(BEARISH, 0.9, -0.9)
    p = policy_signal(bull, bear, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.20)  # the default rule
    assert (p.rule, p.source, p.agreement, p.regime, p.confidence, p.bias_signal) == (
        "primary", "primary", None, BULLISH, 0.6, 0.7,
    )  # fmt: skip
    ranging = policy_signal(sig(RANGING, 0.8, 0.0), bull, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.2)
    assert (ranging.regime, ranging.confidence, ranging.bias_signal) == (RANGING, 0.8, 0.0)  # no 15m direction


def test_table_rule_is_named_and_an_unknown_rule_is_refused():
    assert consensus(sig(BULLISH, 0.4, 0.5), sig(BULLISH, 0.7, 0.9)).rule == "table"
    assert consensus(sig(BULLISH, 0.4, 0.5), None).rule == "table"  # passing through, still under the table
    with pytest.raises(ValueError, match="unknown consensus rule"):
        policy_signal(NO_SIGNAL, None, weight_1m=0.3, weight_15m=0.7, tier1_confidence=0.2, rule="vote")


# consensus table ------------------------------------------------------------


def test_primary_passes_through_without_secondary():
    p = consensus(sig(BULLISH, 0.6, 0.7), None)
    assert (p.source, p.agreement, p.regime, p.confidence, p.bias_signal) == ("primary", None, BULLISH, 0.6, 0.7)


def test_same_regime_is_full_agreement():
    p = consensus(sig(BULLISH, 0.4, 0.5), sig(BULLISH, 0.7, 0.9))
    assert p.agreement == "full"
    assert p.confidence == 0.7  # max of the two
    assert p.bias_signal == pytest.approx(0.3 * 0.5 + 0.7 * 0.9)
    assert p.regime == BULLISH


def test_full_agreement_weights_are_normalised():
    p = policy_signal(
        sig(BEARISH, 0.4, -0.2), sig(BEARISH, 0.5, -0.8), weight_1m=1.0, weight_15m=3.0, tier1_confidence=0.2,
        rule="table",
    )  # fmt: skip
    assert p.bias_signal == pytest.approx((1.0 * -0.2 + 3.0 * -0.8) / 4.0)


def test_secondary_ranging_is_15m_neutral():
    p = consensus(sig(BULLISH, 0.9, 0.9), sig(RANGING, 0.8, 0.05))
    assert (p.agreement, p.confidence, p.bias_signal, p.regime) == ("15m_neutral", 0.0, 0.0, RANGING)


def test_primary_ranging_is_1m_cooling():
    p = consensus(sig(RANGING, 0.8, 0.0), sig(BEARISH, 0.6, -0.7))
    assert p.agreement == "1m_cooling"
    assert p.confidence == pytest.approx(0.3)
    assert p.bias_signal == pytest.approx(-0.35)
    assert p.regime == BEARISH


def test_opposite_directions_conflict():
    p = consensus(sig(BULLISH, 0.9, 0.9), sig(BEARISH, 0.9, -0.9))
    assert (p.agreement, p.confidence, p.bias_signal, p.regime) == ("conflict", 0.0, 0.0, RANGING)


def test_effective_regime_is_ranging_below_tier1_threshold():
    p = consensus(sig(RANGING, 0.9, 0.0), sig(BULLISH, 0.3, 0.4))  # 1m cooling: conf 0.15 < 0.20
    assert p.confidence == pytest.approx(0.15)
    assert p.regime == RANGING


def test_both_ranging_stays_ranging_even_with_a_bias():
    p = consensus(sig(RANGING, 0.5, 0.3), sig(RANGING, 0.6, 0.3))
    assert p.agreement == "full"
    assert p.regime == RANGING


def test_untrained_primary_with_trained_secondary_is_cooling():
    p = consensus(NO_SIGNAL, sig(BULLISH, 0.8, 0.9))
    assert p.agreement == "1m_cooling"


# mechanical tier ------------------------------------------------------------


def step(state, eff, bias, regime, now, band="normal", settings=SETTINGS):
    return next_tier(
        state, effective_confidence=eff, bias_signal=bias, regime=regime, capacity_band=band, settings=settings, now=now
    )


START = TierState(0, SYMMETRIC, T0 - 10_000)


@pytest.mark.parametrize(
    ("eff", "bias", "regime", "tier", "direction"),
    [
        (0.60, 0.30, BULLISH, 2, LONG_BIAS),
        (0.50, 0.25, BULLISH, 2, LONG_BIAS),  # both edges inclusive
        (0.60, -0.30, BEARISH, 2, SHORT_BIAS),
        (0.60, 0.24, BULLISH, 1, LONG_BIAS),  # tier-2 bias floor not met
        (0.49, 0.90, BULLISH, 1, LONG_BIAS),
        (0.20, 0.10, BULLISH, 1, LONG_BIAS),
        (0.19, 0.90, BULLISH, 0, SYMMETRIC),
        (0.90, 0.09, BULLISH, 0, SYMMETRIC),  # tier-1 bias floor not met
        (0.90, 0.90, RANGING, 0, SYMMETRIC),  # not directional
    ],
)
def test_upgrade_thresholds_and_bias_floors(eff, bias, regime, tier, direction):
    d = step(START, eff, bias, regime, T0)
    assert (d.state.tier, d.state.direction) == (tier, direction)
    assert d.changed == (tier != 0)


def test_raw_055_at_shallow_gives_tier_1_not_2():
    raw, shallow = 0.55, 0.70
    effective = raw * shallow
    assert effective == pytest.approx(0.385)
    assert step(START, effective, 0.6, BULLISH, T0).state.tier == 1
    assert step(START, raw, 0.6, BULLISH, T0).state.tier == 2  # what the raw value would have done


def test_hysteresis_holds_until_below_threshold_minus_margin():
    at2 = TierState(2, LONG_BIAS, T0 - 1000)
    held = step(at2, 0.46, 0.5, BULLISH, T0)
    assert not held.changed and held.state.tier == 2 and held.reason == "hysteresis"
    assert held.wanted_tier == 1
    down = step(at2, 0.44, 0.5, BULLISH, T0)
    assert down.changed and down.state.tier == 1
    assert "0.45" in down.reason and "hysteresis" in down.reason

    at1 = TierState(1, SHORT_BIAS, T0 - 1000)
    assert step(at1, 0.16, -0.5, BEARISH, T0).state.tier == 1
    assert step(at1, 0.14, -0.5, BEARISH, T0).state.tier == 0


def test_losing_the_direction_downgrades_without_margin():
    at2 = TierState(2, LONG_BIAS, T0 - 1000)
    d = step(at2, 0.60, 0.0, RANGING, T0)
    assert d.changed and d.state == TierState(0, SYMMETRIC, T0)
    assert "RANGING" in d.reason


def test_direction_flip_at_the_same_tier():
    at2 = TierState(2, LONG_BIAS, T0 - 1000)
    d = step(at2, 0.70, -0.8, BEARISH, T0)
    assert d.changed and d.state == TierState(2, SHORT_BIAS, T0)
    assert "flip" in d.reason


def test_dwell_blocks_any_change_for_min_dwell_sec():
    just_changed = TierState(1, LONG_BIAS, T0)
    up = step(just_changed, 0.9, 0.9, BULLISH, T0 + 299)
    assert not up.changed and up.state.tier == 1 and up.reason.startswith("dwell")
    down = step(just_changed, 0.0, 0.0, RANGING, T0 + 299)
    assert not down.changed and down.state.tier == 1
    assert step(just_changed, 0.9, 0.9, BULLISH, T0 + 300).state.tier == 2


def test_capacity_stop_blocks_every_upgrade_but_not_downgrades():
    d = step(START, 0.9, 0.9, BULLISH, T0, band="stop")
    assert not d.changed and d.state.tier == 0 and "capacity stop" in d.reason
    at1 = TierState(1, LONG_BIAS, T0 - 1000)
    assert step(at1, 0.9, 0.9, BULLISH, T0, band="stop").state.tier == 1
    assert step(at1, 0.0, 0.0, RANGING, T0, band="stop").state.tier == 0
    assert step(at1, 0.9, 0.9, BULLISH, T0, band="caution").state.tier == 2


def test_capacity_stop_still_lets_the_side_flip_without_stepping_up():
    at1 = TierState(1, LONG_BIAS, T0 - 1000)
    d = step(at1, 0.9, -0.9, BEARISH, T0, band="stop")
    assert d.changed and d.state == TierState(1, SHORT_BIAS, T0)


def test_steady_state_reports_no_change():
    at1 = TierState(1, LONG_BIAS, T0 - 1000)
    d = step(at1, 0.3, 0.3, BULLISH, T0)
    assert not d.changed and d.state is at1 and d.reason == ""


# history ---------------------------------------------------------------------


def test_history_population_and_30_minute_trim():
    h = RegimeHistory(1800.0)
    for i in range(61):  # one evaluation a minute for an hour
        h.append(T0 + 60 * i, BULLISH if i % 2 else RANGING, 0.5)
    entries = h.to_list()
    assert entries[-1] == {"ts": T0 + 3600, "regime": RANGING, "conf": 0.5}
    assert entries[0]["ts"] == T0 + 3600 - 1800  # exactly 30 minutes back is kept
    assert len(entries) == 31
    h.trim(T0 + 3600 + 1800 + 1)
    assert len(h) == 0


def test_directional_tiers_act_only_as_far_as_the_direction_skill_earns():
    strong = dict(eff=0.9, bias=0.9, regime=BULLISH)
    none = step_skill(START, T0, skill=0.0, **strong)
    assert none.state.tier == 0 and not none.changed and none.wanted_tier == 2
    assert none.reason == "direction calls have not earned tier 2"
    some = step_skill(START, T0, skill=0.4, **strong)
    assert (some.state.tier, some.state.direction, some.wanted_tier) == (1, LONG_BIAS, 2)
    held = step_skill(some.state, T0 + 600, skill=0.4, **strong)
    assert not held.changed and held.reason == "direction calls have not earned tier 2"
    full = step_skill(some.state, T0 + 600, skill=1.0, **strong)
    assert full.state.tier == 2


def test_losing_the_direction_skill_downgrades_without_margin():
    tier2 = TierState(2, LONG_BIAS, T0 - 10_000)
    d = step_skill(tier2, T0, skill=0.5, eff=0.9, bias=0.9, regime=BULLISH)
    assert d.changed and d.state.tier == 1
    assert d.reason == "downgrade to tier 1: the direction calls have not earned tier 2"
    d = step_skill(d.state, T0 + 600, skill=0.0, eff=0.9, bias=0.9, regime=BULLISH)
    assert d.state == TierState(0, SYMMETRIC, T0 + 600)


def step_skill(state, now, *, skill, eff, bias, regime):
    return next_tier(
        state, effective_confidence=eff, bias_signal=bias, regime=regime, capacity_band="normal",
        settings=SETTINGS, now=now, skill=skill,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("probabilities", "size"),
    [(None, 1.0), ((0.1, 0.8, 0.1), 1.0), ((0.2, 0.51, 0.29), 1.0), ((0.25, 0.5, 0.25), 0.5), ((0.7, 0.2, 0.1), 0.5),
     ((0.0, 0.3, 0.7), 0.5)],
)  # fmt: skip
def test_the_grid_trades_smaller_while_a_directional_regime_is_at_least_as_likely(probabilities, size):
    assert entry_size(probabilities, share=0.5) == size
    assert entry_size(probabilities, share=1.0) == 1.0
