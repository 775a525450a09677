"""Pure regime policy: consensus of the two models, mechanical tier gating,
and the 30-minute regime history (SPEC section 5).

Nothing here reads a clock or does I/O; ``now`` is always an argument.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vocabulary import (
    BEARISH,
    BULLISH,
    LONG_BIAS,
    RANGING,
    SHORT_BIAS,
    STOP,
    SYMMETRIC,
    PolicySignal,
    RegimeSignal,
    TierState,
)

NO_SIGNAL = RegimeSignal(RANGING, 0.0, 0.0, None)
"""The signal of an untrained model: ranging, no confidence, no bias."""


CONSENSUS_RULES = ("primary", "table")
"""How the two models make the policy signal (SPEC section 5; README "Consensus rule").

``primary``: the 1m model alone sets the tiers; the 15m model is shown and
goes to the advisor. Chosen by measurement (research/consensus_sim.py and
research/real_files.py): on the simulator it gives tier >= 1 a direction
precision of 0.80 against 0.64 for the table, with false alarms at 0.11
against 0.24, and on the real files the best or equal hit rate on five of
six. ``table``: SPEC section 5's starting table, the 15m sets direction and
the 1m timing; kept so an operator can go back to it.
"""


def policy_signal(
    primary: RegimeSignal,
    secondary: RegimeSignal | None,
    *,
    weight_1m: float,
    weight_15m: float,
    tier1_confidence: float,
    rule: str = "primary",
) -> PolicySignal:
    """The signal tier gating acts on, by the consensus ``rule`` (:data:`CONSENSUS_RULES`).

    ``primary``: the 1m model passes through. ``table``: the 15m sets
    direction, the 1m timing (SPEC section 5). Without a trained secondary
    (``None``) the primary passes through under either rule.
    """
    if rule not in CONSENSUS_RULES:
        raise ValueError(f"unknown consensus rule {rule!r}; known: {', '.join(CONSENSUS_RULES)}")
    if secondary is None or rule == "primary":
        return PolicySignal("primary", None, primary.regime, primary.confidence, primary.bias_signal, rule)

    if primary.regime == secondary.regime:
        total = weight_1m + weight_15m
        agreement = "full"
        confidence = max(primary.confidence, secondary.confidence)
        bias = (weight_1m * primary.bias_signal + weight_15m * secondary.bias_signal) / total
    elif secondary.regime == RANGING:
        agreement, confidence, bias = "15m_neutral", 0.0, 0.0
    elif primary.regime == RANGING:
        agreement = "1m_cooling"
        confidence = secondary.confidence * 0.5
        bias = secondary.bias_signal * 0.5
    else:
        agreement, confidence, bias = "conflict", 0.0, 0.0

    bias = max(-1.0, min(1.0, bias))
    # Effective regime: ranging below the tier-1 threshold (or when both models
    # agree on ranging), otherwise the side the bias points to.
    if confidence < tier1_confidence or bias == 0.0 or (agreement == "full" and primary.regime == RANGING):
        regime = RANGING
    else:
        regime = BULLISH if bias > 0 else BEARISH
    return PolicySignal("consensus", agreement, regime, confidence, bias, rule)


def entry_size(probabilities: tuple[float, float, float] | None, *, share: float) -> float:
    """The grid's entry size, as a share of its order size, for the primary model's probabilities.

    ``share`` while a directional regime (bearish + bullish) is at least as likely as ranging, else 1.
    The models call the size of moves better than their sign: on the shared real candles the next
    hour moves more in a directional regime, and trading smaller then lowered the grid's drawdown
    where the same cut at other times did not (see README, Evaluation).
    """
    if probabilities is None:
        return 1.0
    return share if probabilities[0] + probabilities[2] >= 0.5 else 1.0


# Mechanical tier ----------------------------------------------------------


@dataclass(frozen=True)
class TierSettings:
    tier1_confidence: float
    tier2_confidence: float
    tier1_bias_floor: float
    tier2_bias_floor: float
    hysteresis: float
    min_dwell_sec: float

    def confidence_for(self, tier: int) -> float:
        return self.tier2_confidence if tier >= 2 else self.tier1_confidence

    def bias_floor_for(self, tier: int) -> float:
        return self.tier2_bias_floor if tier >= 2 else self.tier1_bias_floor


@dataclass(frozen=True)
class TierDecision:
    state: TierState  # the state after this cycle (may be unchanged)
    changed: bool
    reason: str  # why it changed, or why a wanted change was held back ("" when steady)
    wanted_tier: int  # what the signal alone asks for
    wanted_direction: str


def direction_for(tier: int, bias: float) -> str:
    if tier == 0:
        return SYMMETRIC
    return LONG_BIAS if bias > 0 else SHORT_BIAS


def next_tier(
    state: TierState,
    *,
    effective_confidence: float,
    bias_signal: float,
    regime: str,
    capacity_band: str,
    settings: TierSettings,
    now: float,
    skill: float = 1.0,
) -> TierDecision:
    """One step of mechanical tier gating.

    Upgrades need the tier's effective confidence and bias floor in a
    directional regime. A downgrade of confidence waits for the hysteresis
    margin below the current tier's threshold; losing the direction (ranging,
    or the bias pointing the other way) or the bias floor downgrades without
    margin. No change happens within ``min_dwell_sec`` of the last one, and a
    ``stop`` capacity band blocks every upgrade.

    ``skill`` is how far the signal's direction calls have earned directional
    postures (:func:`direction_skill.earned`, 0..1): tier 1 needs some, tier 2
    all of it; losing it downgrades without margin. The decision's wanted tier
    is still what the signal alone asks for.
    """
    s = settings
    eff, bias = effective_confidence, bias_signal
    directional = regime != RANGING and bias != 0.0
    side = direction_for(1, bias)

    def qualifies(tier: int) -> bool:
        return directional and eff >= s.confidence_for(tier) and abs(bias) >= s.bias_floor_for(tier)

    wanted = 2 if qualifies(2) else 1 if qualifies(1) else 0
    earned = 2 if skill >= 1.0 else 1 if skill > 0.0 else 0
    held_by_hysteresis = (
        earned >= state.tier > wanted
        and directional
        and side == state.direction
        and abs(bias) >= s.bias_floor_for(state.tier)
        and eff >= s.confidence_for(state.tier) - s.hysteresis
    )
    target = state.tier if held_by_hysteresis else wanted
    unearned = target > earned
    target = min(target, earned)
    target_dir = direction_for(target, bias)
    wanted_dir = direction_for(wanted, bias)

    def hold(reason: str) -> TierDecision:
        return TierDecision(state, False, reason, wanted, wanted_dir)

    if (target, target_dir) == (state.tier, state.direction):
        if unearned:
            return hold(f"direction calls have not earned tier {wanted}")
        return hold("hysteresis" if held_by_hysteresis else "")
    if target > state.tier and capacity_band == STOP:
        if state.tier >= 1 and target_dir != state.direction:
            # The side still flips; only the step up is refused.
            target = state.tier
        else:
            return hold(f"capacity stop blocks upgrade to tier {target}")
    if now - state.since < s.min_dwell_sec:
        remaining = s.min_dwell_sec - (now - state.since)
        return hold(f"dwell: {remaining:.0f}s before the next change")

    new = TierState(target, direction_for(target, bias), now)
    reason = _change_reason(state, new, eff=eff, bias=bias, regime=regime, settings=s, unearned=unearned)
    return TierDecision(new, True, reason, wanted, wanted_dir)


def _change_reason(
    old: TierState, new: TierState, *, eff: float, bias: float, regime: str, settings: TierSettings, unearned: bool
) -> str:
    s = settings
    if new.tier < old.tier and unearned:
        return f"downgrade to tier {new.tier}: the direction calls have not earned tier {old.tier}"
    if new.tier > old.tier:
        return (
            f"upgrade to tier {new.tier} {new.direction}: effective confidence {eff:.3f} >= "
            f"{s.confidence_for(new.tier):.2f}, |bias| {abs(bias):.3f} >= {s.bias_floor_for(new.tier):.2f}"
        )
    if new.tier == old.tier:
        return f"direction flip to {new.direction} at tier {new.tier} ({regime}, bias {bias:+.3f})"
    if regime == RANGING or bias == 0.0:
        cause = f"regime {regime}"
    elif direction_for(1, bias) != old.direction:
        cause = f"direction turned ({regime}, bias {bias:+.3f})"
    elif abs(bias) < s.bias_floor_for(old.tier):
        cause = f"|bias| {abs(bias):.3f} < floor {s.bias_floor_for(old.tier):.2f}"
    else:
        cause = (
            f"effective confidence {eff:.3f} < {s.confidence_for(old.tier) - s.hysteresis:.2f} "
            f"(tier {old.tier} threshold {s.confidence_for(old.tier):.2f} - hysteresis {s.hysteresis:.2f})"
        )
    return f"downgrade to tier {new.tier}: {cause}"


# Regime history -----------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    ts: float
    regime: str
    conf: float


class RegimeHistory:
    """Rolling record of policy regime evaluations over the last ``window_sec``."""

    def __init__(self, window_sec: float = 1800.0) -> None:
        self.window_sec = window_sec
        self._entries: deque[HistoryEntry] = deque()

    def append(self, ts: float, regime: str, conf: float) -> None:
        self._entries.append(HistoryEntry(float(ts), regime, round(float(conf), 4)))
        self.trim(ts)

    def trim(self, now: float) -> None:
        cutoff = now - self.window_sec
        while self._entries and self._entries[0].ts < cutoff:
            self._entries.popleft()

    def __len__(self) -> int:
        return len(self._entries)

    def to_list(self) -> list[dict]:
        return [{"ts": e.ts, "regime": e.regime, "conf": e.conf} for e in self._entries]
