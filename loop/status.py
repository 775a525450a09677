"""The status payload of ``GET /api/status`` (SPEC section 12), built by pure functions.

The bot gathers its parts into a :class:`StatusParts`; :func:`build_status`
shapes, rounds and names them, in the order the page and the README show.
The blocks of the grid, the store, the candle pipeline, the backfill and the
advisor are built by their owners and placed here as they are. Every key is
documented in ``README.md`` (section "Status payload").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ai_advisor import matrix_view, signal_view
from clock import iso_utc
from regime.policy import TierDecision
from regime.training_depth import TrainingDepth
from vocabulary import BUY, LONG_BIAS, SELL, SHORT_BIAS, SYMMETRIC, PolicySignal, RegimeSignal, TierState


@dataclass(frozen=True)
class ModelPart:
    """One model slot as the status shows it at the status's ``now``."""

    interval_min: int
    signal: RegimeSignal
    trained: bool
    trained_at: float | None
    transition_matrix: list[list[float]] | None
    depth: TrainingDepth
    last_error: str | None


@dataclass(frozen=True)
class TierPart:
    """The mechanical tier and what gates it (the effective tier comes with the :class:`AdvisorPart`)."""

    computed: TierState
    directional_enabled: bool
    pinned_since: float  # the symmetric tier's since while directional tiers only shadow
    decision: TierDecision | None
    capacity_band: str
    transitions: tuple[Mapping[str, Any], ...]
    skill: Mapping[str, Any] | None
    entry_size: float


@dataclass(frozen=True)
class AdvisorPart:
    """The tier the grid follows, with its source, and the advisor's own block (built by the advisor)."""

    effective: TierState
    source: str  # mechanical | ai_override
    block: Mapping[str, Any]


@dataclass(frozen=True)
class HealthPart:
    verdict: Mapping[str, Any]  # ok and reasons: the verdict /healthz gives too
    cycles: int
    failing_cycles: int
    last_cycle_at: float | None
    cycle_ms: tuple[float, ...]
    started_at: float
    errors: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class StatusParts:
    """Everything ``GET /api/status`` shows, gathered by the bot at ``now``."""

    mode: str
    pair: str
    now: float
    price: float | None
    primary: ModelPart
    secondary: ModelPart | None
    policy: PolicySignal
    confidence_modifier: float
    consensus_weights: tuple[float, float]  # 1m, 15m
    pipeline: Mapping[str, Any]  # the candle pipeline's health block
    tier: TierPart
    history: tuple[Mapping[str, Any], ...]
    price_history: tuple[Mapping[str, Any], ...]
    advisor: AdvisorPart
    grid: Mapping[str, Any]
    trades_backfill: Mapping[str, Any]
    store: Mapping[str, Any]
    simulated: bool
    true_regime: str | None  # the simulator's ground truth
    health: HealthPart
    settings: Mapping[str, Any]  # redacted


def build_status(parts: StatusParts) -> dict[str, Any]:
    """The full ``/api/status`` payload (SPEC section 12)."""
    p = parts
    return {
        "mode": p.mode,
        "pair": p.pair,
        "now": p.now,
        "now_iso": iso_utc(p.now),
        "price": p.price,
        "hmm": {
            "primary": model_block(p.primary),
            "secondary": model_block(p.secondary),
            "consensus": consensus_block(p.policy, p.consensus_weights),
            "policy": policy_block(p.policy, p.confidence_modifier),
        },
        "hmm_data_pipeline": p.pipeline,
        "regime_tier": regime_tier_block(p.tier, p.advisor),
        "regime_history_30m": list(p.history),
        "price_history": list(p.price_history),
        "ai_regime_advisor": p.advisor.block,
        "grid": p.grid,
        "trades_backfill": p.trades_backfill,
        "store": p.store,
        "sim": {"true_regime": p.true_regime} if p.simulated else None,
        "health": health_block(p.health),
        "settings": p.settings,
    }


def with_advisor(status: Mapping[str, Any], advisor: AdvisorPart) -> dict[str, Any]:
    """``status`` with the advisor's block and the effective tier as they are now.

    After an operator action the published status shows its effect without
    waiting for the next cycle.
    """
    tier = {**status["regime_tier"], **effective_tier_block(advisor.effective, advisor.source)}
    return {**status, "regime_tier": tier, "ai_regime_advisor": advisor.block}


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def model_block(model: ModelPart | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {
        "interval_min": model.interval_min,
        "trained": model.trained,
        **signal_view(model.signal),
        "transition_matrix": matrix_view(model.transition_matrix),
        "last_trained_at": model.trained_at,
        "training_depth": model.depth.to_dict(),
        "last_error": model.last_error,
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


def regime_tier_block(tier: TierPart, advisor: AdvisorPart) -> dict[str, Any]:
    computed, decision = tier.computed, tier.decision
    shadow = not tier.directional_enabled
    mech = asdict(TierState(0, SYMMETRIC, tier.pinned_since)) if shadow else asdict(computed)
    return {
        "mechanical": {
            **mech,
            "shadow": shadow,
            "would_be": asdict(computed) if shadow else None,
            "wanted_tier": decision.wanted_tier if decision else 0,
            "wanted_direction": decision.wanted_direction if decision else SYMMETRIC,
            "held_because": (decision.reason or None) if decision and not decision.changed else None,
        },
        **effective_tier_block(advisor.effective, advisor.source),
        "capacity_band": tier.capacity_band,
        "direction_skill": dict(tier.skill) if tier.skill is not None else None,
        "entry_size": tier.entry_size,
        "recent_transitions": list(tier.transitions),
    }


def health_block(health: HealthPart) -> dict[str, Any]:
    return {
        **health.verdict,
        "cycles": health.cycles,
        "failing_cycles": health.failing_cycles,
        "last_cycle_at": health.last_cycle_at,
        "cycle_ms": cycle_time_summary(health.cycle_ms),
        "started_at": health.started_at,
        "errors": list(health.errors),
    }


def effective_tier_block(effective: TierState, source: str) -> dict[str, Any]:
    """The tier the grid follows (``mechanical`` or ``ai_override``) and the entry side it suppresses."""
    return {
        "effective": {"tier": effective.tier, "direction": effective.direction, "source": source},
        "suppressed_side": suppressed_side(effective.tier, effective.direction),
    }
