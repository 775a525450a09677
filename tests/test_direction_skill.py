"""The direction skill record: non-overlapping calls scored an hour later, decayed, bounded from below."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from regime.direction_skill import (
    Call,
    DirectionSkill,
    SkillSettings,
    earned,
    from_dict,
    lower_bound,
    observe,
    to_dict,
)

S = SkillSettings(horizon_sec=3600.0, halflife_calls=168.0, z=1.0, tier2_hit_rate=0.7)
T0 = 1_767_225_600.0


def test_a_call_is_scored_against_the_price_one_horizon_later():
    skill = observe(DirectionSkill(), T0, 1.00, +1, S)
    assert skill.pending == Call(T0, 1, 1.00) and skill.samples == 0
    skill = observe(skill, T0 + 3599, 1.10, +1, S)
    assert skill.samples == 0  # not yet
    skill = observe(skill, T0 + 3600, 1.01, -1, S)
    assert (skill.hits, skill.misses, skill.scored) == (1.0, 0.0, 1)
    # a new call is taken in the same cycle, so calls follow each other without overlapping
    assert skill.pending == Call(T0 + 3600, -1, 1.01)
    skill = observe(skill, T0 + 7200, 1.02, 0, S)
    assert (skill.hits, skill.misses, skill.scored) == (pytest.approx(0.5 ** (1 / 168)), 1.0, 2)
    assert skill.pending is None


def test_no_call_without_a_direction_and_an_unchanged_price_scores_nothing():
    skill = observe(DirectionSkill(), T0, 1.0, 0, S)
    assert skill == DirectionSkill()
    skill = observe(observe(skill, T0, 1.0, -1, S), T0 + 3600, 1.0, 0, S)
    assert skill.scored == 0 and skill.pending is None
    assert observe(skill, T0 + 3660, None, 1, S) == skill  # no price: nothing happens


def test_calls_are_taken_at_most_once_per_horizon():
    skill = DirectionSkill()
    taken = []
    for minute in range(0, 600):
        skill = observe(skill, T0 + 60 * minute, 1.0 + 0.001 * minute, 1, S)
        if skill.pending is not None and (not taken or taken[-1] != skill.pending.ts):
            taken.append(skill.pending.ts)
    assert np.diff(taken).min() >= 3600
    assert skill.scored == 9 and skill.hits == pytest.approx(sum(0.5 ** (k / 168) for k in range(9)))


def test_a_coin_earns_nothing_and_real_skill_earns_its_way_up():
    rng = np.random.default_rng(3)

    def run(p_hit: float, calls: int) -> DirectionSkill:
        skill, price = DirectionSkill(), 1.0
        for k in range(calls):
            sign = 1 if rng.random() < 0.5 else -1
            skill = observe(skill, T0 + k * 3600, price, sign, S)
            price *= 1.01 if (rng.random() < p_hit) == (sign > 0) else 0.99
        return skill

    coin = run(0.5, 600)
    assert earned(coin, S) == 0.0
    assert abs(coin.hit_rate - 0.5) < 0.08
    good = run(0.8, 600)
    assert good.hit_rate > 0.7 and earned(good, S) == 1.0
    fair = run(0.62, 600)
    assert 0.0 < earned(fair, S) < 1.0


def test_the_lower_bound_is_wilsons():
    skill = DirectionSkill(hits=60.0, misses=40.0, scored=100)
    n, p, z = 100, 0.6, 1.0
    expected = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert lower_bound(skill, 1.0) == pytest.approx(expected)
    assert lower_bound(DirectionSkill(), 1.0) is None and earned(DirectionSkill(), S) == 0.0


def test_the_record_survives_a_snapshot_and_bad_records_are_refused():
    skill = observe(observe(DirectionSkill(), T0, 1.0, 1, S), T0 + 3600, 1.1, -1, S)
    data = json.loads(json.dumps(to_dict(skill)))
    assert from_dict(data, T0 + 3600) == skill
    for spoil in (
        lambda d: d.update(hits=math.nan),
        lambda d: d.update(misses=-1.0),
        lambda d: d["pending"].update(sign=3),
        lambda d: d["pending"].update(price=0.0),
        lambda d: d.update(last_call_at=T0 + 10**9),
        lambda d: d.pop("scored"),
    ):
        bad = json.loads(json.dumps(data))
        spoil(bad)
        with pytest.raises((ValueError, KeyError, TypeError)):
            from_dict(bad, T0 + 3600)
    with pytest.raises(ValueError):
        from_dict([1, 2], T0)
