"""Pure advisor decisions: agreement, override rails, schedule, scorecard (SPEC sections 6 and 7)."""

from __future__ import annotations

import pytest

from advisor.policy import (
    AdvisorSchedule,
    Override,
    Rails,
    Scorecard,
    agreement_headline,
    clamp_ttl,
    classify_agreement,
    effective_state,
    one_step,
    opinion_was_right,
    override_end,
    plan_override,
    refusal_reason,
)
from errors import ActionRefused
from vocabulary import TierState

RAILS = Rails(min_conviction=50, default_ttl_sec=1800, max_ttl_sec=3600, max_opinion_age_sec=600)
NOW = 10_000.0
SYM, LONG, SHORT = "symmetric", "long_bias", "short_bias"


def mech(tier: int = 0, direction: str = SYM) -> TierState:
    return TierState(tier, direction, 100.0)


def opinion(tier: int, direction: str, conviction: int = 70, age_sec: float = 30.0) -> dict:
    return {"recommended_tier": tier, "recommended_direction": direction, "conviction": conviction,
            "ts": NOW - age_sec}  # fmt: skip


# ---------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("mech_tier", "mech_dir", "ai_tier", "ai_dir", "expected"),
    [
        (0, SYM, 0, SYM, "agree"),
        (1, LONG, 1, LONG, "agree"),
        (2, SHORT, 2, SHORT, "agree"),
        (0, SYM, 1, LONG, "ai_upgrade"),
        (0, SYM, 2, SHORT, "ai_upgrade"),
        (1, LONG, 2, SHORT, "ai_upgrade"),
        (2, LONG, 1, LONG, "ai_downgrade"),
        (2, LONG, 0, SYM, "ai_downgrade"),
        (1, SHORT, 0, SYM, "ai_downgrade"),
        (1, LONG, 1, SHORT, "ai_flip"),
        (2, SHORT, 2, LONG, "ai_flip"),
    ],
)
def test_agreement_matrix(mech_tier, mech_dir, ai_tier, ai_dir, expected):
    assert classify_agreement(mech_tier, mech_dir, ai_tier, ai_dir) == expected


@pytest.mark.parametrize(
    ("mech_tier", "mech_dir", "ai_tier", "ai_dir", "change"),
    [
        (0, SYM, 2, LONG, "raise the tier"),
        (2, SHORT, 0, SYM, "lower the tier"),
        (2, LONG, 1, LONG, "lower the tier"),
        (1, LONG, 1, SHORT, "flip the direction from long_bias to short_bias"),
        (2, SHORT, 2, LONG, "flip the direction from short_bias to long_bias"),
        (1, LONG, 2, SHORT, "raise the tier and flip the direction from long_bias to short_bias"),
        (2, SHORT, 1, LONG, "lower the tier and flip the direction from short_bias to long_bias"),
    ],
)
def test_headline_names_a_direction_flip_with_or_without_a_tier_change(mech_tier, mech_dir, ai_tier, ai_dir, change):
    assert agreement_headline(mech_tier, mech_dir, ai_tier, ai_dir) == f"AI disagrees: it would {change}"
    assert agreement_headline(mech_tier, mech_dir, mech_tier, mech_dir) == "AI agrees with the mechanical tier"


# ---------------------------------------------------------------- rails


def plan(op, m=None, **kwargs):
    args = {"ttl_sec": None, "dismissed": False, "capacity_band": "normal", "directional_enabled": True, "rails": RAILS}
    args.update(kwargs, now=NOW)
    return plan_override(op, m or mech(), **args)


@pytest.mark.parametrize(
    ("op", "m", "kwargs", "reason"),
    [
        (None, mech(), {}, "there is no current opinion to apply"),
        (opinion(1, LONG), mech(1, LONG), {}, "the opinion agrees with the mechanical tier 1 long_bias"),
        (opinion(0, SYM), mech(), {}, "the opinion agrees with the mechanical tier 0 symmetric"),
        (opinion(1, LONG, 49), mech(), {}, "conviction 49 is below the floor of 50"),
        (opinion(1, LONG), mech(), {"capacity_band": "stop"}, "capacity band is stop: upgrades are blocked"),
        (opinion(1, LONG), mech(), {"dismissed": True}, "the current opinion was dismissed"),
        (opinion(1, LONG), mech(), {"directional_enabled": False}, "directional trading is disabled"),
        (opinion(1, LONG, age_sec=900), mech(), {}, "the opinion is 15 min old (limit 10 min); wait for a fresh one"),
        (opinion(1, SHORT, age_sec=610), mech(1, LONG), {}, "the opinion is 10.2 min old (limit 10 min)"),
    ],
)
def test_every_rail_refuses_with_409_and_a_reason(op, m, kwargs, reason):
    with pytest.raises(ActionRefused) as refused:
        plan(op, m, **kwargs)
    assert refused.value.kind == "refused" and str(refused.value).startswith(reason)
    assert refusal_reason(op, m, **{**{"dismissed": False, "capacity_band": "normal", "directional_enabled": True},
                                    **kwargs}, rails=RAILS, now=NOW).startswith(reason)  # fmt: skip


def test_an_opinion_exactly_at_the_age_limit_may_still_be_applied():
    assert plan(opinion(1, LONG, age_sec=600)).tier == 1
    with pytest.raises(ActionRefused, match=r"^the opinion is 600\.5 s old \(limit 600 s\); wait for a fresh one$"):
        plan(opinion(1, LONG, age_sec=600.5))


def test_conviction_exactly_at_the_floor_is_allowed():
    assert plan(opinion(1, LONG, 50)).tier == 1


def test_capacity_stop_allows_downgrades_and_flips():
    assert plan(opinion(0, SYM), mech(2, LONG), capacity_band="stop").tier == 1
    flipped = plan(opinion(1, SHORT), mech(1, LONG), capacity_band="stop")
    assert (flipped.tier, flipped.direction) == (1, SHORT)


@pytest.mark.parametrize(
    ("m", "op", "expected"),
    [
        (mech(0), opinion(2, LONG), (1, LONG, True)),
        (mech(0), opinion(2, SHORT), (1, SHORT, True)),
        (mech(0), opinion(1, SHORT), (1, SHORT, False)),
        (mech(2, LONG), opinion(0, SYM), (1, LONG, True)),  # tier 1 needs a direction: keep mechanical's
        (mech(2, SHORT), opinion(1, SHORT), (1, SHORT, False)),
        (mech(1, LONG), opinion(0, SYM), (0, SYM, False)),
        (mech(2, LONG), opinion(2, SHORT), (2, SHORT, False)),
    ],
)
def test_an_override_moves_at_most_one_tier(m, op, expected):
    assert one_step(m, op["recommended_tier"], op["recommended_direction"]) == expected
    p = plan(op, m)
    assert (p.tier, p.direction, p.tier_clamped) == expected


def test_clamped_plan_says_so():
    p = plan(opinion(2, LONG))
    message = p.message(2, mech())
    assert "applied: tier 1 long_bias for 1800s" in message and "recommended tier 2" in message
    assert "clamped" not in plan(opinion(1, LONG)).message(1, mech())


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [(None, (1800, False)), (600, (600, False)), (10, (60, True)), (-5, (60, True)), (99999, (3600, True))],
)
def test_ttl_defaults_and_clamps(ttl, expected):
    assert clamp_ttl(ttl, RAILS) == expected
    assert (plan(opinion(1, LONG), ttl_sec=ttl).ttl_sec, plan(opinion(1, LONG), ttl_sec=ttl).ttl_clamped) == expected


def make_override(tier=1, direction=LONG, applied_at=1000.0, ttl=1800.0) -> Override:
    return Override(tier, direction, applied_at, applied_at + ttl, 70, applied_at - 5)


def test_override_ends_at_expiry_or_when_capacity_stops_an_upgrade():
    o = make_override()
    assert override_end(o, mech(), capacity_band="normal", now=2799.9) is None
    assert override_end(o, mech(), capacity_band="normal", now=2800.0) == "expired"
    assert override_end(o, mech(), capacity_band="caution", now=1500.0) is None
    assert override_end(o, mech(), capacity_band="stop", now=1500.0) == "capacity stop"
    downgrade = make_override(tier=1, direction=LONG)
    assert override_end(downgrade, mech(2, LONG), capacity_band="stop", now=1500.0) is None
    assert o.remaining(2000.0) == 800.0 and o.remaining(5000.0) == 0.0


def test_effective_state_is_the_override_while_one_is_active():
    m = mech(0)
    assert effective_state(m, None) == (m, "mechanical")
    state, source = effective_state(m, make_override())
    assert (state.tier, state.direction, state.since, source) == (1, LONG, 1000.0, "ai_override")


def test_override_record_round_trip_and_validation():
    o = make_override()
    assert Override.from_dict(o.to_dict()) == o
    for bad in (
        {**o.to_dict(), "tier": 3},
        {**o.to_dict(), "direction": "sideways"},
        {**o.to_dict(), "tier": 0},  # tier 0 must be symmetric
        {**o.to_dict(), "tier": 1, "direction": SYM},
        {k: v for k, v in o.to_dict().items() if k != "expires_at"},
        {**o.to_dict(), "applied_at": "yesterday"},
    ):
        with pytest.raises((KeyError, TypeError, ValueError)):
            Override.from_dict(bad)


# ---------------------------------------------------------------- schedule


def test_schedule_first_run_then_periodic():
    s = AdvisorSchedule(interval_sec=300, debounce_sec=60)
    s.observe(mech(), "full")
    assert s.due(0.0) == "first run"
    s.mark_run(0.0)
    assert s.due(299.0) is None and s.next_run_in(100.0) == 200.0
    assert s.due(300.0) == "periodic"


def test_tier_change_triggers_at_once_but_not_within_the_debounce():
    s = AdvisorSchedule(interval_sec=300, debounce_sec=60)
    s.observe(mech(), "full")
    s.mark_run(0.0)
    s.observe(mech(1, LONG), "full")
    assert s.due(30.0) is None  # debounced
    assert s.next_run_in(30.0) == 30.0
    assert s.due(60.0) == "mechanical tier change"
    s.mark_run(60.0)
    assert s.due(61.0) is None and s.pending_event is None


def test_consensus_agreement_change_triggers_a_run():
    s = AdvisorSchedule(interval_sec=300, debounce_sec=60)
    s.observe(mech(), "full")
    s.mark_run(0.0)
    s.observe(mech(), "full")
    assert s.due(100.0) is None
    s.observe(mech(), "conflict")
    assert s.due(100.0) == "consensus agreement change"


def test_a_direction_flip_at_the_same_tier_is_a_tier_change():
    s = AdvisorSchedule(interval_sec=300, debounce_sec=0)
    s.observe(mech(1, LONG), "full")
    s.mark_run(0.0)
    s.observe(mech(1, SHORT), "full")
    assert s.due(1.0) == "mechanical tier change"


def test_a_tier_change_is_not_forgotten_when_the_agreement_also_changes():
    s = AdvisorSchedule(interval_sec=300, debounce_sec=60)
    s.observe(mech(), "full")
    s.mark_run(0.0)
    s.observe(mech(1, LONG), "full")
    s.observe(mech(1, LONG), "conflict")
    assert s.due(60.0) == "mechanical tier change"


# ---------------------------------------------------------------- scorecard


@pytest.mark.parametrize(
    ("direction", "after", "right"),
    [
        (LONG, 101.0, True),
        (LONG, 100.0, False),
        (LONG, 99.0, False),
        (SHORT, 99.0, True),
        (SHORT, 101.0, False),
        (SYM, 100.3, True),  # within the 0.35% entry distance
        (SYM, 99.65, True),
        (SYM, 100.4, False),
        (SYM, 99.5, False),
    ],
)
def test_opinion_was_right(direction, after, right):
    assert opinion_was_right(direction, 100.0, after, entry_pct=0.35) is right


def test_scorecard_scores_after_the_horizon_per_panelist_and_agreement():
    card = Scorecard(horizon_sec=1800, entry_pct=0.35)
    card.add(ts=0.0, price=100.0, direction=LONG, panelist="kimi", agreement="ai_upgrade")
    card.add(ts=60.0, price=100.0, direction=SYM, panelist="llama70b", agreement="agree")
    card.add(ts=120.0, price=None, direction=SYM, panelist="kimi", agreement="agree")  # no price: not scored
    assert card.score_due(1799.0, 102.0) == []
    (first,) = card.score_due(1800.0, 102.0)
    assert first["hit"] is True and first["price_after"] == 102.0
    (second,) = card.score_due(1860.0, 102.0)
    assert second["hit"] is False
    status = card.status()
    assert status["scored"] == 2 and status["pending"] == 0
    assert status["by_panelist"] == {
        "kimi": {"scored": 1, "hits": 1, "hit_rate": 1.0},
        "llama70b": {"scored": 1, "hits": 0, "hit_rate": 0.0},
    }
    assert status["by_agreement"]["agree"] == {"scored": 1, "hits": 0, "hit_rate": 0.0}


def test_scorecard_drops_opinions_it_could_only_score_late_and_round_trips():
    card = Scorecard(horizon_sec=1800, entry_pct=0.35, grace_sec=300)
    card.add(ts=0.0, price=100.0, direction=LONG, panelist="kimi", agreement="agree")
    card.add(ts=5000.0, price=100.0, direction=SHORT, panelist="kimi", agreement="ai_flip")
    assert card.score_due(2101.0, 150.0) == []  # the bot was down: 301 s late
    assert card.dropped == 1 and card.status()["pending"] == 1
    copy = Scorecard(horizon_sec=1800, entry_pct=0.35)
    copy.load(card.to_dict())
    assert copy.to_dict() == card.to_dict()
    (scored,) = copy.score_due(6800.0, 90.0)
    assert scored["hit"] is True
    assert copy.status()["by_agreement"] == {"ai_flip": {"scored": 1, "hits": 1, "hit_rate": 1.0}}
    with pytest.raises((KeyError, TypeError, ValueError)):
        copy.load({"pending": [{"ts": "x"}]})
