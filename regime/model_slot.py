"""One regime model at runtime: when to train it, training it safely, inferring,
its training depth, and its part of the state snapshot.

Training builds a new detector and swaps it in only on success, so a failure
keeps the last good model. Deep decay resampling (SPEC section 4, option A)
is decided here, in the runtime, and handed to the detector as row copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from candles import Candle
from errors import BadData
from hmm_regime_detector import (
    EMISSION_TEMPERATURE,
    FeatureStream,
    MalformedModel,
    RegimeDetector,
    UnseparatedStates,
)
from regime.policy import NO_SIGNAL
from regime.training_depth import QualityTier, TrainingDepth, decay_copies, quality_tier, retrain_reason, training_depth
from vocabulary import RegimeSignal

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_SEC = 600.0
"""Wait after a failed fit; it doubles with each further failure in a row, up to the retrain interval."""
RETRY_AFTER_REJECTION_SEC = 3600.0
"""The same, when the fit was rejected because its states did not separate on the EMA spread: refitted
ten minutes later on 99.75 % of the same candles, it would not separate either."""

# How many consecutive rows each model counts as one observation (RegimeDetector.emission_temperature).
EMISSION_TEMPERATURES = {"primary": EMISSION_TEMPERATURE, "secondary": 1.0}


def detector_options(role: str) -> dict:
    """The detector arguments that differ between the primary (1m) and the secondary (15m) model."""
    return {"emission_temperature": EMISSION_TEMPERATURES[role]}


@dataclass(frozen=True)
class SlotSpec:
    name: str  # "primary" | "secondary"
    interval_min: int
    target: int
    min_samples: int
    retrain_interval_sec: float
    decay_enabled: bool = False
    decay_halflife: int = 1440


@dataclass(frozen=True)
class RetrainRecord:
    time: float
    model: str
    reason: str
    candles: int
    quality_tier: str | None
    raw_samples: int
    effective_samples: int
    duration_sec: float
    ok: bool
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ModelSlot:
    def __init__(self, spec: SlotSpec, make_detector: Callable[[], RegimeDetector]) -> None:
        self.spec = spec
        self._make_detector = make_detector
        self.detector = make_detector()
        self.features = FeatureStream(maxlen=self.detector.recent_candles)
        self.trained_at: float | None = None
        self.signal: RegimeSignal = NO_SIGNAL
        self.last_error: str | None = None
        self._last_failure_at: float | None = None
        self._failures_in_a_row = 0
        self._first_wait_sec = RETRY_AFTER_FAILURE_SEC
        self._packed: tuple[RegimeDetector, dict] | None = None
        self._tier_of: RegimeDetector | None = None
        self._tier: QualityTier | None = None

    @property
    def trained(self) -> bool:
        return self.detector.is_trained

    @property
    def trained_candles(self) -> int:
        return self.detector.n_train_candles_ if self.trained else 0

    @property
    def confidence_modifier(self) -> float:
        """The training-depth modifier of the live model (0 when untrained)."""
        tier = self._quality_tier()
        return tier.confidence_modifier if tier else 0.0

    @property
    def quality_tier(self) -> str | None:
        """The training-depth quality tier of the live model (``None`` when untrained)."""
        tier = self._quality_tier()
        return tier.name if tier else None

    def _quality_tier(self) -> QualityTier | None:
        # Asked several times a cycle; a fitted detector never changes, so once per model is enough.
        if self._tier_of is not self.detector:
            self._tier = quality_tier(self.trained_candles, self.spec.target, self.spec.min_samples)
            self._tier_of = self.detector
        return self._tier

    @property
    def window_size(self) -> int:
        return self.detector.window_size

    @property
    def retry_after_sec(self) -> float:
        """How long after the last failed fit the next attempt waits (exponential back-off)."""
        doublings = max(0, self._failures_in_a_row - 1)
        return min(self._first_wait_sec * 2.0**doublings, max(self._first_wait_sec, self.spec.retrain_interval_sec))

    def retrain_reason(self, available: int, now: float) -> str | None:
        if self._last_failure_at is not None and now - self._last_failure_at < self.retry_after_sec:
            return None
        return retrain_reason(
            trained_candles=self.trained_candles if self.trained else None,
            last_trained_at=self.trained_at,
            available=available,
            target=self.spec.target,
            min_samples=self.spec.min_samples,
            now=now,
            interval_sec=self.spec.retrain_interval_sec,
        )

    def train(self, rows: Sequence[Candle], now: float, reason: str) -> RetrainRecord:
        """Fit a fresh detector on ``rows``; swap it in only if fitting succeeds."""
        started = time.perf_counter()
        spec = self.spec
        copies = decay_copies(len(rows), spec.decay_halflife) if spec.decay_enabled else None
        tier = quality_tier(len(rows), spec.target, spec.min_samples)
        record = partial(
            RetrainRecord, time=now, model=spec.name, reason=reason, candles=len(rows),
            quality_tier=tier.name if tier else None,
        )  # fmt: skip
        try:
            if tier is None:
                raise BadData(f"{len(rows)} candles is below the minimum of {spec.min_samples}")
            detector = self._make_detector().fit(rows, copies)
        except (BadData, ValueError, np.linalg.LinAlgError) as exc:
            self.last_error = f"training failed: {exc}"
            self._last_failure_at = now
            if self._failures_in_a_row == 0:
                rejected = isinstance(exc, UnseparatedStates)
                self._first_wait_sec = RETRY_AFTER_REJECTION_SEC if rejected else RETRY_AFTER_FAILURE_SEC
            self._failures_in_a_row += 1
            log.error("%s model: %s (keeping the previous model)", spec.name, self.last_error)
            effective = int(copies.sum()) if copies is not None else len(rows)
            return record(
                raw_samples=len(rows), effective_samples=effective, duration_sec=time.perf_counter() - started,
                ok=False, error=str(exc),
            )  # fmt: skip
        self.detector, self.trained_at = detector, now
        self.last_error, self._last_failure_at, self._failures_in_a_row = None, None, 0
        done = record(
            raw_samples=detector.n_samples_, effective_samples=detector.n_effective_samples_,
            duration_sec=time.perf_counter() - started, ok=True,
        )  # fmt: skip
        log.info(
            "%s model trained (%s): %d candles, tier %s, samples raw %d / effective %d, %d EM iterations, %.2fs",
            spec.name, reason, len(rows), done.quality_tier, done.raw_samples, done.effective_samples,
            detector.n_iter_run_, done.duration_sec,
        )  # fmt: skip
        return done

    def observe(self, candles: Sequence[Candle]) -> None:
        """Feed newly closed candles (oldest first) to the feature stream."""
        last = self.features.last_time
        self.features.extend([c for c in candles if last is None or c.time > last])

    def evaluate(self) -> RegimeSignal:
        """Infer on the newest observed candles; on failure keep the previous signal."""
        if not self.trained:
            self.signal = NO_SIGNAL
            return self.signal
        try:
            self.signal = self.detector.infer_rows(self.features.matrix())
        except (BadData, ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
            self.last_error = f"inference failed: {exc}"
            log.warning("%s model: %s", self.spec.name, self.last_error)
        return self.signal

    def depth(self, available: int, now: float) -> TrainingDepth:
        spec = self.spec
        trained = self.trained
        return training_depth(
            current=self.trained_candles,
            target=spec.target,
            min_samples=spec.min_samples,
            available=available,
            interval_sec=spec.interval_min * 60,
            now=now,
            raw_samples=self.detector.n_samples_ if trained else 0,
            effective_samples=self.detector.n_effective_samples_ if trained else 0,
        )

    # snapshot -------------------------------------------------------------

    def snapshot(self) -> dict | None:
        if not self.trained:
            return None
        if self._packed is None or self._packed[0] is not self.detector:
            self._packed = (self.detector, self.detector.to_dict())  # a fitted detector never changes
        return {"trained_at": self.trained_at, "model": self._packed[1]}

    def restore(self, data: dict | None) -> bool:
        """Load a snapshot written by :meth:`snapshot`; ``False`` (and untouched) when it is absent or must be
        retrained (another version, states that no longer separate).

        Parameters that are not a model at all (not finite, wrong shapes, probabilities that do not
        sum to 1) raise ``ValueError``: the snapshot holding them cannot be trusted.
        """
        if not data:
            return False
        try:
            trained_at = float(data["trained_at"])
            detector = self._make_detector().load_dict(data["model"])
        except MalformedModel as exc:
            raise ValueError(f"{self.spec.name} model: {exc}") from None
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{self.spec.name} model: malformed ({exc})") from None
        except BadData as exc:
            log.warning("%s model snapshot unusable (%s); it will be retrained", self.spec.name, exc)
            return False
        self.detector, self.trained_at = detector, trained_at
        return True
