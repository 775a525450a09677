"""Pure decisions of the AI regime advisor (SPEC sections 6 and 7).

Agreement of an opinion with the mechanical tier, the override rails, when to
ask the panel again, and how right past opinions turned out. Every function
takes ``now`` and its inputs explicitly; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from errors import REFUSED, ActionRefused
from vocabulary import DIRECTIONS, LONG_BIAS, SHORT_BIAS, STOP, SYMMETRIC, TIERS, TierState

AGREE, AI_UPGRADE, AI_DOWNGRADE, AI_FLIP = "agree", "ai_upgrade", "ai_downgrade", "ai_flip"
AGREEMENTS = (AGREE, AI_UPGRADE, AI_DOWNGRADE, AI_FLIP)
# History actions: what became of an opinion.
NONE, PENDING, APPLIED, DISMISSED, EXPIRED, REVERTED = "none", "pending", "applied", "dismissed", "expired", "reverted"
MIN_TTL_SEC = 60.0


def classify_agreement(mech_tier: int, mech_direction: str, ai_tier: int, ai_direction: str) -> str:
    """``agree`` / ``ai_upgrade`` / ``ai_downgrade`` / ``ai_flip`` of an opinion against the mechanical tier."""
    if ai_tier > mech_tier:
        return AI_UPGRADE
    if ai_tier < mech_tier:
        return AI_DOWNGRADE
    return AGREE if ai_direction == mech_direction else AI_FLIP


def agreement_headline(mech_tier: int, mech_direction: str, ai_tier: int, ai_direction: str) -> str:
    """One line saying what the opinion would change: the tier, the direction, or both.

    A direction flip is long_bias against short_bias; tier 0 has no direction,
    so leaving or entering it changes the tier only.
    """
    changes = []
    if ai_tier != mech_tier:
        changes.append("raise the tier" if ai_tier > mech_tier else "lower the tier")
    if {mech_direction, ai_direction} == {LONG_BIAS, SHORT_BIAS}:
        changes.append(f"flip the direction from {mech_direction} to {ai_direction}")
    if not changes:
        return "AI agrees with the mechanical tier"
    return "AI disagrees: it would " + " and ".join(changes)


# ------------------------------------------------------------------ override rails


@dataclass(frozen=True)
class Override:
    """An operator-applied tier that replaces the mechanical one until ``expires_at``."""

    tier: int
    direction: str
    applied_at: float
    expires_at: float
    source_conviction: int
    opinion_ts: float

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        """Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed record."""
        override = cls(
            tier=int(data["tier"]),
            direction=str(data["direction"]),
            applied_at=float(data["applied_at"]),
            expires_at=float(data["expires_at"]),
            source_conviction=int(data["source_conviction"]),
            opinion_ts=float(data.get("opinion_ts", data["applied_at"])),
        )
        if override.tier not in TIERS or override.direction not in DIRECTIONS:
            raise ValueError(f"bad override tier {override.tier} {override.direction}")
        if (override.tier == 0) != (override.direction == SYMMETRIC):
            raise ValueError(f"inconsistent override tier {override.tier} {override.direction}")
        return override


@dataclass(frozen=True)
class Rails:
    min_conviction: int
    default_ttl_sec: float
    max_ttl_sec: float
    max_opinion_age_sec: float  # an older opinion describes a market that has moved on


def opinion_age(opinion: Mapping[str, Any], now: float) -> float:
    """Seconds since the opinion was received."""
    return max(0.0, now - float(opinion["ts"]))


def is_stale(opinion: Mapping[str, Any], now: float, rails: Rails) -> bool:
    return opinion_age(opinion, now) > rails.max_opinion_age_sec


def age_text(age_sec: float, limit_sec: float) -> str:
    """``15 min old (limit 10 min)``; in seconds for a limit under two minutes, or when minutes
    would show the age equal to the limit."""
    age_min, limit_min = round(age_sec / 60.0, 1), round(limit_sec / 60.0, 1)
    if limit_sec >= 120 and age_min > limit_min:
        return f"{age_min:g} min old (limit {limit_min:g} min)"
    return f"{math.ceil(age_sec * 10) / 10:g} s old (limit {limit_sec:g} s)"


@dataclass(frozen=True)
class OverridePlan:
    """What applying the current opinion would do."""

    tier: int
    direction: str
    ttl_sec: float
    tier_clamped: bool
    ttl_clamped: bool

    def message(self, ai_tier: int, mech: TierState) -> str:
        text = f"override applied: tier {self.tier} {self.direction} for {self.ttl_sec:.0f}s"
        if self.tier_clamped:
            text += (
                f" (the AI recommended tier {ai_tier}; an override moves at most one tier from "
                f"the mechanical tier {mech.tier}, so tier {self.tier} was applied)"
            )
        if self.ttl_clamped:
            text += " (ttl_sec clamped to the allowed range)"
        return text


def one_step(mech: TierState, ai_tier: int, ai_direction: str) -> tuple[int, str, bool]:
    """The tier at most one step from the mechanical tier toward the AI's, with its direction.

    A one-step downgrade from tier 2 keeps the mechanical direction when the AI
    wants tier 0 (tier 1 needs a direction); otherwise the AI's direction wins.
    """
    if abs(ai_tier - mech.tier) <= 1:
        return ai_tier, ai_direction, False
    tier = mech.tier + (1 if ai_tier > mech.tier else -1)
    direction = ai_direction if ai_direction != SYMMETRIC else mech.direction
    if tier == 0:
        direction = SYMMETRIC
    return tier, direction, True


def clamp_ttl(ttl_sec: float | None, rails: Rails) -> tuple[float, bool]:
    if ttl_sec is None:
        return rails.default_ttl_sec, False
    clamped = min(rails.max_ttl_sec, max(MIN_TTL_SEC, float(ttl_sec)))
    return clamped, clamped != ttl_sec


def refusal_reason(
    opinion: Mapping[str, Any] | None,
    mech: TierState,
    *,
    now: float,
    dismissed: bool,
    capacity_band: str,
    directional_enabled: bool,
    rails: Rails,
) -> str | None:
    """Why Apply would be refused now, or ``None`` when every rail passes."""
    if opinion is None:
        return "there is no current opinion to apply"
    ai_tier, ai_direction = int(opinion["recommended_tier"]), str(opinion["recommended_direction"])
    if classify_agreement(mech.tier, mech.direction, ai_tier, ai_direction) == AGREE:
        return f"the opinion agrees with the mechanical tier {mech.tier} {mech.direction}: nothing to override"
    if dismissed:
        return "the current opinion was dismissed; wait for the next one"
    if is_stale(opinion, now, rails):
        return f"the opinion is {age_text(opinion_age(opinion, now), rails.max_opinion_age_sec)}; wait for a fresh one"
    if int(opinion["conviction"]) < rails.min_conviction:
        return f"conviction {opinion['conviction']} is below the floor of {rails.min_conviction}"
    if ai_tier > mech.tier and capacity_band == STOP:
        return "capacity band is stop: upgrades are blocked"
    if ai_tier > mech.tier and not directional_enabled:
        return "directional trading is disabled (REGIME_DIRECTIONAL_ENABLED=false): upgrades are blocked"
    return None


def plan_override(
    opinion: Mapping[str, Any] | None,
    mech: TierState,
    *,
    now: float,
    ttl_sec: float | None,
    dismissed: bool,
    capacity_band: str,
    directional_enabled: bool,
    rails: Rails,
) -> OverridePlan:
    """The override that Apply sets, or :class:`ActionRefused` (refused) naming the rail that refused it."""
    reason = refusal_reason(
        opinion,
        mech,
        now=now,
        dismissed=dismissed,
        capacity_band=capacity_band,
        directional_enabled=directional_enabled,
        rails=rails,
    )
    if reason is not None:
        raise ActionRefused(REFUSED, reason)
    assert opinion is not None
    tier, direction, tier_clamped = one_step(mech, opinion["recommended_tier"], opinion["recommended_direction"])
    ttl, ttl_clamped = clamp_ttl(ttl_sec, rails)
    return OverridePlan(tier, direction, ttl, tier_clamped, ttl_clamped)


def override_end(override: Override, mech: TierState, *, capacity_band: str, now: float) -> str | None:
    """Why an active override ends now: ``expired``, ``capacity stop``, or ``None`` to keep it."""
    if now >= override.expires_at:
        return "expired"
    if capacity_band == STOP and override.tier > mech.tier:
        return "capacity stop"
    return None


def effective_state(mech: TierState, override: Override | None) -> tuple[TierState, str]:
    """The tier the rest of the loop uses, and its source (``mechanical`` or ``ai_override``)."""
    if override is None:
        return mech, "mechanical"
    return TierState(override.tier, override.direction, override.applied_at), "ai_override"


# ------------------------------------------------------------------ scheduling


@dataclass
class AdvisorSchedule:
    """When to ask the panel: periodically, at once on events, never closer than the debounce.

    ``observe`` is fed the mechanical tier and the consensus agreement every
    cycle; a change becomes a pending event. ``due`` says whether to run now.
    """

    interval_sec: float
    debounce_sec: float
    last_run: float | None = None
    pending_event: str | None = None
    _tier: tuple[int, str] | None = None
    _agreement: str | None = None

    def observe(self, mech: TierState, agreement: str) -> None:
        key = (mech.tier, mech.direction)
        if self._tier is not None and key != self._tier:
            self.pending_event = "mechanical tier change"
        elif self._agreement is not None and agreement != self._agreement:
            self.pending_event = self.pending_event or "consensus agreement change"
        self._tier, self._agreement = key, agreement

    def due(self, now: float) -> str | None:
        """The reason to run now, or ``None``."""
        if self.last_run is None:
            return "first run"
        if now - self.last_run < self.debounce_sec:
            return None
        if self.pending_event:
            return self.pending_event
        if now - self.last_run >= self.interval_sec:
            return "periodic"
        return None

    def mark_run(self, now: float) -> None:
        self.last_run, self.pending_event = now, None

    def next_run_in(self, now: float) -> float:
        if self.last_run is None:
            return 0.0
        wait = self.debounce_sec if self.pending_event else self.interval_sec
        return max(0.0, self.last_run + wait - now)


# ------------------------------------------------------------------ scorecard


def opinion_was_right(direction: str, price: float, price_after: float, entry_pct: float) -> bool:
    """Did the price move the way the opinion said over the horizon?

    ``long_bias`` is right when it rose, ``short_bias`` when it fell, and
    ``symmetric`` when it stayed within the grid's entry distance (percent).
    """
    move_pct = (price_after - price) / price * 100.0
    if direction == LONG_BIAS:
        return move_pct > 0
    if direction == SHORT_BIAS:
        return move_pct < 0
    return abs(move_pct) <= entry_pct


@dataclass
class Tally:
    scored: int = 0
    hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        rate = None if self.scored == 0 else round(self.hits / self.scored, 4)
        return {"scored": self.scored, "hits": self.hits, "hit_rate": rate}


@dataclass
class Scorecard:
    """Hit rates of past opinions, per panelist and per agreement type.

    An opinion is scored at the first cycle at least ``horizon_sec`` after it;
    one that could only be scored more than ``grace_sec`` late (the bot was
    down) is dropped rather than judged on the wrong price.
    """

    horizon_sec: float
    entry_pct: float
    grace_sec: float = 300.0
    pending: deque[dict[str, Any]] = field(default_factory=deque)
    by_panelist: dict[str, Tally] = field(default_factory=dict)
    by_agreement: dict[str, Tally] = field(default_factory=dict)
    dropped: int = 0

    def add(self, *, ts: float, price: float | None, direction: str, panelist: str, agreement: str) -> None:
        if price is None or not math.isfinite(price) or price <= 0:
            return
        self.pending.append(
            {"ts": ts, "price": price, "direction": direction, "panelist": panelist, "agreement": agreement}
        )

    def score_due(self, now: float, price: float | None) -> list[dict[str, Any]]:
        """Score the opinions whose horizon has passed; returns them with ``price_after`` and ``hit``."""
        scored = []
        while self.pending and now >= self.pending[0]["ts"] + self.horizon_sec:
            entry = self.pending.popleft()
            if now > entry["ts"] + self.horizon_sec + self.grace_sec or price is None or price <= 0:
                self.dropped += 1
                continue
            hit = opinion_was_right(entry["direction"], entry["price"], price, self.entry_pct)
            for table, key in ((self.by_panelist, entry["panelist"]), (self.by_agreement, entry["agreement"])):
                tally = table.setdefault(key, Tally())
                tally.scored += 1
                tally.hits += int(hit)
            scored.append({**entry, "price_after": price, "hit": hit})
        return scored

    def status(self) -> dict[str, Any]:
        return {
            "horizon_sec": self.horizon_sec,
            "scored": sum(t.scored for t in self.by_panelist.values()),
            "pending": len(self.pending),
            "dropped": self.dropped,
            "by_panelist": {k: t.to_dict() for k, t in sorted(self.by_panelist.items())},
            "by_agreement": {k: t.to_dict() for k, t in sorted(self.by_agreement.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "pending": list(self.pending),
            "by_panelist": {k: [t.scored, t.hits] for k, t in self.by_panelist.items()},
            "by_agreement": {k: [t.scored, t.hits] for k, t in self.by_agreement.items()},
            "dropped": self.dropped,
        }

    def load(self, data: Mapping[str, Any]) -> None:
        """Restore counts and pending opinions; raises ``KeyError``/``TypeError``/``ValueError`` if malformed."""
        pending = [
            {
                "ts": float(e["ts"]),
                "price": float(e["price"]),
                "direction": str(e["direction"]),
                "panelist": str(e["panelist"]),
                "agreement": str(e["agreement"]),
            }
            for e in data.get("pending", [])
        ]
        by_panelist = {str(k): Tally(int(v[0]), int(v[1])) for k, v in data.get("by_panelist", {}).items()}
        by_agreement = {str(k): Tally(int(v[0]), int(v[1])) for k, v in data.get("by_agreement", {}).items()}
        self.pending = deque(sorted(pending, key=lambda e: e["ts"]))
        self.by_panelist, self.by_agreement = by_panelist, by_agreement
        self.dropped = int(data.get("dropped", 0))
