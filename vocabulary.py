"""The words every part of the bot shares, and the small types made of them.

Regimes, tiers, directions, order sides and capacity bands are spelled here
once; the detector, the policies, the grid, the adapters and the status use
these names instead of literals. Pure: imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a model says the market is doing.
BEARISH, RANGING, BULLISH = "BEARISH", "RANGING", "BULLISH"
REGIMES: tuple[str, str, str] = (BEARISH, RANGING, BULLISH)  # probability order everywhere

# How directional the grid's posture is: 0 symmetric, 1 skewed, 2 one-sided.
TIERS: tuple[int, int, int] = (0, 1, 2)

# Which way a posture leans (tier 0 is always symmetric).
SYMMETRIC, LONG_BIAS, SHORT_BIAS = "symmetric", "long_bias", "short_bias"
DIRECTIONS: tuple[str, str, str] = (SYMMETRIC, LONG_BIAS, SHORT_BIAS)

# The side of an order; also the side whose entries a tier-2 posture suppresses.
BUY, SELL = "buy", "sell"

# How much of the grid's room is in use; "stop" blocks every tier upgrade.
NORMAL, CAUTION, STOP = "normal", "caution", "stop"
CAPACITY_BANDS: tuple[str, str, str] = (NORMAL, CAUTION, STOP)


@dataclass(frozen=True)
class RegimeSignal:
    """What one model says about the newest candle."""

    regime: str
    confidence: float  # top probability minus the second
    bias_signal: float  # P(bull) - P(bear), 0 below the confidence threshold
    probabilities: tuple[float, float, float] | None  # bearish, ranging, bullish


@dataclass(frozen=True)
class TierState:
    """A posture: its tier, its direction and when it last changed."""

    tier: int
    direction: str
    since: float  # time of the last change


@dataclass(frozen=True)
class PolicySignal:
    """The signal tier gating acts on: the consensus, or the primary alone."""

    source: str  # "primary" | "consensus"
    agreement: str | None  # full | 15m_neutral | 1m_cooling | conflict (None: primary alone)
    regime: str
    confidence: float  # raw, before the training-depth modifier
    bias_signal: float
    rule: str = "primary"  # the consensus rule in use (CONSENSUS_RULES)
