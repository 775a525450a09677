"""How well the regime signal has called direction lately: the skill that directional postures must earn.

Pure bookkeeping, no clock and no I/O (``now`` and prices are arguments). Each
cycle the bot shows :func:`observe` the price and the direction the policy
signal alone would trade (``+1`` long, ``-1`` short, ``0`` none), whether or not
a tier acts on it. A call is taken at most once per ``horizon_sec``, so the
calls scored never overlap and count as separate evidence, and is scored
``horizon_sec`` later against the sign of the price change (an unchanged price
scores nothing). Hits and misses decay with a half-life counted in calls, so
the record follows the market the bot trades now.

:func:`earned` turns the record into how far the directional postures may act:
0 until the lower confidence bound of the hit rate (Wilson, ``z`` standard
errors) is above a coin's 0.5, rising to 1 where it reaches
``tier2_hit_rate``, the rate at which a one-sided grid pays. Tier 1's skew is
scaled by it, and tier 2 needs it at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SkillSettings:
    horizon_sec: float = 3600.0
    halflife_calls: float = 168.0  # a week of hourly calls
    z: float = 2.0  # two standard errors: a record that a coin would match 1 time in 40 earns nothing
    tier2_hit_rate: float = 0.7


@dataclass(frozen=True)
class Call:
    ts: float
    sign: int  # +1 long, -1 short
    price: float


@dataclass(frozen=True)
class DirectionSkill:
    hits: float = 0.0  # decayed counts of scored calls
    misses: float = 0.0
    scored: int = 0  # calls scored so far (not decayed)
    pending: Call | None = None
    last_call_at: float | None = None

    @property
    def samples(self) -> float:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.samples if self.samples > 0 else None


def observe(skill: DirectionSkill, now: float, price: float | None, sign: int, s: SkillSettings) -> DirectionSkill:
    """``skill`` after one more cycle: score the pending call once its horizon has passed, take a new one."""
    if price is None or not (price > 0 and math.isfinite(price)):
        return skill
    hits, misses, scored, pending, last = skill.hits, skill.misses, skill.scored, skill.pending, skill.last_call_at
    if pending is not None and now - pending.ts >= s.horizon_sec:
        move = price - pending.price
        if move != 0:
            keep = 0.5 ** (1.0 / s.halflife_calls)
            hit = (move > 0) == (pending.sign > 0)
            hits, misses, scored = hits * keep + hit, misses * keep + (not hit), scored + 1
        pending = None
    if sign and pending is None and (last is None or now - last >= s.horizon_sec):
        pending, last = Call(now, 1 if sign > 0 else -1, price), now
    return DirectionSkill(hits, misses, scored, pending, last)


def lower_bound(skill: DirectionSkill, z: float) -> float | None:
    """Wilson lower bound of the hit rate (``None`` before any call was scored)."""
    n = skill.samples
    if n <= 0:
        return None
    p = skill.hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def earned(skill: DirectionSkill, s: SkillSettings) -> float:
    """How far directional postures may act, 0..1 (see the module docstring)."""
    low = lower_bound(skill, s.z)
    if low is None or s.tier2_hit_rate <= 0.5:
        return 0.0
    return min(1.0, max(0.0, (low - 0.5) / (s.tier2_hit_rate - 0.5)))


def status(skill: DirectionSkill, s: SkillSettings) -> dict[str, Any]:
    low = lower_bound(skill, s.z)
    return {
        "horizon_sec": s.horizon_sec,
        "scored": skill.scored,
        "weight": round(skill.samples, 3),
        "hit_rate": None if skill.hit_rate is None else round(skill.hit_rate, 4),
        "lower_bound": None if low is None else round(low, 4),
        "tier2_hit_rate": s.tier2_hit_rate,
        "earned": round(earned(skill, s), 4),
        "pending_since": skill.pending.ts if skill.pending else None,
    }


def to_dict(skill: DirectionSkill) -> dict[str, Any]:
    p = skill.pending
    return {
        "hits": skill.hits,
        "misses": skill.misses,
        "scored": skill.scored,
        "pending": None if p is None else {"ts": p.ts, "sign": p.sign, "price": p.price},
        "last_call_at": skill.last_call_at,
    }


def from_dict(data: Any, now: float) -> DirectionSkill:
    """The record of :func:`to_dict`; raises ``ValueError`` (or ``TypeError``/``KeyError``) on a bad one.

    Values are checked, not trusted: counts finite and non-negative, times not after ``now``.
    """
    if not isinstance(data, dict):
        raise ValueError("the direction skill record is not an object")
    hits, misses, scored = float(data["hits"]), float(data["misses"]), int(data["scored"])
    if not all(math.isfinite(x) and x >= 0 for x in (hits, misses)) or scored < 0:
        raise ValueError("the direction skill counts are not finite non-negative numbers")
    last = data.get("last_call_at")
    last = None if last is None else float(last)
    pending = None
    raw = data.get("pending")
    if raw is not None:
        pending = Call(float(raw["ts"]), int(raw["sign"]), float(raw["price"]))
        if pending.sign not in (-1, 1) or not (math.isfinite(pending.price) and pending.price > 0):
            raise ValueError("the pending direction call is malformed")
    for t in (last, pending.ts if pending else None):
        if t is not None and not (math.isfinite(t) and t <= now):
            raise ValueError("a direction skill time is not finite or lies in the future")
    return DirectionSkill(hits, misses, scored, pending, last)
