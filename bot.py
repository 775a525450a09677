"""Regime-aware grid bot for Kraken: wiring and the main loop.

``python bot.py --help`` lists the modes and flags. One :meth:`Bot.tick` is
one cycle of SPEC section 0, in the same order; :class:`Runner` owns pacing,
the heartbeat and stopping. Decisions live in pure modules
(``training_depth``, ``regime_policy``); I/O lives in adapters (``store``,
``kraken_client``, ``market_sim``, ``replay``, ``http_api``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

import dashboard
from ai_advisor import Panel, build_regime_context
from candle_pipeline import CandlePipeline, FeedSpec
from candles import MarketData, read_candles_csv
from clock import Clock, SimClock, WallClock, iso_utc
from config import Settings, load_settings
from errors import BadData, BotError, ConfigError, RetryLater
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard
from kraken_client import KrakenPublicClient
from market_sim import SimulatedMarket
from model_slot import ModelSlot, model_slots
from regime_advisor import RegimeAdvisor
from regime_policy import (
    NO_SIGNAL,
    SYMMETRIC,
    PolicySignal,
    RegimeHistory,
    TierDecision,
    TierSettings,
    TierState,
    next_tier,
    policy_signal,
)
from replay import ReplayMarket, replay_report
from status import (
    advisor_facts,
    consensus_block,
    cycle_time_summary,
    effective_tier_block,
    model_block,
    policy_block,
    regime_tier_block,
)
from store import SQLiteStore, Store

log = logging.getLogger("bot")

SNAPSHOT_VERSION = 1
SIM_DB_DEFAULT = "data/sim.sqlite3"
PRICE_HISTORY_LEN = 240
MAX_RETRAIN_RECORDS = 2000


@dataclass
class RunStats:
    """What happened during this process's run (the replay report reads it)."""

    candles_processed: int = 0
    tier_seconds: dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 0.0, 2: 0.0})
    tier_changes: int = 0
    retrains: list[dict] = field(default_factory=list)


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
        truth: Callable[[], str | None] | None = None,
        panel: Panel | None = None,
    ) -> None:
        s = settings
        self.settings, self.mode, self.clock, self.market, self.store = s, mode, clock, market, store
        self._truth = truth
        self.snapshot_key = f"snapshot:{s.PAIR}"

        self.primary, self.secondary = model_slots(s)
        cadence = {1: s.HMM_OHLCV_SYNC_INTERVAL_SEC, 15: s.HMM_SECONDARY_SYNC_INTERVAL_SEC}
        feeds = [
            FeedSpec(slot.spec.interval_min, cadence[slot.spec.interval_min], slot.spec.target, slot.window_size)
            for slot in self.slots()
        ]
        self.pipeline = CandlePipeline(store, market, s.PAIR, feeds, retention_days=s.OHLCV_RETENTION_DAYS)
        self.tier_settings = TierSettings(
            tier1_confidence=s.REGIME_TIER1_CONFIDENCE,
            tier2_confidence=s.REGIME_TIER2_CONFIDENCE,
            tier1_bias_floor=s.REGIME_TIER1_BIAS_FLOOR,
            tier2_bias_floor=s.REGIME_TIER2_BIAS_FLOOR,
            hysteresis=s.REGIME_HYSTERESIS,
            min_dwell_sec=s.REGIME_MIN_DWELL_SEC,
        )

        now = clock.now()
        self.started_at = now
        self.tier_state = TierState(0, SYMMETRIC, now)  # computed every cycle ("would be" in shadow mode)
        self.pinned_since = now
        self.tier_decision: TierDecision | None = None
        self.policy = self._policy()
        self.capacity_band = "normal"  # an input; the grid engine will provide it
        self.history = RegimeHistory(1800.0)
        self.price_history: deque[dict] = deque(maxlen=PRICE_HISTORY_LEN)
        self.transitions: deque[dict] = deque(maxlen=10)
        self.errors: deque[dict] = deque(maxlen=20)
        self.stats = RunStats()
        self.cycles = 0
        self.last_cycle_at: float | None = None
        self.cycle_ms: deque[float] = deque(maxlen=500)  # wall time of recent cycles, for health
        self._last_account_at = now
        self._last_snapshot_at: float | None = None
        self._dirty = False
        self._saved_snapshot: dict[str, Any] | None = None
        self._save_lock = threading.Lock()  # the loop's snapshot vs an operator action's
        self.advisor = RegimeAdvisor(s, store=store, record_error=self.record_error, panel=panel)

    # lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Restore the snapshot (tier state, models) and prime the candle pipeline."""
        self.pipeline.prime()
        snap = self.store.load_state(self.snapshot_key)
        if snap:
            self._restore(snap)
        self.advisor.start()

    def shutdown(self) -> None:
        self.advisor.stop()
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
        self.history.trim(now)
        self._save_snapshot_if_due(now)
        self.cycles += 1
        self.last_cycle_at = now
        self.cycle_ms.append((time.perf_counter() - started) * 1000.0)

    def _account_time(self, now: float) -> None:
        tier = self.mechanical_state().tier
        self.stats.tier_seconds[tier] += max(0.0, now - self._last_account_at)
        self._last_account_at = now

    def _sync_candles(self, now: float) -> None:
        before = self.pipeline.available(1)
        self.pipeline.sync_due_feeds(now)
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
        )

    def confidence_modifier(self) -> float:
        """The primary's training-depth modifier; the smaller of both under consensus."""
        if self.policy.source == "consensus" and self.secondary:
            return min(self.primary.confidence_modifier, self.secondary.confidence_modifier)
        return self.primary.confidence_modifier

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
        )
        self.tier_decision = decision
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

    def _advisor_context(self) -> Callable[[], dict[str, Any]]:
        """Capture what the advisor's context needs, cheaply; the worker thread formats it.

        Only immutable values and copies are captured (a retrain swaps in a new
        detector, it never changes the old one), so formatting later is safe.
        """
        now, s = self.clock.now(), self.settings
        models = [
            (slot.spec.interval_min, slot.detector, slot.signal, slot.trained, slot.trained_at,
             slot.depth(self.pipeline.available(slot.spec.interval_min), now))
            for slot in self.slots()
        ]  # fmt: skip
        facts = {
            "pair": s.PAIR,
            "now": now,
            "price": self.pipeline.price(),
            "models": models,
            "policy": self.policy,
            "modifier": self.confidence_modifier(),
            "weights": (s.CONSENSUS_1M_WEIGHT, s.CONSENSUS_15M_WEIGHT),
            "history": self.history.to_list(),
            "mechanical": self.mechanical_state(),
            "capacity_band": self.capacity_band,
        }
        return lambda: build_regime_context(advisor_facts(**facts), operational=None)

    def mechanical_state(self) -> TierState:
        if self.settings.REGIME_DIRECTIONAL_ENABLED:
            return self.tier_state
        return TierState(0, SYMMETRIC, self.pinned_since)

    def slots(self) -> list[ModelSlot]:
        return [self.primary, self.secondary] if self.secondary else [self.primary]

    def record_error(self, source: str, message: str, now: float) -> None:
        self.errors.appendleft({"ts": now, "source": source, "message": message})

    # snapshot -------------------------------------------------------------------

    def _save_snapshot_if_due(self, now: float) -> None:
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
            "tier": {
                "tier": self.tier_state.tier,
                "direction": self.tier_state.direction,
                "since": self.tier_state.since,
            },
            "pinned_since": self.pinned_since,
            "models": {slot.spec.name: slot.snapshot() for slot in self.slots()},
            "regime_history": self.history.to_list(),
            "advisor": self.advisor.snapshot(),
        }

    def save_snapshot(self, now: float) -> None:
        with self._save_lock:
            snap = self.snapshot(now)
            try:
                self.store.save_state(self.snapshot_key, snap, now)
            except RetryLater as exc:  # keep going; the next cycle tries again
                self.record_error("store", str(exc), now)
                log.error("%s", exc)
                return
            self._saved_snapshot = snap
        self._last_snapshot_at, self._dirty = now, False

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
            try:
                self.store.save_state(self.snapshot_key, snap, now)
            except RetryLater as exc:
                self.record_error("store", str(exc), now)
                return False
            self._saved_snapshot = snap
            return True

    def _restore(self, snap: dict[str, Any]) -> None:
        if snap.get("version") != SNAPSHOT_VERSION or snap.get("pair") != self.settings.PAIR:
            log.warning("ignoring a snapshot of version %r for pair %r", snap.get("version"), snap.get("pair"))
            return
        try:
            t = snap["tier"]
            tier = TierState(int(t["tier"]), str(t["direction"]), float(t["since"]))
            if tier.tier not in (0, 1, 2) or tier.direction not in ("symmetric", "long_bias", "short_bias"):
                raise ValueError(f"bad tier {t}")
            self.tier_state = tier
            self.pinned_since = float(snap.get("pinned_since", self.pinned_since))
            log.info("tier state restored: tier %d %s since %s", tier.tier, tier.direction, iso_utc(tier.since))
            for entry in snap.get("regime_history", []):
                self.history.append(float(entry["ts"]), str(entry["regime"]), float(entry["conf"]))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("snapshot tier state unusable (%s); starting at tier 0", exc)
        self.advisor.restore(snap.get("advisor"), self.clock.now())
        models = snap.get("models") or {}
        for slot in self.slots():
            if slot.restore(models.get(slot.spec.name)):
                log.info(
                    "%s model restored from the snapshot (trained at %s, %d candles)",
                    slot.spec.name,
                    iso_utc(slot.trained_at),
                    slot.trained_candles,
                )
        self.history.trim(self.clock.now())

    # status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The full ``/api/status`` payload (SPEC section 12)."""
        now = self.clock.now()
        s = self.settings
        modifier = self.confidence_modifier()

        def block(slot: ModelSlot | None) -> dict | None:
            if slot is None:
                return None
            interval = slot.spec.interval_min
            return model_block(
                interval_min=interval,
                signal=slot.signal,
                trained=slot.trained,
                trained_at=slot.trained_at,
                transition_matrix=slot.detector.transition_matrix(),
                depth=slot.depth(self.pipeline.available(interval), now),
                last_error=slot.last_error,
            )

        pipeline = self.pipeline.health(now)
        age = None if self.last_cycle_at is None else now - self.last_cycle_at
        status = {
            "mode": self.mode,
            "pair": s.PAIR,
            "now": now,
            "now_iso": iso_utc(now),
            "price": self.pipeline.price(),
            "hmm": {
                "primary": block(self.primary),
                "secondary": block(self.secondary),
                "consensus": consensus_block(self.policy, (s.CONSENSUS_1M_WEIGHT, s.CONSENSUS_15M_WEIGHT)),
                "policy": policy_block(self.policy, modifier),
            },
            "hmm_data_pipeline": pipeline,
            "regime_tier": regime_tier_block(
                computed=self.tier_state,
                directional_enabled=s.REGIME_DIRECTIONAL_ENABLED,
                pinned_since=self.pinned_since,
                decision=self.tier_decision,
                capacity_band=self.capacity_band,
                transitions=self.transitions,
            ),
            "regime_history_30m": self.history.to_list(),
            "price_history": list(self.price_history),
            "ai_regime_advisor": None,  # filled by advisor_view
            "grid": None,
            "sim": {"true_regime": self._truth()} if self._truth else None,
            "health": {
                "ok": age is not None
                and age <= 3 * s.LOOP_INTERVAL_SEC
                and all(feed["status"] == "ok" for feed in pipeline.values()),
                "cycles": self.cycles,
                "last_cycle_at": self.last_cycle_at,
                "cycle_ms": cycle_time_summary(self.cycle_ms),
                "started_at": self.started_at,
                "errors": list(self.errors),
            },
            "settings": s.redacted(),
        }
        return self.advisor_view(status)

    def advisor_view(self, status: dict[str, Any]) -> dict[str, Any]:
        """``status`` with the advisor block and the effective tier as they are now.

        The main loop uses it for every status; after an operator action the
        HTTP thread uses it to refresh the published status without waiting
        for the next cycle.
        """
        now = self.clock.now()
        mech = self.mechanical_state()
        effective, source = self.advisor.effective(mech)
        ready = self.primary.trained
        block = self.advisor.status_block(
            now,
            mech=mech,
            capacity_band=self.capacity_band,
            directional_enabled=self.settings.REGIME_DIRECTIONAL_ENABLED,
            ready=ready,
        )
        tier = {**status["regime_tier"], **effective_tier_block(effective, source)}
        return {**status, "regime_tier": tier, "ai_regime_advisor": block}

    # operator actions (called from HTTP threads through the action router) ----------------

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


class Runner:
    """Paces :meth:`Bot.tick`, publishes the status, beats the heartbeat, stops on request."""

    def __init__(
        self,
        bot: Bot,
        board: StatusBoard,
        *,
        interval_sec: float,
        stop_event: threading.Event,
        publish_every_wall_sec: float = 0.2,
    ) -> None:
        self.bot, self.board, self.interval = bot, board, interval_sec
        self.stop_event = stop_event
        self.publish_every = publish_every_wall_sec
        self._last_publish: float | None = None
        self._publish_lock = threading.Lock()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        clock = self.bot.clock
        next_due = clock.now()
        while not self.stop_event.is_set():
            self.cycle()
            if until is not None and until():
                break
            next_due = max(next_due + self.interval, clock.now())
            clock.sleep(next_due - clock.now())
        self.publish()

    def cycle(self) -> None:
        try:
            self.bot.tick()
        except Exception as exc:  # one bad cycle must not end the bot
            log.exception("cycle failed")
            self.bot.record_error("main loop", f"{type(exc).__name__}: {exc}", self.bot.clock.now())
        self.board.beat()
        wall = time.monotonic()
        if self._last_publish is None or wall - self._last_publish >= self.publish_every:
            self.publish()

    def publish(self) -> None:
        with self._publish_lock:
            self.board.publish(self.bot.status())
        self._last_publish = time.monotonic()

    def action(self, handler: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Callable[[Mapping], dict]:
        """``handler`` for the action router: the published status shows its effect when it returns.

        The lock keeps a status built before the action from being published after it.
        """

        def run(payload: Mapping[str, Any]) -> dict[str, Any]:
            with self._publish_lock:
                result = handler(payload)
                current = self.board.status()
                if current is not None:
                    self.board.publish(self.bot.advisor_view(current))
            return result

        return run


# wiring ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bot.py",
        description="Regime-aware grid bot for Kraken. Without flags: paper trading on live Kraken "
        "public data, SQLite store, dashboard on http://127.0.0.1:8080.",
        epilog="Settings come from flags, then the environment, then .env, then defaults "
        "(see .env.example for every key).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--market",
        choices=("kraken", "sim"),
        default="kraken",
        help="market data source: kraken (live public data, default) or sim "
        "(offline seeded regime-switching simulator on a simulated clock; its own store, "
        f"default {SIM_DB_DEFAULT})",
    )
    mode.add_argument(
        "--replay",
        metavar="FILE.csv",
        help="run the bot over 1-minute candles (time,open,high,low,close,volume; unix "
        "seconds) on a simulated clock as fast as possible, write a JSON report, exit; "
        "uses an in-memory store unless --db is given",
    )
    mode.add_argument(
        "--live", action="store_true", help="real orders on Kraken (not available in this version: paper only)"
    )
    p.add_argument("--host", help="address to serve the dashboard/API on (HTTP_HOST, default 127.0.0.1)")
    p.add_argument("--port", help="port of the dashboard/API (HTTP_PORT, default 8080; 0 = any free port)")
    p.add_argument("--db", help="SQLite store path (DB_PATH for the kraken market)")
    p.add_argument("--speed", help="simulated seconds per wall second for --market sim, or 'max' (SIM_SPEED)")
    p.add_argument("--seed", help="simulator seed (SIM_SEED)")
    p.add_argument("--report", metavar="PATH", help="replay report path (default: FILE.report.json)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve the dashboard during a replay and keep it up after it ends (until Ctrl-C)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
    p.add_argument("--env-file", default=".env", help="settings file to read (default .env)")
    return p.parse_args(argv)


@dataclass
class App:
    bot: Bot
    runner: Runner
    board: StatusBoard
    server: ApiServer | None
    until: Callable[[], bool] | None = None
    replay: ReplayMarket | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def build_app(args: argparse.Namespace, settings: Settings, stop_event: threading.Event) -> App:
    """Choose the clock, market and store for the mode, and wire the bot."""
    if args.live:
        raise ConfigError("--live is not available in this version: it has no order execution yet (paper only)")
    s = settings
    truth = None
    replay_market = None
    interval = s.LOOP_INTERVAL_SEC
    if args.replay:
        candles = read_candles_csv(args.replay)
        store = SQLiteStore(args.db or ":memory:")
        clock = SimClock(candles[0].time + 60, math.inf, stop_event)
        replay_market = ReplayMarket(clock, candles)
        market: MarketData = replay_market
        mode, interval = "replay", 60.0  # one cycle per candle
    elif args.market == "sim":
        store = SQLiteStore(args.db or SIM_DB_DEFAULT)
        start = _sim_resume_time(store, s)
        clock = SimClock(start, s.SIM_SPEED, stop_event)
        sim = SimulatedMarket(clock, seed=s.SIM_SEED, start=s.SIM_START)
        market, truth, mode = sim, sim.current_truth, "sim"
    else:
        store = SQLiteStore(args.db or s.DB_PATH)
        clock = WallClock(stop_event)
        market = KrakenPublicClient(
            s.KRAKEN_API_URL,
            s.PAIR,
            now=clock.now,
            sleep=clock.sleep,
            timeout=s.KRAKEN_TIMEOUT_SEC,
            max_retries=s.KRAKEN_MAX_RETRIES,
        )
        mode = "paper"

    bot = Bot(s, mode=mode, clock=clock, market=market, store=store, truth=truth)
    board = StatusBoard()
    router = ActionRouter()
    runner = Runner(bot, board, interval_sec=interval, stop_event=stop_event)
    for name in ("ai_regime_override", "ai_regime_revert", "ai_regime_dismiss"):
        router.register(name, runner.action(getattr(bot, name)))
    server = None
    if not args.replay or args.serve:
        ctx = ApiContext(board, router, dashboard.render_page(), s.API_TOKEN, 3 * s.LOOP_INTERVAL_SEC)
        server = ApiServer(s.HTTP_HOST, s.HTTP_PORT, ctx)
    until = (lambda: replay_market.finished) if replay_market else None
    return App(bot, runner, board, server, until, replay_market, [store.close])


def _sim_resume_time(store: Store, s: Settings) -> float:
    """A simulation continues where its snapshot left off; the seed must match the store's."""
    meta_key = "sim"
    meta = store.load_state(meta_key)
    if meta is None:
        store.save_state(meta_key, {"seed": s.SIM_SEED, "start": s.SIM_START}, s.SIM_START)
    elif (meta.get("seed"), meta.get("start")) != (s.SIM_SEED, s.SIM_START):
        raise ConfigError(
            f"this store holds a simulation with SIM_SEED={meta.get('seed')} and SIM_START={meta.get('start')}; "
            f"use another --db for SIM_SEED={s.SIM_SEED} / SIM_START={s.SIM_START}"
        )
    snap = store.load_state(f"snapshot:{s.PAIR}")
    saved = snap.get("saved_at") if snap else None
    return float(saved) if isinstance(saved, (int, float)) and saved > s.SIM_START else float(s.SIM_START)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "HTTP_HOST": args.host,
        "HTTP_PORT": args.port,
        "SIM_SPEED": args.speed,
        "SIM_SEED": args.seed,
        "LOG_LEVEL": args.log_level,
    }
    if args.db and not args.replay and args.market == "kraken":
        overrides["DB_PATH"] = args.db
    try:
        settings = load_settings(overrides, env_file=args.env_file)
    except ConfigError as exc:
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("hmmlearn").setLevel(logging.ERROR)

    # The HTTP threads wait for the GIL while the loop computes: a shorter switch
    # interval, and no BLAS/OpenMP worker threads (the matrices are tiny) competing
    # for a small VPS's cores, keep /api/status fast while the loop is busy.
    sys.setswitchinterval(0.001)
    threadpool_limits(1)
    stop_event = threading.Event()
    try:
        app = build_app(args, settings, stop_event)
    except (ConfigError, BadData) as exc:
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.bot.start()
        app.runner.publish()  # the API answers with the restored state from its first request
        if app.server:
            port = app.server.start()
            log.info(
                "dashboard on http://%s:%d/ (mode %s, pair %s)", settings.HTTP_HOST, port, app.bot.mode, settings.PAIR
            )
        wall_started = time.perf_counter()
        app.runner.run(app.until)
        wall_sec = time.perf_counter() - wall_started
        app.bot.shutdown()
        if app.replay:
            report = replay_report(
                source=args.replay,
                market=app.replay,
                stats=app.bot.stats.__dict__,
                final_status=app.board.status() or app.bot.status(),
                wall_sec=wall_sec,
            )
            path = Path(args.report or f"{args.replay}.report.json")
            _write_json_atomically(path, report)
            log.info("replay of %d candles done in %.1fs; report written to %s", report["candles"], wall_sec, path)
            if app.server and not stop_event.is_set():
                log.info("serving the dashboard until Ctrl-C")
                stop_event.wait()
    except BotError as exc:
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if app.server:
            app.server.stop()
        for close in app.cleanup:
            close()
    log.info("stopped cleanly")
    return 0


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(run())
