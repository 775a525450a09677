"""Training depth: how much history a model was trained on, and what that is worth.

Pure functions of counts and times (SPEC section 4). A model trained on fewer
candles than its target is trusted less: its confidence is scaled by the
quality tier's modifier before tier gating.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from clock import iso_utc


@dataclass(frozen=True)
class QualityTier:
    name: str
    min_ratio: Fraction  # ratio = current / target at which the tier starts
    confidence_modifier: float
    colour: str

    def reached(self, current: int, target: int) -> bool:
        """``current / target >= min_ratio``, in exact integer arithmetic."""
        return current * self.min_ratio.denominator >= self.min_ratio.numerator * target


QUALITY_TIERS: tuple[QualityTier, ...] = (
    QualityTier("shallow", Fraction(0), 0.70, "grey"),
    QualityTier("baseline", Fraction(1, 4), 0.85, "yellow"),
    QualityTier("deep", Fraction(5, 8), 0.95, "lightgreen"),
    QualityTier("full", Fraction(1), 1.00, "green"),
)
_RANK = {t.name: i for i, t in enumerate(QUALITY_TIERS)}


def quality_tier(current: int, target: int, min_samples: int) -> QualityTier | None:
    """The tier of a model trained on ``current`` candles; ``None`` below ``min_samples``.

    Ratios are compared exactly (as fractions), so with a 4000 target the
    edges fall on exactly 1000, 2500 and 4000 candles.
    """
    if current < min_samples or current <= 0:
        return None
    target = max(target, 1)
    for tier in reversed(QUALITY_TIERS):
        if tier.reached(current, target):
            return tier
    return QUALITY_TIERS[0]


def tier_rank(tier: QualityTier | str | None) -> int:
    """Order of tiers for comparisons: -1 for no tier, then shallow=0 .. full=3."""
    if tier is None:
        return -1
    return _RANK[tier if isinstance(tier, str) else tier.name]


@dataclass(frozen=True)
class TrainingDepth:
    current_candles: int
    target_candles: int
    quality_tier: str | None
    confidence_modifier: float
    pct_complete: float
    estimated_full_at: str | None
    estimated_full_in_sec: float | None
    available_candles: int
    raw_samples: int
    effective_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def training_depth(
    *,
    current: int,
    target: int,
    min_samples: int,
    available: int,
    interval_sec: int,
    now: float,
    raw_samples: int = 0,
    effective_samples: int = 0,
) -> TrainingDepth:
    """The ``training_depth`` status block of one model.

    ``current`` is the number of candles the live model was trained on (0 when
    untrained) and decides tier and modifier; ``available`` is what the store
    holds now. The time to full counts from the larger of the two, because
    training catches up with the store as soon as a tier is crossed.
    Below the minimum there is no tier and the modifier is 0: no model, no trust.
    """
    tier = quality_tier(current, target, min_samples)
    remaining = max(0, target - max(current, available))
    full = tier is not None and tier.name == "full"
    eta_sec = None if full else float(remaining * interval_sec)
    return TrainingDepth(
        current_candles=current,
        target_candles=target,
        quality_tier=tier.name if tier else None,
        confidence_modifier=tier.confidence_modifier if tier else 0.0,
        pct_complete=round(min(100.0, 100.0 * current / max(target, 1)), 1),
        estimated_full_at=None if eta_sec is None else iso_utc(now + eta_sec),
        estimated_full_in_sec=eta_sec,
        available_candles=available,
        raw_samples=raw_samples,
        effective_samples=effective_samples,
    )


def retrain_reason(
    *,
    trained_candles: int | None,
    last_trained_at: float | None,
    available: int,
    target: int,
    min_samples: int,
    now: float,
    interval_sec: float,
) -> str | None:
    """Why a model should be (re)trained now, or ``None``.

    ``initial`` once enough rows exist, ``tier_improvement`` as soon as the
    store holds enough rows for a better quality tier than the live model's,
    ``scheduled`` once ``interval_sec`` has passed since the last training.
    """
    usable = min(available, target)
    if usable < min_samples:
        return None
    if trained_candles is None or last_trained_at is None:
        return "initial"
    if tier_rank(quality_tier(usable, target, min_samples)) > tier_rank(
        quality_tier(trained_candles, target, min_samples)
    ):
        return "tier_improvement"
    if now - last_trained_at >= interval_sec:
        return "scheduled"
    return None


# Deep decay (SPEC section 4, option A) ------------------------------------

MAX_DECAY_COPIES = 8


def decay_weights(n: int, halflife: float) -> np.ndarray:
    """Weight of row ``i`` of ``n`` (0 = oldest): ``2 ** (-(n - 1 - i) / halflife)``."""
    age = np.arange(n - 1, -1, -1, dtype=np.float64)
    return np.exp2(-age / halflife)


def decay_copies(n: int, halflife: float, max_copies: int = MAX_DECAY_COPIES) -> np.ndarray:
    """How many times each of ``n`` rows appears after recency resampling.

    Copies are proportional to the decay weight, scaled so the oldest row
    appears once (or, for long histories, so the newest appears
    ``max_copies`` times); every row appears at least once, so order and
    coverage are kept and only the emphasis changes.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    w = decay_weights(n, halflife)
    scale = min(1.0 / w[0], float(max_copies))
    return np.maximum(1, np.rint(w * scale)).astype(np.int64)
