"""The status payload of ``GET /api/status`` (SPEC section 12), built by pure functions.

The bot gathers plain values; these functions shape, round and name them.
Every key is documented in ``README.md`` (section "Status payload").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from clock import iso_utc
from regime.policy import PolicySignal, TierDecision
from regime.training_depth import TrainingDepth
from vocabulary import BUY, LONG_BIAS, SELL, SHORT_BIAS, SYMMETRIC, RegimeSignal, TierState


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def model_block(
    *,
    interval_min: int,
    signal: RegimeSignal,
    trained: bool,
    trained_at: float | None,
    transition_matrix: list[list[float]] | None,
    depth: TrainingDepth,
    last_error: str | None,
) -> dict[str, Any]:
    probs = signal.probabilities
    return {
        "interval_min": interval_min,
        "trained": trained,
        "regime": signal.regime,
        "confidence": _r(signal.confidence),
        "bias_signal": _r(signal.bias_signal),
        "probabilities": None
        if probs is None
        else {"bearish": _r(probs[0]), "ranging": _r(probs[1]), "bullish": _r(probs[2])},
        "transition_matrix": None
        if transition_matrix is None
        else [[_r(v, 5) for v in row] for row in transition_matrix],
        "last_trained_at": trained_at,
        "training_depth": depth.to_dict(),
        "last_error": last_error,
    }


def consensus_block(policy: PolicySignal, weights: tuple[float, float]) -> dict[str, Any]:
    return {
        "rule": policy.rule,
        "active": policy.source == "consensus",
        "agreement": policy.agreement,
        "regime": policy.regime,
        "confidence": _r(policy.confidence),
        "bias_signal": _r(policy.bias_signal),
        "weights": {"1m": weights[0], "15m": weights[1]},
    }


def policy_block(policy: PolicySignal, modifier: float) -> dict[str, Any]:
    return {
        "raw_confidence": _r(policy.confidence),
        "confidence_modifier": modifier,
        "effective_confidence": _r(policy.confidence * modifier),
        "regime": policy.regime,
        "bias_signal": _r(policy.bias_signal),
        "source": policy.source,
        "agreement": policy.agreement,
        "rule": policy.rule,
    }


def cycle_time_summary(cycle_ms: Iterable[float]) -> dict[str, float | None]:
    """Last, median and 99th percentile of recent main-loop cycle times, in milliseconds."""
    values = list(cycle_ms)
    if not values:
        return {"last": None, "p50": None, "p99": None}
    ordered = sorted(values)
    return {
        "last": round(values[-1], 3),
        "p50": round(ordered[len(ordered) // 2], 3),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def suppressed_side(tier: int, direction: str) -> str | None:
    """The side whose entries tier 2 suppresses: sell entries (leg A) when long, buy entries (leg B) when short."""
    if tier < 2:
        return None
    return {LONG_BIAS: SELL, SHORT_BIAS: BUY}.get(direction)


def regime_tier_block(
    *,
    computed: TierState,
    directional_enabled: bool,
    pinned_since: float,
    decision: TierDecision | None,
    capacity_band: str,
    transitions: Iterable[Mapping[str, Any]],
    skill: Mapping[str, Any] | None = None,
    entry_size: float = 1.0,
) -> dict[str, Any]:
    shadow = not directional_enabled
    mech = asdict(TierState(0, SYMMETRIC, pinned_since)) if shadow else asdict(computed)
    return {
        "mechanical": {
            **mech,
            "shadow": shadow,
            "would_be": asdict(computed) if shadow else None,
            "wanted_tier": decision.wanted_tier if decision else 0,
            "wanted_direction": decision.wanted_direction if decision else SYMMETRIC,
            "held_because": (decision.reason or None) if decision and not decision.changed else None,
        },
        **effective_tier_block(TierState(mech["tier"], mech["direction"], mech["since"]), "mechanical"),
        "capacity_band": capacity_band,
        "direction_skill": dict(skill) if skill is not None else None,
        "entry_size": entry_size,
        "recent_transitions": list(transitions),
    }


def advisor_facts(
    *,
    pair: str,
    now: float,
    price: float | None,
    models: Iterable[tuple[int, Any, RegimeSignal, bool, float | None, TrainingDepth]],
    policy: PolicySignal,
    modifier: float,
    weights: tuple[float, float],
    history: list[dict],
    mechanical: TierState,
    capacity_band: str,
) -> dict[str, Any]:
    """The slice of the status payload that ``ai_advisor.build_regime_context`` reads.

    ``models`` holds ``(interval_min, detector, signal, trained, trained_at, depth)`` per model,
    primary first, captured by the main loop; this runs later on the advisor's thread.
    """
    blocks = [
        model_block(interval_min=interval, signal=signal, trained=trained, trained_at=at,
                    transition_matrix=detector.transition_matrix(), depth=depth, last_error=None)
        for interval, detector, signal, trained, at, depth in models
    ]  # fmt: skip
    return {
        "pair": pair,
        "now": now,
        "now_iso": iso_utc(now),
        "price": price,
        "hmm": {
            "primary": blocks[0],
            "secondary": blocks[1] if len(blocks) > 1 else None,
            "consensus": consensus_block(policy, weights),
            "policy": policy_block(policy, modifier),
        },
        "regime_history_30m": history,
        "regime_tier": {
            "mechanical": asdict(mechanical),
            "capacity_band": capacity_band,
        },
    }


def effective_tier_block(effective: TierState, source: str) -> dict[str, Any]:
    """The tier the grid follows (``mechanical`` or ``ai_override``) and the entry side it suppresses."""
    return {
        "effective": {"tier": effective.tier, "direction": effective.direction, "source": source},
        "suppressed_side": suppressed_side(effective.tier, effective.direction),
    }
