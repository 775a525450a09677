"""The command line and the wiring: one clock, market, store and exchange per mode (SPEC section 1).

``python bot.py`` lands here: :func:`run` parses the flags, loads the settings,
builds the parts for the mode (:func:`build_app`) and runs the loop until a
signal, or until a replay's candles run out and its report is written.
:func:`build_bot` turns the settings into the bot's own parts (models, candle
pipeline, advisor, grids, error log); tests and tools build the bot through it.
The loop never imports this module.
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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

import dashboard
from advisor.runtime import RegimeAdvisor
from ai_advisor import Panel
from candles import MarketData, read_candles_csv
from clock import Clock, SimClock, WallClock
from config import Settings, allowed_hosts, live_problems, load_settings
from errors import BadData, BotError, ConfigError, RetryLater
from grid.engine import GridConfig
from grid.exchange import PairRules
from grid.paper_exchange import paper_exchange_factory
from grid.runner import GridRunner, RunnerSettings
from hmm_regime_detector import RegimeDetector
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard
from kraken.exchange import KrakenExchange
from kraken.pair_rules import describe_rules, kraken_table_rules, replay_pair, replay_table_pair, sim_pair
from kraken.private_client import KrakenPrivateClient, NonceSource
from kraken.public_client import KrakenPublicClient, PairInfo, UnknownPair
from kraken.trades_backfill import TradesBackfill
from loop.cycle import SIM_DB_DEFAULT, Bot
from loop.error_log import ErrorLog
from loop.runner import Runner
from loop.snapshots import current_key, previous_key
from market import replay_batch
from market.pipeline import CandlePipeline, FeedSpec
from market.replay import ReplayMarket, replay_report, strategies_report
from market.replay_plot import write_plot
from market.sim import SimParams, SimulatedMarket
from regime.direction_skill import SkillSettings
from regime.model_slot import ModelSlot, SlotSpec, detector_options
from regime.policy import TierSettings
from store import migration as store_migration
from store.interface import Store
from store.mirrored import open_store
from store.sqlite import SQLiteStore, StoreLock
from store.supabase import StoreLease, SupabaseStore

log = logging.getLogger("bot")


def build_parser() -> argparse.ArgumentParser:
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
        nargs="+",
        metavar="FILE.csv",
        help="run the bot over 1-minute candles (time,open,high,low,close,volume; unix "
        "seconds) on a simulated clock as fast as possible, write a JSON report and a plot per "
        "file and summary.json/summary.md over all of them, exit; several files (or a folder "
        "of *_1m.csv files) run in parallel, one process each; uses an in-memory store unless "
        "--db is given (one file only)",
    )
    mode.add_argument(
        "--live",
        action="store_true",
        help="real orders on Kraken's live market (needs KRAKEN_API_KEY, KRAKEN_API_SECRET and "
        "LIVE_TRADING_CONFIRM=real-money)",
    )
    mode.add_argument(
        "--migrate-to-supabase",
        action="store_true",
        help="copy the SQLite store at DB_PATH (or --db) into Supabase (SUPABASE_URL, SUPABASE_KEY) "
        "with progress, then exit; safe to run again",
    )
    p.add_argument("--host", help="address to serve the dashboard/API on (HTTP_HOST, default 127.0.0.1)")
    p.add_argument("--port", help="port of the dashboard/API (HTTP_PORT, default 8080; 0 = any free port)")
    p.add_argument("--db", help="SQLite store path (DB_PATH for the kraken market)")
    p.add_argument("--speed", help="simulated seconds per wall second for --market sim, or 'max' (SIM_SPEED)")
    p.add_argument("--seed", help="simulator seed (SIM_SEED)")
    p.add_argument(
        "--pair",
        metavar="NAME",
        help="Kraken pair (PAIR), e.g. XBTUSD; with --replay, the built-in pair whose rules every replayed "
        "file trades under (default: the pair the file name starts with, else rules from its prices)",
    )
    p.add_argument("--report", metavar="PATH", help="replay report path, one file only (default: FILE.csv.report.json)")
    p.add_argument(
        "--report-dir",
        metavar="DIR",
        help="replay: write every file's report and plot (NAME.report.json/.html) and summary.json and "
        "summary.md here (default: reports beside each file, the summary beside the first report)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="replay: files replayed at once, one process each (default: min(files, CPU cores))",
    )
    p.add_argument(
        "--replay-worker",
        action="store_true",
        help="internal, used by a multi-file --replay for each of its files: progress and result as "
        "JSON lines on stdout, no summary, SIGTERM stops at once",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve the dashboard during a replay and keep it up after it ends (until Ctrl-C)",
    )
    recovery = p.add_mutually_exclusive_group()
    recovery.add_argument(
        "--restore-previous",
        action="store_true",
        help="start from the snapshot kept under snapshot:PAIR:previous (the one the last save replaced) "
        "when the current one is refused; the refused one is moved aside to snapshot:PAIR:rejected:<time>",
    )
    recovery.add_argument(
        "--discard-snapshot",
        action="store_true",
        help="start from scratch, without the pair's snapshot; it is moved aside to "
        "snapshot:PAIR:rejected:<time>, not deleted",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
    p.add_argument(
        "--env-file",
        metavar="PATH",
        help="settings file to read; it must exist (default: .env in the working folder, when there is one)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@dataclass
class App:
    bot: Bot
    runner: Runner
    board: StatusBoard
    server: ApiServer | None
    until: Callable[[], bool] | None = None
    replay: ReplayMarket | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    lock: StoreLock | None = None  # one bot per SQLite store
    lease: StoreLease | None = None  # one bot per pair on a Supabase project
    lost: list[str] = field(default_factory=list)  # why the lease was lost (the bot then stops)


def build_app(args: argparse.Namespace, settings: Settings, stop_event: threading.Event) -> App:
    """Choose the clock, market and store for the mode, and wire the bot."""
    s = settings
    if args.live and live_problems(s):
        raise ConfigError("; ".join(live_problems(s)))
    truth = None
    lease = None
    replay_market = None
    backfill = None  # only Kraken serves trades
    grid = None  # the paper grid unless live
    rules: PairRules | None = None  # the paper grids' order rules
    interval = s.LOOP_INTERVAL_SEC
    lock = None
    errors = ErrorLog()  # the Errors card every part reports to
    if args.replay:
        candles = read_candles_csv(args.replay)
        pair, rules, source = replay_pair(args.replay, candles, args.pair, s)
        s = replace(s, PAIR=pair)
        log.info("replay of %s as %s, rules from the %s: %s", args.replay, pair, source, describe_rules(rules))
        lock = _lock_store(args.db, "replay", s) if args.db else None
        store = SQLiteStore(args.db or ":memory:")
        clock = SimClock(candles[0].time + 60, math.inf, stop_event)
        replay_market = ReplayMarket(clock, candles)
        market: MarketData = replay_market
        mode, interval = "replay", 60.0  # one cycle per candle
    elif args.market == "sim":
        lock = _lock_store(args.db or SIM_DB_DEFAULT, "sim", s)
        store = SQLiteStore(args.db or SIM_DB_DEFAULT)
        start = _sim_resume_time(store, s, restore_previous=args.restore_previous)
        clock = SimClock(start, s.SIM_SPEED, stop_event)
        rules, start_price = sim_pair(s.PAIR, SimParams().start_price, s.GRID_MAKER_FEE_PCT)
        params = SimParams(start_price=start_price, price_decimals=rules.price_decimals)
        sim = SimulatedMarket(clock, seed=s.SIM_SEED, start=s.SIM_START, params=params)
        market, truth, mode = sim, sim.current_truth, "sim"
    else:
        clock = WallClock(stop_event)
        market = KrakenPublicClient(
            s.KRAKEN_API_URL,
            s.PAIR,
            now=clock.now,
            sleep=clock.sleep,
            timeout=s.KRAKEN_TIMEOUT_SEC,
            max_retries=s.KRAKEN_MAX_RETRIES,
        )
        if not args.live:  # before the store opens: an unknown pair stops the start touching nothing
            rules = _paper_rules(s, market)
        lock = _lock_store(args.db or s.DB_PATH, "live" if args.live else "paper", s)
        try:
            lease = _take_lease(s, args.db or s.DB_PATH, clock.now)  # before the mirror sends anything
            store = open_store(s, clock.now, args.db or s.DB_PATH)
        except BaseException:
            lock.release()
            raise
        mode = "live" if args.live else "paper"
        if args.live:
            grid = _live_grid(s, clock, store, errors)
        backfill = TradesBackfill(
            # Its own client: a requests.Session is not shared between threads.
            KrakenPublicClient(
                s.KRAKEN_API_URL, s.PAIR, now=clock.now, sleep=clock.sleep, timeout=s.KRAKEN_TIMEOUT_SEC
            ),
            store,
            s.PAIR,
            clock=clock,
            target_1m=s.HMM_TRAINING_CANDLES,
            target_15m=s.HMM_SECONDARY_TRAINING_CANDLES if s.HMM_SECONDARY_ENABLED else 0,
            enabled=s.TRADES_BACKFILL_ENABLED,
            min_interval_sec=s.TRADES_BACKFILL_MIN_INTERVAL_SEC,
        )

    replaying = bool(args.replay)
    bot = build_bot(
        s,
        mode=mode,
        clock=clock,
        market=market,
        store=store,
        truth=truth,
        baseline=replaying,  # the symmetric grid to compare with
        backfill=backfill,
        grid=grid,
        rules=rules,
        autosave=not replaying,
        interval_sec=interval,
        errors=errors,
    )
    board = StatusBoard()
    router = ActionRouter()
    runner = Runner(bot, board, interval_sec=interval, stop_event=stop_event)
    for name, handler in bot.actions().items():
        router.register(name, runner.action(handler))
    server = None
    if not args.replay or args.serve:
        ctx = ApiContext(
            board,
            router,
            dashboard.assets(),
            s.API_TOKEN,
            runner.health,
            allowed_hosts=allowed_hosts(s.HTTP_ALLOWED_HOSTS),
        )
        server = ApiServer(s.HTTP_HOST, s.HTTP_PORT, ctx)
    until = (lambda: replay_market.finished) if replay_market else None
    cleanup = ([lease.release, lease.client.close] if lease else []) + [store.close] + ([lock.release] if lock else [])
    app = App(bot, runner, board, server, until, replay_market, cleanup, lock, lease)
    if lease is not None:

        def lost(message: str) -> None:  # another bot holds the pair now: stop, and leave its snapshot alone
            log.error("%s: stopping", message)
            bot.record_error("store", message, clock.now())
            app.lost.append(message)
            stop_event.set()

        lease.on_lost = lost
        lease.start()
    return app


def _take_lease(s: Settings, db_path: str, now: Callable[[], float]) -> StoreLease | None:
    """With Supabase, the pair's lease; an unreachable Supabase defers it (the lease's thread takes it later)."""
    if not (s.SUPABASE_URL and s.SUPABASE_KEY):
        return None
    client = SupabaseStore(s.SUPABASE_URL, s.SUPABASE_KEY, timeout=s.SUPABASE_TIMEOUT_SEC)
    lease = StoreLease(client, s.PAIR, store=str(Path(db_path).resolve()), now=now)
    try:
        lease.acquire()
    except RetryLater as exc:
        log.warning("Supabase does not answer (%s): the bot lease on %s is taken once it does", exc, s.PAIR)
    except BaseException:
        client.close()
        raise
    return lease


def _lock_store(db_path: str, mode: str, s: Settings) -> StoreLock:
    """Refuse a second bot on one SQLite store, before anything is written to it."""
    return StoreLock.acquire(db_path, mode=mode, host=s.HTTP_HOST, now=time.time())


def _paper_rules(s: Settings, client: KrakenPublicClient) -> PairRules:
    """The paper grid's rules: Kraken's AssetPairs for PAIR, or the built-in table while Kraken is unreachable."""
    try:
        info = client.fetch_asset_pair(default_maker_fee_pct=s.GRID_MAKER_FEE_PCT)
    except UnknownPair as exc:
        raise ConfigError(_unknown_pair(s.PAIR, exc)) from exc
    except RetryLater as exc:
        rules = kraken_table_rules(s.PAIR)
        if rules is None:
            raise ConfigError(
                f"PAIR={s.PAIR}: its order rules cannot be read: Kraken is unreachable ({exc}), and {s.PAIR} "
                "is not in the built-in table of Kraken pairs"
            ) from exc
        log.warning(
            "Kraken's AssetPairs is unreachable (%s): paper trading %s on the built-in table's rules (%s)",
            exc, s.PAIR, describe_rules(rules),
        )  # fmt: skip
        return rules
    except BadData as exc:
        raise ConfigError(f"PAIR={s.PAIR}: Kraken's AssetPairs answer cannot be used: {exc}") from exc
    _note_pair_info(info, s)
    return replace(info.rules, pair=s.PAIR)  # stored and shown under the name it was asked by


def _unknown_pair(pair: str, exc: Exception) -> str:
    return (
        f"PAIR={pair} is not a pair Kraken lists ({exc}); set PAIR (or --pair) to Kraken's name for it, "
        "e.g. XBTUSD, ETHUSD or XDGUSD"
    )


def _note_pair_info(info: PairInfo, s: Settings) -> None:
    log.info("%s order rules from Kraken: %s", s.PAIR, describe_rules(info.rules))
    if not info.fee_published:
        log.warning(
            "Kraken publishes no fee schedule for %s: using GRID_MAKER_FEE_PCT=%g", s.PAIR, s.GRID_MAKER_FEE_PCT
        )
    if info.status != "online":
        log.warning("Kraken lists %s with status %r: orders may be refused", s.PAIR, info.status)


def _live_grid(s: Settings, clock: WallClock, store: Store, errors: ErrorLog) -> GridRunner:
    """The grid on Kraken's private API. It reads the pair's rules and the balance now: a bad key stops the start."""
    client = KrakenPrivateClient(
        s.KRAKEN_API_URL,
        s.KRAKEN_API_KEY,
        s.KRAKEN_API_SECRET,
        nonce=NonceSource(s.KRAKEN_NONCE_PATH),
        sleep=clock.sleep,
        timeout=s.KRAKEN_TIMEOUT_SEC,
        max_retries=s.KRAKEN_MAX_RETRIES,
    )
    try:
        info = client.asset_pair_info(s.PAIR, default_maker_fee_pct=s.GRID_MAKER_FEE_PCT)
        exchange = KrakenExchange(client, s.PAIR, id_prefix=s.KRAKEN_ORDER_PREFIX, info=info)
        exchange.balances()  # proves the key works before the loop starts
    except UnknownPair as exc:
        raise ConfigError(f"--live: {_unknown_pair(s.PAIR, exc)}") from exc
    except (RetryLater, BadData) as exc:
        raise ConfigError(f"--live: Kraken is not usable: {exc}") from exc
    _note_pair_info(info, s)
    log.warning("LIVE trading on Kraken: real orders for %s", s.PAIR)
    return GridRunner(
        grid_config(s, exchange.rules, id_prefix=s.KRAKEN_ORDER_PREFIX),
        lambda price: exchange,
        settings=runner_settings(s),
        kind="live",
        record_fill=store.record_fill,
        record_error=errors.record,
    )


def _sim_resume_time(store: Store, s: Settings, *, restore_previous: bool = False) -> float:
    """A simulation continues where the snapshot it restores left off; the seed must match the store's.

    An unreadable snapshot starts the clock at ``SIM_START``; the bot's start then refuses it.
    """
    meta_key = "sim"
    meta = store.load_state(meta_key)
    if meta is None:
        store.save_state(meta_key, {"seed": s.SIM_SEED, "start": s.SIM_START}, s.SIM_START)
    elif (meta.get("seed"), meta.get("start")) != (s.SIM_SEED, s.SIM_START):
        raise ConfigError(
            f"this store holds a simulation with SIM_SEED={meta.get('seed')} and SIM_START={meta.get('start')}; "
            f"use another --db for SIM_SEED={s.SIM_SEED} / SIM_START={s.SIM_START}"
        )
    try:
        snap = store.load_state(previous_key(s.PAIR) if restore_previous else current_key(s.PAIR))
    except BadData:
        snap = None
    saved = snap.get("saved_at") if snap else None
    usable = isinstance(saved, (int, float)) and math.isfinite(saved) and saved > s.SIM_START
    return float(saved) if usable else float(s.SIM_START)


# the bot's parts, from the settings ------------------------------------------------------------


def build_bot(
    settings: Settings,
    *,
    mode: str,
    clock: Clock,
    market: MarketData,
    store: Store,
    truth: Callable[[], str | None] | None = None,
    panel: Panel | None = None,
    grid: GridRunner | None = None,
    rules: PairRules | None = None,
    baseline: bool = False,
    backfill: TradesBackfill | None = None,
    autosave: bool = True,
    interval_sec: float | None = None,
    errors: ErrorLog | None = None,
) -> Bot:
    """The bot of one pair with every part built from the settings (the one place that wires them).

    ``grid``: the live grid (built with ``errors``), else the paper grid on ``rules`` (the pair's order
    rules, resolved per mode). ``baseline``: a replay also runs an always-symmetric paper grid.
    ``errors``: the Errors card the parts report to (a new one unless the caller made one first).
    """
    s = settings
    errors = errors if errors is not None else ErrorLog()
    primary, secondary = model_slots(s)
    cadence = {1: s.HMM_OHLCV_SYNC_INTERVAL_SEC, 15: s.HMM_SECONDARY_SYNC_INTERVAL_SEC}
    feeds = [
        FeedSpec(slot.spec.interval_min, cadence[slot.spec.interval_min], slot.spec.target, slot.window_size)
        for slot in (primary, secondary)
        if slot is not None
    ]
    grid = grid or paper_grid(
        s, rules=rules, id_prefix=s.KRAKEN_ORDER_PREFIX, record_fill=store.record_fill, record_error=errors.record
    )
    return Bot(
        s,
        mode=mode,
        clock=clock,
        market=market,
        store=store,
        errors=errors,
        primary=primary,
        secondary=secondary,
        pipeline=CandlePipeline(store, market, s.PAIR, feeds, retention_days=s.OHLCV_RETENTION_DAYS),
        tier_settings=tier_settings(s),
        skill_settings=skill_settings(s),
        advisor=RegimeAdvisor(s, store=store, record_error=errors.record, panel=panel),
        grid=grid,
        baseline=paper_grid(s, rules=rules, id_prefix="base") if baseline else None,
        truth=truth,
        backfill=backfill,
        autosave=autosave,
        interval_sec=interval_sec,
    )


def tier_settings(s: Settings) -> TierSettings:
    return TierSettings(
        tier1_confidence=s.REGIME_TIER1_CONFIDENCE,
        tier2_confidence=s.REGIME_TIER2_CONFIDENCE,
        tier1_bias_floor=s.REGIME_TIER1_BIAS_FLOOR,
        tier2_bias_floor=s.REGIME_TIER2_BIAS_FLOOR,
        hysteresis=s.REGIME_HYSTERESIS,
        min_dwell_sec=s.REGIME_MIN_DWELL_SEC,
    )


def skill_settings(s: Settings) -> SkillSettings:
    return SkillSettings(
        horizon_sec=s.REGIME_SKILL_HORIZON_SEC,
        halflife_calls=s.REGIME_SKILL_HALFLIFE_CALLS,
        tier2_hit_rate=s.REGIME_TIER2_MIN_HIT_RATE,
    )


def model_slots(s: Settings) -> tuple[ModelSlot, ModelSlot | None]:
    """The primary (1m) model and, when enabled, the secondary (15m) one, as configured."""

    def slot(name: str, interval: int, target: int, min_samples: int, recent: int) -> ModelSlot:
        spec = SlotSpec(
            name, interval, target, min_samples, s.HMM_RETRAIN_INTERVAL_SEC,
            s.HMM_DEEP_DECAY_ENABLED, s.HMM_DEEP_DECAY_HALFLIFE,
        )  # fmt: skip
        return ModelSlot(
            spec,
            lambda: RegimeDetector(
                recent_candles=recent,
                confidence_threshold=s.HMM_CONFIDENCE_THRESHOLD,
                covariance_type=s.HMM_COVARIANCE_TYPE,
                n_iter=s.HMM_N_ITER,
                n_init=s.HMM_N_INIT,
                random_state=s.HMM_RANDOM_STATE,
                **detector_options(name),
            ),
        )

    primary = slot("primary", 1, s.HMM_TRAINING_CANDLES, s.HMM_MIN_TRAIN_SAMPLES, s.HMM_RECENT_CANDLES)
    secondary = None
    if s.HMM_SECONDARY_ENABLED:
        secondary = slot(
            "secondary", 15, s.HMM_SECONDARY_TRAINING_CANDLES, s.HMM_SECONDARY_MIN_TRAIN_SAMPLES,
            s.HMM_SECONDARY_RECENT_CANDLES,
        )  # fmt: skip
    return primary, secondary


def grid_config(s: Settings, rules: PairRules, *, id_prefix: str = "g") -> GridConfig:
    return GridConfig(
        rules=rules,
        slots=s.GRID_SLOTS,
        entry_pct=s.GRID_ENTRY_PCT,
        slot_step_pct=s.GRID_SLOT_STEP_PCT,
        exit_pct=s.GRID_EXIT_PCT,
        order_quote=s.GRID_ORDER_USD,
        skew=s.GRID_SKEW,
        refresh_pct=s.GRID_REFRESH_PCT,
        grace_sec=s.REGIME_SUPPRESSION_GRACE_SEC,
        recovery_after_sec=s.RECOVERY_AFTER_SEC,
        max_open_orders=s.MAX_OPEN_ORDERS,
        caution_share=s.GRID_CAPACITY_CAUTION_SHARE,
        stop_share=s.GRID_CAPACITY_STOP_SHARE,
        max_exposure_quote=s.GRID_MAX_EXPOSURE_USD,
        max_inventory_quote=s.GRID_MAX_INVENTORY_USD,
        vol_ref_pct=s.GRID_VOL_REF_PCT,
        id_prefix=id_prefix,
    )


def runner_settings(s: Settings) -> RunnerSettings:
    return RunnerSettings(
        trend_fast=s.GRID_TREND_FAST,
        trend_slow=s.GRID_TREND_SLOW,
        trend_band_pct=s.GRID_TREND_BAND_PCT,
        kelly_min_samples=s.GRID_KELLY_MIN_SAMPLES,
        reconcile_every_sec=s.GRID_RECONCILE_INTERVAL_SEC,
        vol_halflife_min=s.GRID_VOL_HALFLIFE_MIN,
    )


def paper_rules(s: Settings) -> PairRules:
    """The paper exchange's rules: Kraken's XDGUSD figures with the configured fee."""
    return PairRules(pair=s.PAIR, maker_fee_pct=s.GRID_MAKER_FEE_PCT)


def paper_grid(
    s: Settings,
    *,
    rules: PairRules | None = None,
    id_prefix: str = "g",
    record_fill: Callable[[dict[str, Any]], None] | None = None,
    record_error: Callable[[str, str, float], None] | None = None,
) -> GridRunner:
    rules = rules or paper_rules(s)
    make = paper_exchange_factory(rules, start_quote=s.PAPER_START_USD, base_share=s.PAPER_BASE_SHARE)
    return GridRunner(
        grid_config(s, rules, id_prefix=id_prefix),
        make,
        settings=runner_settings(s),
        kind="paper",
        record_fill=record_fill,
        record_error=record_error,
    )


# A batch handles these itself; every other flag the user gave reaches its workers.
BATCH_ONLY_FLAGS = ("replay", "report", "report_dir", "jobs", "serve", "replay_worker")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        files = replay_batch.replay_files(args.replay) if args.replay else []
        replay_batch.check_usage(args, files)
        if files and args.pair:
            replay_table_pair(args.pair)  # an unknown --pair is the whole command's error, not each file's
        reports = replay_batch.report_paths(files, report=args.report, report_dir=args.report_dir)
        replay_batch.make_report_dir(args.report_dir if files else None)
    except ConfigError as exc:
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2
    overrides = {
        "HTTP_HOST": args.host,
        "HTTP_PORT": args.port,
        "SIM_SPEED": args.speed,
        "SIM_SEED": args.seed,
        "LOG_LEVEL": args.log_level,
        "PAIR": args.pair,
    }
    if args.db and not args.replay and args.market == "kraken":  # also --migrate-to-supabase
        overrides["DB_PATH"] = args.db
    try:
        settings = load_settings(
            overrides,
            env_file=".env" if args.env_file is None else args.env_file,
            env_file_required=args.env_file is not None,
        )
    except ConfigError as exc:
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    if args.migrate_to_supabase:
        return store_migration.run(settings, settings.DB_PATH, sys.stdout)
    if len(files) > 1:
        flags = replay_batch.forwarded_flags(parser, args, BATCH_ONLY_FLAGS)
        if args.log_level is None:  # the workers' own log: problems only, unless asked for more
            flags.append("--log-level=WARNING")
        return replay_batch.run_batch(
            files,
            reports,
            jobs=args.jobs or min(len(files), os.cpu_count() or 1),
            summary_to=replay_batch.summary_dir(args.report_dir, reports[0]),
            flags=flags,
        )
    outcome = None  # how a replay of one file reports its progress and its row
    if files:  # build_app replays one file
        args.replay, args.report = files[0], str(reports[0])
        outcome = replay_batch.FileOutcome.of_one_file(
            files[0], reports[0], worker=args.replay_worker, report_dir=args.report_dir, out=sys.stdout
        )

    # The HTTP threads wait for the GIL while the loop computes: a shorter switch
    # interval, and no BLAS/OpenMP worker threads (the matrices are tiny) competing
    # for a small VPS's cores, keep /api/status fast while the loop is busy.
    sys.setswitchinterval(0.001)
    threadpool_limits(1)
    stop_event = threading.Event()
    try:
        app = build_app(args, settings, stop_event)
    except (ConfigError, BadData) as exc:
        if outcome is not None:  # a file that cannot be replayed is its row of the summary
            return outcome.failed(str(exc))
        print(f"bot.py: {exc}", file=sys.stderr)
        return 2

    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        received.append(signum)
        stop_event.set()

    if not args.replay_worker:  # a batch's worker ends at once when the batch stops it
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        recovery = "previous" if args.restore_previous else "discard" if args.discard_snapshot else None
        app.bot.start(recovery)
        app.runner.publish()  # the API answers with the restored state from its first request
        if app.server:
            port = app.server.start()
            if app.lock is not None:
                app.lock.update(port=port)
            if app.lease is not None:  # the lease names the port too (a refused bot shows it)
                app.lease.port = port
                app.lease.tick()
            log.info(
                "dashboard on http://%s:%d/ (mode %s, pair %s)", settings.HTTP_HOST, port, app.bot.mode, settings.PAIR
            )
        until = app.until
        if outcome is not None and app.replay is not None and app.until is not None:
            until = outcome.watch(app.until, app.bot.clock.now, app.replay.start_time, app.replay.end_time)
        wall_started = time.perf_counter()
        app.runner.run(until)
        wall_sec = time.perf_counter() - wall_started
        app.bot.shutdown(save=not app.lost)
        if app.lost:
            print(f"bot.py: {app.lost[0]}; stopped", file=sys.stderr)
            code = 2
        if app.replay and outcome is not None:
            complete = app.replay.finished
            report = _finish_replay(app, args, wall_sec)
            if complete:
                code = outcome.done(report)
            else:  # stopped by a signal: the report shows how far it got, the summary has no figures
                code = outcome.interrupted(app.bot.clock.now(), received[0] if received else signal.SIGTERM)
            if app.server and not stop_event.is_set():
                log.info("serving the dashboard until Ctrl-C")
                stop_event.wait()
    except BotError as exc:
        if outcome is None:
            print(f"bot.py: {exc}", file=sys.stderr)
            return 2
        code = outcome.failed(str(exc))
    except Exception as exc:
        if outcome is None:
            raise
        log.exception("the replay of %s failed", args.replay)
        code = outcome.failed(f"{type(exc).__name__}: {exc}")
    finally:
        if app.server:
            app.server.stop()
        for close in app.cleanup:
            close()
    if code == 0:
        log.info("stopped cleanly")
    return code


def _finish_replay(app: App, args: argparse.Namespace, wall_sec: float) -> dict[str, Any]:
    """Write the replay report, and the equity plot beside it; returns the report."""
    bot, market = app.bot, app.replay
    assert market is not None and bot.baseline is not None
    series = bot.stats.series
    strategies, plot = None, None
    if series.get("price"):
        price = series["price"][-1]
        strategies, plot = strategies_report(
            series,
            regime_aware=bot.grid.summary(price),
            symmetric=bot.baseline.summary(price),
            fee_pct=bot.grid.config.rules.maker_fee_pct,
            span_sec=market.end_time - market.start_time,
        )
    stats = {k: v for k, v in bot.stats.__dict__.items() if k != "series"}
    report = replay_report(
        source=args.replay,
        market=market,
        stats=stats,
        final_status=app.board.status() or bot.status(),
        wall_sec=wall_sec,
        strategies=strategies,
    )
    path = Path(args.report or f"{args.replay}.report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report["prices"] = {"first": series["price"][0], "last": series["price"][-1]} if series.get("price") else None
    report["plot"] = None
    if plot is not None:
        try:
            report["plot"] = str(write_plot(path.with_suffix(".html"), {**plot, "title": f"Replay of {args.replay}"}))
        except (ValueError, OSError) as exc:  # the report matters more than its picture
            log.error("the equity plot could not be written: %s", exc)
    _write_json_atomically(path, report)
    log.info("replay of %d candles done in %.1fs; report written to %s", report["candles"], wall_sec, path)
    for name, figures in (strategies or {}).items():
        log.info(
            "%-12s net %+.2f USD, max drawdown %.2f%%, %d cycles, fees %.2f USD",
            name, figures["net_pnl_usd"], figures["max_drawdown_pct"], figures["cycles"], figures["fees_usd"],
        )  # fmt: skip
    return report


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(run())
