"""Regime-aware grid bot for Kraken: the main loop.

``python bot.py --help`` lists the modes and flags (the command line and the
wiring that builds the bot's parts are in ``bot``). One :meth:`Bot.tick` is one
cycle of SPEC section 0, in the same order; ``loop.runner.Runner`` owns pacing,
the heartbeat and stopping. Decisions live in pure modules (``training_depth``,
``regime_policy``, ``advisor_policy``, ``grid_engine``); I/O lives in adapters
(``store``, ``kraken_client``, ``market_sim``, ``replay``, ``http_api``,
the exchanges).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from advisor.runtime import RegimeAdvisor
from ai_advisor import AdvisorFacts, ModelFacts, build_regime_context
from candles import MarketData
from clock import Clock, iso_utc
from config import Settings
from errors import BadData, ConfigError, RetryLater
from grid.engine import Posture
from grid.runner import GridRunner
from health import FeedFacts, HealthFacts, verdict
from kraken.trades_backfill import TradesBackfill
from loop.error_log import ErrorLog
from loop.snapshots import (
    SNAPSHOT_VERSION,
    SnapshotInvalid,
    check_snapshot,
    current_key,
    distrust_message,
    previous_key,
    rejected_key,
)
from loop.status import (
    AdvisorPart,
    HealthPart,
    ModelPart,
    StatusParts,
    TierPart,
    build_status,
    with_advisor,
)
from market.pipeline import CandlePipeline
from regime.direction_skill import DirectionSkill, SkillSettings, earned
from regime.direction_skill import from_dict as skill_from_dict
from regime.direction_skill import observe as observe_call
from regime.direction_skill import status as skill_status
from regime.direction_skill import to_dict as skill_to_dict
from regime.model_slot import ModelSlot
from regime.policy import (
    NO_SIGNAL,
    PolicySignal,
    RegimeHistory,
    TierDecision,
    TierSettings,
    entry_size,
    next_tier,
    policy_signal,
)
from store.interface import Store, first_non_finite
from vocabulary import LONG_BIAS, SHORT_BIAS, STOP, SYMMETRIC, TierState

log = logging.getLogger("bot")

SIM_DB_DEFAULT = "data/sim.sqlite3"
PRICE_HISTORY_LEN = 240
MAX_RETRAIN_RECORDS = 2000
NO_BACKFILL = {"enabled": False, "state": "unavailable"}


DIRECTION_SIGN = {LONG_BIAS: 1, SHORT_BIAS: -1, SYMMETRIC: 0}
CYCLE_SERIES = (
    "t",  # the cycle's time
    "price",
    "tier",  # effective tier (what the regime-aware grid traded on)
    "direction",  # effective direction: +1 long_bias, -1 short_bias, 0 symmetric
    "mechanical_tier",
    "shallow",  # 1 when the primary model is trained and its training depth is "shallow"
    "capacity_stop",  # 1 when the regime-aware grid's capacity band is "stop"
    "symmetric_capacity_stop",  # the same for the symmetric grid
    "regime_aware",  # equity of the regime-aware grid
    "symmetric",  # equity of the symmetric grid
)


@dataclass
class RunStats:
    """What happened during this process's run (the replay report reads it)."""

    candles_processed: int = 0
    tier_seconds: dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 0.0, 2: 0.0})
    tier_changes: int = 0
    retrains: list[dict] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)  # replay: one value per cycle, CYCLE_SERIES

    def record_cycle(
        self,
        ts: float,
        price: float,
        *,
        tier: int,
        direction: str,
        mechanical_tier: int,
        shallow: bool,
        capacity_stop: bool,
        symmetric_capacity_stop: bool,
        regime_aware: float,
        symmetric: float,
    ) -> None:
        """One replay cycle's record: what the scorecard and the plot are computed from."""
        s = self.series
        if not s:
            s.update((key, []) for key in CYCLE_SERIES)
        # One append per series, spelled out: this runs every cycle of a replay.
        s["t"].append(ts)
        s["price"].append(price)
        s["tier"].append(tier)
        s["direction"].append(DIRECTION_SIGN[direction])
        s["mechanical_tier"].append(mechanical_tier)
        s["shallow"].append(int(shallow))
        s["capacity_stop"].append(int(capacity_stop))
        s["symmetric_capacity_stop"].append(int(symmetric_capacity_stop))
        s["regime_aware"].append(regime_aware)
        s["symmetric"].append(symmetric)


class Bot:
    """The regime engine of one pair: candles in, mechanical tier out, status for everyone."""

    def __init__(
        self,
        settings: Settings,
        *,
        mode: str,
        clock: Clock,
        market: MarketData,
        store: Store,
        errors: ErrorLog,
        primary: ModelSlot,
        secondary: ModelSlot | None,
        pipeline: CandlePipeline,
        tier_settings: TierSettings,
        skill_settings: SkillSettings,
        advisor: RegimeAdvisor,
        grid: GridRunner,
        baseline: GridRunner | None = None,
        truth: Callable[[], str | None] | None = None,
        backfill: TradesBackfill | None = None,
        autosave: bool = True,
        interval_sec: float | None = None,
    ) -> None:
        """Only stores the parts; ``bot.build_bot`` builds them from the settings."""
        s = settings
        self.settings, self.mode, self.clock, self.market, self.store = s, mode, clock, market, store
        self._truth = truth
        self.snapshot_key = current_key(s.PAIR)

        self.primary, self.secondary = primary, secondary
        self.pipeline = pipeline
        self.tier_settings = tier_settings

        now = clock.now()
        self.started_at = now
        self.tier_state = TierState(0, SYMMETRIC, now)  # computed every cycle ("would be" in shadow mode)
        self.skill_settings = skill_settings
        self.skill = DirectionSkill()  # how well the signal's direction calls have done
        self.pinned_since = now
        self.tier_decision: TierDecision | None = None
        self.policy = self._policy()
        self.history = RegimeHistory(1800.0)
        self.price_history: deque[dict] = deque(maxlen=PRICE_HISTORY_LEN)
        self.transitions: deque[dict] = deque(maxlen=10)
        self.errors = errors  # the Errors card, shared with the parts that report problems
        self.stats = RunStats()
        self.cycles = 0
        self.interval_sec = interval_sec or s.LOOP_INTERVAL_SEC  # how often the runner calls tick
        self.last_cycle_at: float | None = None  # the last cycle that completed
        self.failing_cycles = 0  # cycles in a row that raised
        self.last_failure: str | None = None
        self._save_error: str | None = None  # why the last snapshot save failed, until one succeeds
        self.cycle_ms: deque[float] = deque(maxlen=500)  # wall time of recent cycles, for health
        self._last_account_at = now
        self._last_snapshot_at: float | None = None
        self._dirty = False
        self._saved_snapshot: dict[str, Any] | None = None
        self._save_lock = threading.Lock()  # the loop's snapshot vs an operator action's
        self.advisor = advisor
        self.grid = grid
        self.baseline = baseline  # a replay's always-symmetric grid on the same candles, the baseline to beat
        self.backfill = backfill  # None where the market has no trades (sim, replay)
        self.autosave = autosave

    # lifecycle ----------------------------------------------------------------

    def start(self, recovery: str | None = None) -> None:
        """Restore the snapshot (tier state, models) and prime the candle pipeline.

        A snapshot that cannot be trusted stops the start (:class:`ConfigError`, naming what is wrong
        and the recovery flags). ``recovery``: ``"previous"`` restores the copy kept under
        ``snapshot:PAIR:previous`` and makes it current; ``"discard"`` starts from scratch. Either way
        the current snapshot is moved aside to ``snapshot:PAIR:rejected:<time>``, never deleted.
        """
        now = self.clock.now()
        key = previous_key(self.settings.PAIR) if recovery == "previous" else self.snapshot_key
        if recovery == "discard":
            self._move_aside(now)
            snap = None
        else:
            snap = self._load_snapshot(key, now)
        self.pipeline.prime()
        if snap is not None:
            try:
                self._restore(snap)
            except (SnapshotInvalid, BadData, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(self._distrust(key, exc)) from exc
        if recovery == "previous":
            self._move_aside(now)
            self.store.copy_state(key, self.snapshot_key)
            log.warning("started from the previous snapshot %s (saved at %s)", key, iso_utc(snap["saved_at"]))
        self.advisor.start()

    def _load_snapshot(self, key: str, now: float) -> dict[str, Any] | None:
        try:
            snap = self.store.load_state(key)
            if snap is None and key != self.snapshot_key:
                raise BadData(f"no previous snapshot is kept under {key!r}")
            if snap is not None:
                check_snapshot(snap, pair=self.settings.PAIR, now=now)
        except (BadData, SnapshotInvalid) as exc:
            raise ConfigError(self._distrust(key, exc)) from exc
        return snap

    def _distrust(self, key: str, exc: Exception) -> str:
        status = self.store.status()
        return distrust_message(key, self.snapshot_key, status.get("local_path") or status["backend"], exc)

    def _move_aside(self, now: float) -> None:
        aside = rejected_key(self.settings.PAIR, now)
        if self.store.copy_state(self.snapshot_key, aside, remove=True):
            log.warning("the snapshot %s was moved aside to %s", self.snapshot_key, aside)

    def shutdown(self, *, save: bool = True) -> None:
        """Stop the workers and write the snapshot (not when another bot now owns the store: ``save=False``)."""
        if self.backfill is not None:
            self.backfill.stop()
        self.advisor.stop()
        if save:
            self.save_snapshot(self.clock.now())

    # the cycle ----------------------------------------------------------------

    def tick(self) -> None:
        """One main-loop cycle (SPEC section 0)."""
        started = time.perf_counter()
        now = self.clock.now()
        self._account_time(now)
        self._sync_candles(now)
        retrained = self._retrain_models(now)
        self._evaluate_models(now, force=retrained)
        self._update_tier(now)
        self._consult_advisor(now)
        self._trade(now)
        self.history.trim(now)
        self._save_snapshot_if_due(now)
        self.cycles += 1
        self.last_cycle_at = now
        self.failing_cycles = 0
        self.cycle_ms.append((time.perf_counter() - started) * 1000.0)

    def _account_time(self, now: float) -> None:
        tier = self.mechanical_state().tier
        self.stats.tier_seconds[tier] += max(0.0, now - self._last_account_at)
        self._last_account_at = now

    def _sync_candles(self, now: float) -> None:
        if self.backfill is not None:  # rows the backfill thread stored count towards the training depth
            for interval, written in self.backfill.take_written().items():
                if written and interval in self.pipeline.specs:
                    self.pipeline.recount(interval)
        before = self.pipeline.available(1)
        self.pipeline.sync_due_feeds(now)
        for spec in self.pipeline.specs.values():  # a failed sync reaches the Errors card too
            feed = self.pipeline.state[spec.interval_min]
            if feed.last_error_at == now and feed.last_error:
                self.record_error(f"{spec.label} candles", feed.last_error, now)
        if self.backfill is not None and self.cycles == 0:
            self.backfill.start()  # after the first sync: it fills what lies before Kraken's window
        self.stats.candles_processed += max(0, self.pipeline.available(1) - before)
        self.pipeline.prune_if_due(now)

    def _retrain_models(self, now: float) -> set[str]:
        retrained = set()
        for slot in self.slots():
            interval = slot.spec.interval_min
            reason = slot.retrain_reason(self.pipeline.available(interval), now)
            if reason is None:
                continue
            rows = self.pipeline.load_recent_ohlcv_rows(interval, slot.spec.target)
            record = slot.train(rows, now, reason)
            self.stats.retrains.append(record.to_dict())
            del self.stats.retrains[:-MAX_RETRAIN_RECORDS]
            if record.ok:
                retrained.add(slot.spec.name)
                self._dirty = True
            else:
                self.record_error(f"{slot.spec.name} model", record.error or "training failed", now)
        return retrained

    def _evaluate_models(self, now: float, force: set[str]) -> None:
        evaluated = False
        for slot in self.slots():
            interval = slot.spec.interval_min
            new = self.pipeline.take_new(interval)
            if new:
                slot.observe(self.pipeline.newest(interval, new))
            if new or slot.spec.name in force:
                slot.evaluate()
                evaluated = True
        if not evaluated:
            return
        self.policy = self._policy()
        self.history.append(now, self.policy.regime, self.policy.confidence)
        window = self.pipeline.state[1].recent
        if window and (not self.price_history or self.price_history[-1]["ts"] != window[-1].time):
            self.price_history.append({"ts": window[-1].time, "close": window[-1].close, "regime": self.policy.regime})

    def _policy(self) -> PolicySignal:
        s = self.settings
        secondary = self.secondary.signal if self.secondary and self.secondary.trained else None
        return policy_signal(
            self.primary.signal if self.primary.trained else NO_SIGNAL,
            secondary,
            weight_1m=s.CONSENSUS_1M_WEIGHT,
            weight_15m=s.CONSENSUS_15M_WEIGHT,
            tier1_confidence=s.REGIME_TIER1_CONFIDENCE,
            rule=s.CONSENSUS_RULE,
        )

    def confidence_modifier(self) -> float:
        """The primary's training-depth modifier; the smaller of both under consensus."""
        if self.policy.source == "consensus" and self.secondary:
            return min(self.primary.confidence_modifier, self.secondary.confidence_modifier)
        return self.primary.confidence_modifier

    def direction_skill(self) -> float:
        """How far directional postures may act (1 when the skill gate is off)."""
        return earned(self.skill, self.skill_settings) if self.settings.REGIME_SKILL_GATE else 1.0

    def entry_size(self) -> float:
        """The regime's non-directional response: a smaller grid while larger moves are likely (1 in shadow mode)."""
        if not (self.settings.REGIME_DIRECTIONAL_ENABLED and self.primary.trained):
            return 1.0
        return entry_size(self.primary.signal.probabilities, share=self.settings.REGIME_MOVE_SIZE_SHARE)

    def _update_tier(self, now: float) -> None:
        modifier = self.confidence_modifier()
        effective = self.policy.confidence * modifier
        decision = next_tier(
            self.tier_state,
            effective_confidence=effective,
            bias_signal=self.policy.bias_signal,
            regime=self.policy.regime,
            capacity_band=self.capacity_band,
            settings=self.tier_settings,
            now=now,
            skill=self.direction_skill(),
        )
        self.tier_decision = decision
        # The signal's own call, acted on or not, is what the skill is measured on.
        self.skill = observe_call(
            self.skill, now, self.pipeline.price(), DIRECTION_SIGN[decision.wanted_direction], self.skill_settings
        )
        if not decision.changed:
            return
        old, new = self.tier_state, decision.state
        self.tier_state = new
        shadow = not self.settings.REGIME_DIRECTIONAL_ENABLED
        row = {
            "ts": now,
            "pair": self.settings.PAIR,
            "from_tier": old.tier,
            "to_tier": new.tier,
            "from_direction": old.direction,
            "to_direction": new.direction,
            "reason": decision.reason,
            "regime": self.policy.regime,
            "raw_confidence": round(self.policy.confidence, 6),
            "effective_confidence": round(effective, 6),
            "bias_signal": round(self.policy.bias_signal, 6),
            "shadow": shadow,
        }
        self.transitions.appendleft(row)
        if not shadow:
            self.stats.tier_changes += 1
        self._dirty = True
        log.info(
            "%stier %d %s -> %d %s: %s",
            "[shadow] " if shadow else "",
            old.tier,
            old.direction,
            new.tier,
            new.direction,
            decision.reason,
        )
        try:
            self.store.record_tier_transition(row)
        except RetryLater as exc:  # the transition already happened; a lost audit row is reported
            self.record_error("store", str(exc), now)

    def _consult_advisor(self, now: float) -> None:
        was = self.advisor.override
        self.advisor.step(
            now,
            mech=self.mechanical_state(),
            agreement=self.policy.agreement,
            capacity_band=self.capacity_band,
            price=self.pipeline.price(),
            ready=self.primary.trained,
            make_context=self._advisor_context,
        )
        if self.advisor.override is not was:
            self._dirty = True

    def _trade(self, now: float) -> None:
        """Work the grid to the effective tier (in a replay the symmetric baseline too, on the same candles)."""
        price = self.pipeline.price()
        if price is None:
            return
        candles = self.pipeline.state[1].recent  # the runners take only what is new to them
        effective, source = self.advisor.effective(self.mechanical_state())
        strength = abs(self.policy.bias_signal) * self.direction_skill()
        if effective.tier >= 1:  # an override may disagree with a weak bias; skew at least as for tier 1
            strength = max(strength, self.settings.REGIME_TIER1_BIAS_FLOOR)
        size = self.entry_size()
        posture = Posture(effective.tier, effective.direction, min(1.0, strength), effective.since, source, size)
        self.grid.step(now, candles, price, self.policy.regime, posture)
        if self.grid.changed:
            self.grid.changed, self._dirty = False, True
        if self.baseline is not None:
            self.baseline.step(now, candles, price, self.policy.regime, Posture(since=self.started_at))
            self.stats.record_cycle(
                now,
                price,
                tier=effective.tier,
                direction=effective.direction,
                mechanical_tier=self.mechanical_state().tier,
                shallow=self.primary.trained and self.primary.quality_tier == "shallow",
                capacity_stop=self.grid.capacity_band == STOP,
                symmetric_capacity_stop=self.baseline.capacity_band == STOP,
                regime_aware=self.grid.equity.last,
                symmetric=self.baseline.equity.last,
            )

    @property
    def capacity_band(self) -> str:
        """The grid's capacity band: an input of tier gating and of the advisor's rails."""
        return self.grid.capacity_band

    def _advisor_context(self) -> Callable[[], dict[str, Any]]:
        """Capture what the advisor's context needs, cheaply; the worker thread formats it."""
        facts = self.advisor_facts()
        return lambda: build_regime_context(facts)

    def advisor_facts(self) -> AdvisorFacts:
        """The facts the advisor's panel judges, as they are now.

        Only immutable values and copies are captured (a retrain swaps in a new
        detector, it never changes the old one), so formatting later is safe.
        """
        now, s = self.clock.now(), self.settings

        def model(slot: ModelSlot) -> ModelFacts:
            depth = slot.depth(self.pipeline.available(slot.spec.interval_min), now)
            return ModelFacts(
                interval_min=slot.spec.interval_min,
                signal=slot.signal,
                trained=slot.trained,
                transition_matrix=slot.detector.transition_matrix(),
                quality_tier=depth.quality_tier,
                candles=depth.current_candles,
                target_candles=depth.target_candles,
            )

        return AdvisorFacts(
            pair=s.PAIR,
            now=now,
            price=self.pipeline.price(),
            models=tuple(model(slot) for slot in self.slots()),
            policy=self.policy,
            confidence_modifier=self.confidence_modifier(),
            history=tuple(self.history.to_list()),
            mechanical=self.mechanical_state(),
            capacity_band=self.capacity_band,
            operational=self.grid.operational(now),
        )

    def mechanical_state(self) -> TierState:
        if self.settings.REGIME_DIRECTIONAL_ENABLED:
            return self.tier_state
        return TierState(0, SYMMETRIC, self.pinned_since)

    def slots(self) -> list[ModelSlot]:
        return [self.primary, self.secondary] if self.secondary else [self.primary]

    def record_error(self, source: str, message: str, now: float) -> None:
        """Show a problem in the Errors card; the same problem again only updates its time and count."""
        self.errors.record(source, message, now)

    def cycle_failed(self, exc: BaseException) -> None:
        """A cycle raised: counted for health and shown in the Errors card."""
        now = self.clock.now()
        self.failing_cycles += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"
        self.record_error("main loop", self.last_failure, now)

    def _feed_facts(self) -> tuple[FeedFacts, ...]:
        """Each candle feed's newest close time, freshness limit and last error."""
        out = []
        for label, feed in self.pipeline.health(self.clock.now()).items():
            newest = feed["newest_candle_time"]
            end = None if newest is None else float(newest + 60 * feed["interval_min"])
            out.append(FeedFacts(label, end, feed["freshness_limit_sec"], feed["last_error"]))
        return tuple(out)

    def health_facts(self) -> HealthFacts:
        """What the health verdict is computed from (SPEC section 10); immutable, so other threads may keep it."""
        s = self.settings
        return HealthFacts(
            started_at=self.started_at,
            loop_limit_sec=3 * self.interval_sec,
            failing_cycles=self.failing_cycles,
            last_failure=self.last_failure,
            feeds=self._feed_facts(),
            # Saved at least every interval, checked every cycle: a longer gap means saving fails.
            persist_limit_sec=s.STATE_SNAPSHOT_INTERVAL_SEC + 2 * self.interval_sec if self.autosave else None,
            last_saved_at=self._last_snapshot_at,
            save_error=self._save_error,
        )

    # snapshot -------------------------------------------------------------------

    def _save_snapshot_if_due(self, now: float) -> None:
        if not self.autosave:  # a replay saves once, at the end: it is never resumed mid-way
            return
        due = (
            self._last_snapshot_at is None or now - self._last_snapshot_at >= self.settings.STATE_SNAPSHOT_INTERVAL_SEC
        )
        if self._dirty or due:
            self.save_snapshot(now)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "pair": self.settings.PAIR,
            "mode": self.mode,
            "saved_at": now,
            "tier": asdict(self.tier_state),
            "pinned_since": self.pinned_since,
            "direction_skill": skill_to_dict(self.skill),
            "models": {slot.spec.name: slot.snapshot() for slot in self.slots()},
            "regime_history": self.history.to_list(),
            "advisor": self.advisor.snapshot(),
            "grid": self.grid.snapshot(),
        }

    def save_snapshot(self, now: float) -> None:
        with self._save_lock:
            snap = self.snapshot(now)
            if not self._write_snapshot(snap, now):
                return
        self._last_snapshot_at, self._dirty, self._save_error = now, False, None

    def _write_snapshot(self, snap: dict[str, Any], now: float) -> bool:
        """Save ``snap``, keeping the one it replaces as ``snapshot:PAIR:previous`` (same transaction).

        What is replaced was written or restore-checked by this process, so the kept copy is a good one.
        """
        bad = first_non_finite(snap)
        if bad is not None:  # never written: the last good snapshot stays
            self._save_error = f"snapshot not saved: {bad[0]} is {bad[1]!r}, not a finite number"
            self.record_error("store", self._save_error, now)
            log.error("snapshot not saved: %s is %r", *bad)
            return False
        try:
            self.store.save_state(self.snapshot_key, snap, now, previous_key=previous_key(self.settings.PAIR))
        except RetryLater as exc:  # keep going; the next cycle tries again
            self._save_error = str(exc)
            self.record_error("store", str(exc), now)
            log.error("%s", exc)
            return False
        self._saved_snapshot = snap
        return True

    def _save_advisor_change(self, now: float) -> bool:
        """Persist an operator action at once (HTTP thread): the last snapshot with the new advisor state.

        Building a whole snapshot here would read the loop's state mid-cycle,
        so only the advisor part is replaced; the loop saves in full next cycle.
        """
        self._dirty = True
        with self._save_lock:
            base = self._saved_snapshot
            if base is None:
                return False
            snap = {**base, "advisor": self.advisor.snapshot(), "saved_at": max(base["saved_at"], now)}
            return self._write_snapshot(snap, now)

    def _restore(self, snap: dict[str, Any]) -> None:
        """Restore a snapshot :func:`snapshots.check_snapshot` accepted; a part its owner refuses raises."""
        now = self.clock.now()
        t = snap["tier"]
        self.tier_state = TierState(int(t["tier"]), str(t["direction"]), float(t["since"]))
        self.pinned_since = float(snap.get("pinned_since", self.pinned_since))
        log.info("tier state restored: tier %d %s since %s", t["tier"], t["direction"], iso_utc(t["since"]))
        for entry in snap.get("regime_history", []):
            self.history.append(float(entry["ts"]), str(entry["regime"]), float(entry["conf"]))
        if snap.get("direction_skill") is not None:
            try:
                self.skill = skill_from_dict(snap["direction_skill"], now)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"direction_skill: {exc}") from None
        self.advisor.restore(snap.get("advisor"), now)
        models = snap.get("models") or {}
        for slot in self.slots():
            if slot.restore(models.get(slot.spec.name)):
                log.info(
                    "%s model restored from the snapshot (trained at %s, %d candles)",
                    slot.spec.name,
                    iso_utc(slot.trained_at),
                    slot.trained_candles,
                )
        self.history.trim(now)
        if snap.get("grid"):
            try:
                self.grid.restore(snap["grid"], self.pipeline.price())
            except (KeyError, TypeError, ValueError) as exc:
                # Never trade on a grid we cannot read: its orders may still rest on the exchange.
                raise ValueError(f"grid: {exc}") from None
            log.info("grid restored: %d open orders", len(self.grid.state.orders) if self.grid.state else 0)

    # status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The full ``/api/status`` payload (SPEC section 12)."""
        now = self.clock.now()
        s = self.settings
        modifier = self.confidence_modifier()

        def model(slot: ModelSlot | None) -> ModelPart | None:
            if slot is None:
                return None
            interval = slot.spec.interval_min
            depth = slot.depth(self.pipeline.available(interval), now)
            matrix = slot.detector.transition_matrix()
            return ModelPart(interval, slot.signal, slot.trained, slot.trained_at, matrix, depth, slot.last_error)

        pipeline = self.pipeline.health(now)
        age = None if self.last_cycle_at is None else now - self.last_cycle_at
        health = verdict(self.health_facts(), now=now, loop_age_sec=age)
        tier = TierPart(
            computed=self.tier_state,
            directional_enabled=s.REGIME_DIRECTIONAL_ENABLED,
            pinned_since=self.pinned_since,
            decision=self.tier_decision,
            capacity_band=self.capacity_band,
            transitions=tuple(self.transitions),
            skill={**skill_status(self.skill, self.skill_settings), "gate": s.REGIME_SKILL_GATE},
            entry_size=self.entry_size(),
        )
        parts = StatusParts(
            mode=self.mode,
            pair=s.PAIR,
            now=now,
            price=self.pipeline.price(),
            primary=model(self.primary),
            secondary=model(self.secondary),
            policy=self.policy,
            confidence_modifier=modifier,
            consensus_weights=(s.CONSENSUS_1M_WEIGHT, s.CONSENSUS_15M_WEIGHT),
            pipeline=pipeline,
            tier=tier,
            history=tuple(self.history.to_list()),
            price_history=tuple(self.price_history),
            grid=self.grid.status_block(now),
            trades_backfill=self.backfill.status() if self.backfill is not None else NO_BACKFILL,
            store=self.store.status(),
            simulated=self._truth is not None,
            true_regime=self._truth() if self._truth else None,
            health=HealthPart(
                verdict=health,
                cycles=self.cycles,
                failing_cycles=self.failing_cycles,
                last_cycle_at=self.last_cycle_at,
                cycle_ms=tuple(self.cycle_ms),
                started_at=self.started_at,
                errors=tuple(self.errors),
            ),
            settings=s.redacted(),
            advisor=self._advisor_part(),
        )
        return build_status(parts)

    def advisor_view(self, status: dict[str, Any]) -> dict[str, Any]:
        """``status`` with the advisor block and the effective tier as they are now.

        After an operator action the HTTP thread uses it to refresh the
        published status without waiting for the next cycle.
        """
        return with_advisor(status, self._advisor_part())

    def _advisor_part(self) -> AdvisorPart:
        now = self.clock.now()
        mech = self.mechanical_state()
        effective, source = self.advisor.effective(mech)
        block = self.advisor.status_block(
            now,
            mech=mech,
            capacity_band=self.capacity_band,
            directional_enabled=self.settings.REGIME_DIRECTIONAL_ENABLED,
            ready=self.primary.trained,
        )
        return AdvisorPart(effective, source, block)

    # operator actions (called from HTTP threads through the action router) ----------------

    def actions(self) -> dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]]:
        """The operator actions the router offers, by name."""
        return {
            "ai_regime_override": self.ai_regime_override,
            "ai_regime_revert": self.ai_regime_revert,
            "ai_regime_dismiss": self.ai_regime_dismiss,
        }

    def ai_regime_override(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        now = self.clock.now()
        result = self.advisor.apply(
            payload,
            now,
            mech=self.mechanical_state(),
            capacity_band=self.capacity_band,
            directional_enabled=self.settings.REGIME_DIRECTIONAL_ENABLED,
        )
        return {**result, "saved": self._save_advisor_change(now)}

    def ai_regime_revert(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        now = self.clock.now()
        result = self.advisor.revert(payload, now, mech=self.mechanical_state())
        return {**result, "saved": self._save_advisor_change(now)}

    def ai_regime_dismiss(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return self.advisor.dismiss(payload, self.clock.now(), mech=self.mechanical_state())
