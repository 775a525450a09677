"""Typed, validated, immutable settings.

Every key has a default, a type, an allowed range and a one-line description
(the field metadata below). Sources, strongest first: command-line flags, the
environment, the ``.env`` file, the defaults. A bad value never falls back to
the default: :func:`load_settings` raises :class:`ConfigError` naming every
bad key, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from errors import ConfigError
from redaction import MASK, mask_url

log = logging.getLogger(__name__)

# Environment variables with these prefixes are ours; an unknown one is
# probably a typo and is reported instead of silently ignored.
OWN_PREFIXES = (
    "HMM_", "REGIME_", "OHLCV_", "KRAKEN_", "SIM_", "CONSENSUS_", "AI_", "GROQ_", "NVIDIA_", "GRID_", "PAPER_",
    "LIVE_", "TRADES_", "SUPABASE_",
)  # fmt: skip
LIVE_CONFIRMATION = "real-money"
# Off loopback the API token is all that stands between the network and the orders.
MIN_REMOTE_TOKEN_LEN = 16
# int() and float() also read Arabic-Indic, fullwidth and other Unicode digits;
# a setting is written in ASCII or refused.
_INT_TEXT = re.compile(r"[+-]?[0-9_]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?[0-9_.eE+-]+", re.ASCII)


def _setting(
    default: Any,
    description: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    meta = {"help": description, "lo": lo, "hi": hi, "choices": choices, "secret": secret}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    # --- market and storage -------------------------------------------------
    PAIR: str = _setting("XDGUSD", "Kraken pair name traded and stored (--pair)")
    KRAKEN_API_URL: str = _setting("https://api.kraken.com", "Base URL of every Kraken call")
    KRAKEN_TIMEOUT_SEC: float = _setting(10.0, "HTTP timeout of one Kraken request", lo=1, hi=120)
    KRAKEN_MAX_RETRIES: int = _setting(3, "Retries of a Kraken request on rate limits and service errors", lo=0, hi=10)
    DB_PATH: str = _setting("data/bot.sqlite3", "SQLite store for the Kraken market (sim and replay use their own)")
    OHLCV_RETENTION_DAYS: int = _setting(
        14, "Prune stored candles older than this (never below the training target)", lo=1, hi=3650
    )
    SUPABASE_URL: str = _setting(
        "", "Supabase project URL; with SUPABASE_KEY the store is Supabase, DB_PATH its mirror"
    )
    SUPABASE_KEY: str = _setting("", "Supabase service-role key (see store/supabase_schema.sql)", secret=True)
    SUPABASE_TIMEOUT_SEC: float = _setting(5.0, "HTTP timeout of one Supabase request", lo=0.5, hi=60)
    SUPABASE_RETRY_MAX_SEC: float = _setting(
        60.0, "Longest wait between two attempts to send pending writes to Supabase", lo=1, hi=3600
    )
    # --- loop, server, logging ----------------------------------------------
    LOOP_INTERVAL_SEC: float = _setting(15.0, "Seconds between main-loop cycles", lo=1, hi=300)
    STATE_SNAPSHOT_INTERVAL_SEC: float = _setting(60.0, "Write the state snapshot at least this often", lo=5, hi=3600)
    HTTP_HOST: str = _setting("127.0.0.1", "Address the dashboard and API bind to")
    HTTP_PORT: int = _setting(8080, "Port of the dashboard and API (0 picks a free one)", lo=0, hi=65535)
    API_TOKEN: str = _setting("", "Bearer token required on /api/* (required off loopback)", secret=True)
    HTTP_ALLOWED_HOSTS: str = _setting(
        "", "Comma-separated host names the dashboard is reached by, besides localhost and IP addresses"
    )
    LOG_LEVEL: str = _setting("INFO", "Logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # --- simulator ----------------------------------------------------------
    SIM_SEED: int = _setting(7, "Seed of the market simulator", lo=0, hi=2**32 - 1)
    # Beyond a million simulated seconds per wall second the loop never waits anyway: 'max' says so.
    SIM_SPEED: float = _setting(
        1.0, "Simulated seconds per wall second in --market sim ('max' = no waiting)", lo=0.01, hi=1_000_000
    )
    SIM_START: int = _setting(
        1_767_225_600, "Unix time at which a fresh simulation starts", lo=946_684_800, hi=4_102_444_800
    )
    # --- HMM data and training ----------------------------------------------
    HMM_OHLCV_SYNC_INTERVAL_SEC: float = _setting(60.0, "Sync cadence of 1m candles", lo=10, hi=3600)
    HMM_SECONDARY_SYNC_INTERVAL_SEC: float = _setting(300.0, "Sync cadence of 15m candles", lo=60, hi=3600)
    HMM_TRAINING_CANDLES: int = _setting(4000, "Target training depth of the 1m model", lo=50, hi=200_000)
    HMM_SECONDARY_TRAINING_CANDLES: int = _setting(1440, "Target training depth of the 15m model", lo=50, hi=50_000)
    HMM_MIN_TRAIN_SAMPLES: int = _setting(500, "Fewest 1m candles to train on", lo=50, hi=200_000)
    HMM_SECONDARY_MIN_TRAIN_SAMPLES: int = _setting(200, "Fewest 15m candles to train on", lo=50, hi=50_000)
    HMM_RECENT_CANDLES: int = _setting(100, "1m candles in one inference window", lo=10, hi=2000)
    HMM_SECONDARY_RECENT_CANDLES: int = _setting(50, "15m candles in one inference window", lo=10, hi=2000)
    HMM_CONFIDENCE_THRESHOLD: float = _setting(0.15, "Below this confidence a model's bias signal is 0", lo=0, hi=1)
    HMM_RETRAIN_INTERVAL_SEC: float = _setting(86400.0, "Scheduled retrain period", lo=600, hi=30 * 86400)
    HMM_SECONDARY_ENABLED: bool = _setting(True, "Use the 15m model and 1m/15m consensus")
    HMM_N_ITER: int = _setting(100, "EM iterations per fit", lo=5, hi=2000)
    HMM_N_INIT: int = _setting(
        4, "Initialisations per fit (spread-quantile starts); the best likelihood of those whose states separate wins",
        lo=1, hi=20,
    )  # fmt: skip
    HMM_RANDOM_STATE: int = _setting(
        42, "Seed of model fitting and its calibration bootstrap (reproducible fits)", lo=0, hi=2**32 - 1
    )
    HMM_COVARIANCE_TYPE: str = _setting("full", "Gaussian covariance form", choices=("full", "diag"))
    HMM_DEEP_DECAY_ENABLED: bool = _setting(False, "Resample training rows so recent ones weigh more")
    HMM_DEEP_DECAY_HALFLIFE: int = _setting(1440, "Half-life of deep decay, in candles", lo=10, hi=1_000_000)
    CONSENSUS_RULE: str = _setting(
        "primary", "How the 1m and 15m models make the tier signal (table = 15m direction, 1m timing)",
        choices=("primary", "table"),
    )  # fmt: skip
    CONSENSUS_1M_WEIGHT: float = _setting(0.3, "Weight of the 1m bias in full agreement", lo=0, hi=1)
    CONSENSUS_15M_WEIGHT: float = _setting(0.7, "Weight of the 15m bias in full agreement", lo=0, hi=1)
    # --- regime tiers -------------------------------------------------------
    REGIME_DIRECTIONAL_ENABLED: bool = _setting(
        True, "false pins tier 0 (shadow mode: the tier is still computed and shown)"
    )
    REGIME_TIER1_CONFIDENCE: float = _setting(0.20, "Effective confidence for tier 1", lo=0, hi=1)
    REGIME_TIER2_CONFIDENCE: float = _setting(0.50, "Effective confidence for tier 2", lo=0, hi=1)
    REGIME_TIER1_BIAS_FLOOR: float = _setting(0.10, "Smallest |bias| for tier 1", lo=0, hi=1)
    REGIME_TIER2_BIAS_FLOOR: float = _setting(0.25, "Smallest |bias| for tier 2", lo=0, hi=1)
    REGIME_HYSTERESIS: float = _setting(0.05, "Downgrade only this far below a tier's threshold", lo=0, hi=0.5)
    REGIME_MIN_DWELL_SEC: float = _setting(300.0, "No tier change sooner than this after the last", lo=0, hi=86400)
    REGIME_MOVE_SIZE_SHARE: float = _setting(
        0.5,
        "Entry size (share of GRID_ORDER_USD) while the primary model finds a directional regime at least as likely "
        "as ranging (1: no response)",
        lo=0.05,
        hi=1,
    )
    REGIME_SKILL_GATE: bool = _setting(
        True, "Directional tiers act only as far as the signal's direction calls have earned (false: confidence alone)"
    )
    REGIME_SKILL_HORIZON_SEC: float = _setting(
        3600.0, "A direction call is scored against the price this much later", lo=60, hi=7 * 86400
    )
    REGIME_SKILL_HALFLIFE_CALLS: float = _setting(
        168.0, "Half-life of the direction record, in scored calls (one per horizon at most)", lo=1, hi=100_000
    )
    REGIME_TIER2_MIN_HIT_RATE: float = _setting(
        0.7, "Hit rate (lower bound) at which direction calls earn tier 2; tier 1 skews in between", lo=0.51, hi=1
    )
    # --- AI regime advisor ----------------------------------------------------
    AI_REGIME_ADVISOR_ENABLED: bool = _setting(False, "Ask an LLM panel for a second opinion on the regime tier")
    AI_REGIME_INTERVAL_SEC: float = _setting(300.0, "Ask the advisor this often", lo=30, hi=86400)
    AI_REGIME_DEBOUNCE_SEC: float = _setting(60.0, "Never ask twice within this many seconds", lo=0, hi=3600)
    AI_OVERRIDE_TTL_SEC: float = _setting(1800.0, "Default lifetime of an applied override", lo=60, hi=86400)
    AI_OVERRIDE_MAX_TTL_SEC: float = _setting(3600.0, "Longest lifetime an override may ask for", lo=60, hi=86400)
    AI_OVERRIDE_MIN_CONVICTION: int = _setting(50, "Conviction (0-100) an opinion needs to be applied", lo=0, hi=100)
    AI_REGIME_HISTORY_SIZE: int = _setting(12, "Opinions kept in the in-memory history", lo=1, hi=1000)
    AI_REGIME_PREFER_REASONING: bool = _setting(True, "Ask the reasoning model first (else after the instruct ones)")
    AI_REASONING_TIMEOUT_SEC: float = _setting(30.0, "Timeout of one call to a reasoning model", lo=1, hi=600)
    AI_INSTRUCT_TIMEOUT_SEC: float = _setting(15.0, "Timeout of one call to an instruct model", lo=1, hi=600)
    AI_PANELIST_MAX_FAILURES: int = _setting(2, "Consecutive failures after which a panelist cools down", lo=1, hi=100)
    AI_PANELIST_COOLDOWN_SEC: float = _setting(
        300.0, "Cool-down after repeated failures (or a 429 without Retry-After)", lo=1, hi=86400
    )
    # Opinions wait in memory (and the snapshot) until scored: a week bounds that, far past any override.
    AI_SCORECARD_HORIZON_SEC: float = _setting(
        1800.0, "Score each opinion against the price this much later", lo=60, hi=7 * 86400
    )
    AI_OPINION_MAX_AGE_SEC: float = _setting(
        600.0, "An opinion older than this cannot be applied (default: two advisor intervals)", lo=30, hi=86400
    )
    AI_REASONING_MODEL: str = _setting("moonshotai/kimi-k2-thinking", "Model id of the reasoning panelist (Kimi)")
    AI_REASONING_PROVIDER: str = _setting("nvidia", "Provider of the reasoning panelist", choices=("nvidia", "groq"))
    AI_LLAMA70B_MODEL: str = _setting("llama-3.3-70b-versatile", "Model id of the Llama 70B panelist")
    AI_LLAMA70B_PROVIDER: str = _setting("groq", "Provider of the Llama 70B panelist", choices=("groq", "nvidia"))
    AI_LLAMA8B_MODEL: str = _setting("llama-3.1-8b-instant", "Model id of the Llama 8B panelist")
    AI_LLAMA8B_PROVIDER: str = _setting("groq", "Provider of the Llama 8B panelist", choices=("groq", "nvidia"))
    GROQ_API_KEY: str = _setting("", "Groq API key (enables the panelists hosted on Groq)", secret=True)
    GROQ_BASE_URL: str = _setting("https://api.groq.com/openai/v1", "Groq's OpenAI-compatible endpoint")
    NVIDIA_API_KEY: str = _setting("", "NVIDIA API key (enables the panelists hosted on NVIDIA)", secret=True)
    NVIDIA_BASE_URL: str = _setting("https://integrate.api.nvidia.com/v1", "NVIDIA's OpenAI-compatible endpoint")
    AI_BASE_URL: str = _setting("", "Any OpenAI-compatible endpoint, asked first (e.g. http://127.0.0.1:11434/v1)")
    AI_API_KEY: str = _setting("", "API key of AI_BASE_URL (may stay empty for a local Ollama)", secret=True)
    AI_MODEL: str = _setting("", "Model id at AI_BASE_URL")
    AI_MODEL_KIND: str = _setting("instruct", "Kind of AI_MODEL", choices=("instruct", "reasoning"))
    # --- grid ---------------------------------------------------------------
    GRID_ENTRY_PCT: float = _setting(0.35, "Distance of grid entries from the market, percent of price", lo=0.01, hi=20)
    GRID_SLOTS: int = _setting(3, "Grid slots, each with a sell-first (A) and a buy-first (B) leg", lo=1, hi=20)
    GRID_SLOT_STEP_PCT: float = _setting(0.35, "Each further slot enters this much farther out, percent", lo=0, hi=20)
    GRID_EXIT_PCT: float = _setting(2.0, "Exit distance from the entry fill, percent (above both fees)", lo=0.05, hi=50)
    GRID_ORDER_USD: float = _setting(20.0, "Size of one entry, in the quote currency", lo=0.5, hi=1_000_000)
    GRID_SKEW: float = _setting(
        0.75, "Tier 1 skew: with-trend distance x (1 - skew*|bias|), against x (1 + skew*|bias|)", lo=0, hi=1
    )
    # Past the widest entry distance (GRID_ENTRY_PCT <= 20) an entry would never be repriced.
    GRID_REFRESH_PCT: float = _setting(
        0.5, "Reprice a resting entry once its target moved this far, percent", lo=0.01, hi=20
    )
    GRID_MAKER_FEE_PCT: float = _setting(
        0.25, "Maker fee, percent, of pair rules derived from prices (a known pair pays its own)", lo=0, hi=5
    )
    GRID_MAX_EXPOSURE_USD: float = _setting(
        1000.0, "Cap on resting entries plus open positions, in the quote currency", lo=1, hi=1e9
    )
    GRID_MAX_INVENTORY_USD: float = _setting(
        80.0, "Cap on what one side of the grid may hold: positions at cost plus resting entries", lo=1, hi=1e9
    )
    GRID_VOL_REF_PCT: float = _setting(
        1.0, "Hourly volatility (percent) the grid distances are set for; above it they widen (0: off)", lo=0, hi=100
    )
    GRID_VOL_HALFLIFE_MIN: float = _setting(
        60.0, "Half-life of the grid's volatility estimate, in 1m candles", lo=1, hi=100_000
    )
    GRID_CAPACITY_CAUTION_SHARE: float = _setting(
        0.7, "Share of a cap (inventory, exposure or open orders) at which the band is caution", lo=0, hi=1
    )
    GRID_CAPACITY_STOP_SHARE: float = _setting(
        0.9, "Share of a cap (inventory, exposure or open orders) at which the band is stop", lo=0, hi=1
    )
    GRID_TREND_FAST: int = _setting(20, "Fast EMA of the trend detector, in 1m candles", lo=2, hi=10_000)
    GRID_TREND_SLOW: int = _setting(60, "Slow EMA of the trend detector, in 1m candles", lo=3, hi=100_000)
    GRID_TREND_BAND_PCT: float = _setting(0.1, "EMA gap (percent) that counts as a trend", lo=0, hi=20)
    GRID_KELLY_MIN_SAMPLES: int = _setting(20, "Cycles of a regime before its Kelly edge is reported", lo=1, hi=100_000)
    GRID_RECONCILE_INTERVAL_SEC: float = _setting(
        300.0, "Compare the grid's orders with the exchange's this often", lo=10, hi=86400
    )
    REGIME_SUPPRESSION_GRACE_SEC: float = _setting(
        60.0, "Tier 2 cancels against-trend entries this long after it begins", lo=0, hi=86400
    )
    RECOVERY_AFTER_SEC: float = _setting(
        7200.0,
        "An exit resting this long is flagged a recovery order (a stranded position; it keeps its leg)",
        lo=60,
        hi=30 * 86400,
    )
    MAX_OPEN_ORDERS: int = _setting(20, "Most open orders (one of the capacity band's measures)", lo=2, hi=1000)
    PAPER_START_USD: float = _setting(1000.0, "Paper account at the first price, in the quote currency", lo=1, hi=1e9)
    PAPER_BASE_SHARE: float = _setting(0.5, "Share of the paper account bought as the base asset at start", lo=0, hi=1)
    # --- live trading -----------------------------------------------------------
    KRAKEN_API_KEY: str = _setting("", "Kraken API key (--live only)", secret=True)
    KRAKEN_API_SECRET: str = _setting("", "Kraken API secret, base64 (--live only)", secret=True)
    LIVE_TRADING_CONFIRM: str = _setting("", f"Must be '{LIVE_CONFIRMATION}' for --live to start")
    KRAKEN_NONCE_PATH: str = _setting("data/kraken.nonce", "File keeping the last private API nonce across restarts")
    KRAKEN_ORDER_PREFIX: str = _setting(
        "g", "Prefix of this bot's client order ids (cl_ord_id); orders without it are left alone"
    )
    # --- deep warm-up -------------------------------------------------------------
    TRADES_BACKFILL_ENABLED: bool = _setting(True, "Backfill training candles from Kraken's public trades")
    TRADES_BACKFILL_MIN_INTERVAL_SEC: float = _setting(
        1.0, "Least time between two Trades requests (Kraken's public rate limit)", lo=0.2, hi=60
    )

    def redacted(self) -> dict[str, Any]:
        """All settings with secrets and URL credentials masked: safe to log or display."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"]:
                value = MASK if value else ""
            elif isinstance(value, str):
                value = mask_url(value)  # https://user:pass@host, ?key=...
            elif isinstance(value, float) and math.isinf(value):
                value = "max"  # SIM_SPEED=max; JSON has no infinity
            out[f.name] = value
        return out

    def secret_values(self) -> tuple[str, ...]:
        """The configured secret values, for :func:`redaction.scrub` of error texts."""
        return tuple(v for f in dataclasses.fields(self) if f.metadata["secret"] and (v := getattr(self, f.name)))


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def describe(key: str) -> str:
    """The one-line description of a setting."""
    return _FIELDS[key].metadata["help"]


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    env_file_required: bool = False,
) -> Settings:
    """Build settings from defaults < ``.env`` < environment < ``overrides``.

    ``overrides`` holds values from command-line flags (``None`` = not given).
    ``env_file`` is read when it exists; with ``env_file_required`` (a file the
    operator named) a missing one is an error rather than silently no settings.
    Raises :class:`ConfigError` listing every problem at once.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw: dict[str, Any] = {}

    if env_file is not None and env_file_required and not Path(env_file).is_file():
        what = "is not a file" if Path(env_file).exists() else "does not exist"
        raise ConfigError(f"--env-file {env_file} {what}")
    if env_file is not None and Path(env_file).is_file():
        for key, value in dotenv_values(env_file).items():
            if key not in _FIELDS:
                problems.append(f"{key} in {env_file} is not a setting{_suggest(key)}")
            elif value is not None:
                raw[key] = value
    for key, value in environ.items():
        if key in _FIELDS:
            raw[key] = value
        elif key.startswith(OWN_PREFIXES):
            log.warning("environment variable %s is not a setting%s", key, _suggest(key))
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ValueError(f"unknown override {key}")
        if value is not None:
            raw[key] = value

    values: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            values[key] = _parse(key, text)
        except ValueError as exc:
            problems.append(f"{key}={_show(key, text)} is invalid: {exc}")
    if not problems:
        settings = Settings(**values)
        problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def _parse(key: str, value: Any) -> Any:
    f = _FIELDS[key]
    kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
    meta = f.metadata
    if key == "API_TOKEN" and value != str(value).strip():
        # A stray space or newline would make a token nobody can send: refuse it
        # (and a blank one is not "no token").
        raise ValueError("has leading or trailing whitespace; write the token alone")
    if isinstance(value, str):
        value = value.strip()
    if kind is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is str:
        text = str(value)
        if not meta["choices"]:
            return text
        for choice in meta["choices"]:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(meta['choices'])}")
    if kind is float and key == "SIM_SPEED" and str(value).lower() == "max":
        return math.inf
    allowed = f"expected {_range_text(kind, meta)}" + (" or 'max'" if key == "SIM_SPEED" else "")
    try:
        number = _parse_float(value) if kind is float else _parse_int(value)
    except (TypeError, ValueError):
        raise ValueError(allowed) from None
    if kind is float and not math.isfinite(number):
        raise ValueError(allowed)
    if (meta["lo"] is not None and number < meta["lo"]) or (meta["hi"] is not None and number > meta["hi"]):
        raise ValueError(allowed)
    return number


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, int):
        return value
    text = str(value)
    if not _INT_TEXT.fullmatch(text):
        raise ValueError("not an ASCII integer")
    return int(text.replace("_", ""))


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    if not _FLOAT_TEXT.fullmatch(text):  # also refuses nan and inf by name
        raise ValueError("not an ASCII number")
    return float(text)


def _range_text(kind: type, meta: Mapping[str, Any]) -> str:
    noun = "an integer" if kind is int else "a number"
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and hi is not None:
        return f"{noun} from {lo:g} to {hi:g}"
    if lo is not None:
        return f"{noun} of at least {lo:g}"
    return noun


def _show(key: str, value: Any) -> str:
    return "'***'" if _FIELDS[key].metadata["secret"] else repr(value)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(value: str) -> tuple[str, ...]:
    """The names in HTTP_ALLOWED_HOSTS, lower-case; ``ValueError`` for one that is not a bare host name."""
    names = tuple(n.strip().lower().rstrip(".") for n in value.split(",") if n.strip())
    for name in names:
        labels = name.split(".")
        if not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
            raise ValueError(f"{name!r} is not a host name (no scheme, port or path)")
        if not name.isascii():
            raise ValueError(f"{name!r} is not an ASCII host name (use its xn-- form)")
    return names


def _cross_checks(s: Settings) -> list[str]:
    problems = []
    try:
        allowed_hosts(s.HTTP_ALLOWED_HOSTS)
    except ValueError as exc:
        problems.append(f"HTTP_ALLOWED_HOSTS={s.HTTP_ALLOWED_HOSTS!r} is invalid: {exc}")

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(
        s.REGIME_TIER2_CONFIDENCE > s.REGIME_TIER1_CONFIDENCE,
        f"REGIME_TIER2_CONFIDENCE={s.REGIME_TIER2_CONFIDENCE} must be above "
        f"REGIME_TIER1_CONFIDENCE={s.REGIME_TIER1_CONFIDENCE}",
    )
    need(
        s.REGIME_TIER2_BIAS_FLOOR >= s.REGIME_TIER1_BIAS_FLOOR,
        f"REGIME_TIER2_BIAS_FLOOR={s.REGIME_TIER2_BIAS_FLOOR} must be at least "
        f"REGIME_TIER1_BIAS_FLOOR={s.REGIME_TIER1_BIAS_FLOOR}",
    )
    need(
        s.REGIME_HYSTERESIS < s.REGIME_TIER1_CONFIDENCE,
        f"REGIME_HYSTERESIS={s.REGIME_HYSTERESIS} must be below REGIME_TIER1_CONFIDENCE={s.REGIME_TIER1_CONFIDENCE}",
    )
    need(
        s.HMM_TRAINING_CANDLES >= s.HMM_MIN_TRAIN_SAMPLES,
        f"HMM_TRAINING_CANDLES={s.HMM_TRAINING_CANDLES} must be at least "
        f"HMM_MIN_TRAIN_SAMPLES={s.HMM_MIN_TRAIN_SAMPLES}",
    )
    need(
        s.HMM_SECONDARY_TRAINING_CANDLES >= s.HMM_SECONDARY_MIN_TRAIN_SAMPLES,
        f"HMM_SECONDARY_TRAINING_CANDLES={s.HMM_SECONDARY_TRAINING_CANDLES} must be at least "
        f"HMM_SECONDARY_MIN_TRAIN_SAMPLES={s.HMM_SECONDARY_MIN_TRAIN_SAMPLES}",
    )
    need(
        s.CONSENSUS_1M_WEIGHT + s.CONSENSUS_15M_WEIGHT > 0,
        "CONSENSUS_1M_WEIGHT and CONSENSUS_15M_WEIGHT cannot both be 0",
    )
    need(
        s.KRAKEN_API_URL.startswith(("http://", "https://")),
        f"KRAKEN_API_URL={mask_url(s.KRAKEN_API_URL)!r} is invalid: expected an http:// or https:// URL",
    )
    need(bool(s.PAIR.strip()) and s.PAIR.isalnum(), f"PAIR={s.PAIR!r} is invalid: expected letters and digits")
    need(bool(s.DB_PATH.strip()), "DB_PATH is empty: expected a file path")
    need(
        bool(s.SUPABASE_URL) == bool(s.SUPABASE_KEY),
        "SUPABASE_URL and SUPABASE_KEY go together: set both to store in Supabase, or neither for SQLite only",
    )
    need(
        not s.SUPABASE_URL or s.SUPABASE_URL.startswith(("http://", "https://")),
        f"SUPABASE_URL={mask_url(s.SUPABASE_URL)!r} is invalid: expected the project's https:// URL",
    )
    need(
        s.AI_OVERRIDE_TTL_SEC <= s.AI_OVERRIDE_MAX_TTL_SEC,
        f"AI_OVERRIDE_TTL_SEC={s.AI_OVERRIDE_TTL_SEC:g} must be at most "
        f"AI_OVERRIDE_MAX_TTL_SEC={s.AI_OVERRIDE_MAX_TTL_SEC:g}",
    )
    for key in ("GROQ_BASE_URL", "NVIDIA_BASE_URL", "AI_BASE_URL"):
        url = getattr(s, key)
        need(
            not url or url.startswith(("http://", "https://")),
            f"{key}={mask_url(url)!r} is invalid: expected an http:// or https:// URL",
        )
    need(
        bool(s.AI_BASE_URL) == bool(s.AI_MODEL),
        "AI_BASE_URL and AI_MODEL go together: set both to add an OpenAI-compatible panelist, or neither",
    )
    need(
        not s.AI_REGIME_ADVISOR_ENABLED or bool(s.GROQ_API_KEY or s.NVIDIA_API_KEY or s.AI_BASE_URL),
        "AI_REGIME_ADVISOR_ENABLED=true needs a panelist: set GROQ_API_KEY, NVIDIA_API_KEY, "
        "or AI_BASE_URL and AI_MODEL",
    )
    need(
        s.KRAKEN_ORDER_PREFIX.isalpha() and s.KRAKEN_ORDER_PREFIX.isascii() and len(s.KRAKEN_ORDER_PREFIX) <= 4,
        f"KRAKEN_ORDER_PREFIX={s.KRAKEN_ORDER_PREFIX!r} is invalid: expected 1 to 4 ASCII letters",
    )
    need(
        s.GRID_EXIT_PCT > 2 * s.GRID_MAKER_FEE_PCT,
        f"GRID_EXIT_PCT={s.GRID_EXIT_PCT:g} must be above twice GRID_MAKER_FEE_PCT={s.GRID_MAKER_FEE_PCT:g}: "
        "every cycle would lose money",
    )
    need(
        s.GRID_ORDER_USD <= s.GRID_MAX_EXPOSURE_USD,
        f"GRID_ORDER_USD={s.GRID_ORDER_USD:g} must be at most GRID_MAX_EXPOSURE_USD={s.GRID_MAX_EXPOSURE_USD:g}",
    )
    need(
        s.GRID_CAPACITY_CAUTION_SHARE <= s.GRID_CAPACITY_STOP_SHARE,
        f"GRID_CAPACITY_CAUTION_SHARE={s.GRID_CAPACITY_CAUTION_SHARE:g} must be at most "
        f"GRID_CAPACITY_STOP_SHARE={s.GRID_CAPACITY_STOP_SHARE:g}",
    )
    need(
        s.GRID_TREND_FAST < s.GRID_TREND_SLOW,
        f"GRID_TREND_FAST={s.GRID_TREND_FAST} must be below GRID_TREND_SLOW={s.GRID_TREND_SLOW}",
    )
    need(
        is_loopback(s.HTTP_HOST) or bool(s.API_TOKEN),
        f"HTTP_HOST={s.HTTP_HOST!r} is not a loopback address: set API_TOKEN (at least "
        f"{MIN_REMOTE_TOKEN_LEN} characters) before exposing the API beyond this machine",
    )
    need(
        is_loopback(s.HTTP_HOST) or not s.API_TOKEN or len(s.API_TOKEN) >= MIN_REMOTE_TOKEN_LEN,
        f"API_TOKEN is {len(s.API_TOKEN)} characters: off loopback (HTTP_HOST={s.HTTP_HOST!r}) it needs "
        f"at least {MIN_REMOTE_TOKEN_LEN}",
    )
    return problems


def live_problems(s: Settings) -> list[str]:
    """Why ``--live`` must not start with these settings (empty: it may)."""
    problems = []
    if not (s.KRAKEN_API_KEY and s.KRAKEN_API_SECRET):
        problems.append("--live needs KRAKEN_API_KEY and KRAKEN_API_SECRET")
    if s.LIVE_TRADING_CONFIRM != LIVE_CONFIRMATION:
        problems.append(f"--live places real orders: set LIVE_TRADING_CONFIRM={LIVE_CONFIRMATION} to confirm")
    return problems
