"""The store interface every backend implements, and what they share.

Tables follow SPEC section 2: ``ohlcv_candles`` unique on ``(pair,
interval_min, time)``, ``bot_state`` holding the snapshot under one key,
``regime_tier_transitions``, and ``ai_regime_opinions`` (SPEC section 6)
unique on ``(pair, ts)``, like the transitions, and ``fills`` unique on
``(pair, order_id)``: every write can be repeated without changing anything,
which is what lets a remote store retry. Nothing outside ``store/`` knows which
backend is active. Pure: no I/O here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from candles import Candle
from errors import BadData


class Store(Protocol):
    """Every method raises :class:`errors.RetryLater` when the backend fails at run time
    (locked, disk full, unreachable); the caller skips the step and tries again later."""

    def upsert_candles(self, pair: str, interval_min: int, candles: Sequence[Candle]) -> None:
        """Insert or replace closed candles (idempotent on the unique key)."""

    def load_candles(self, pair: str, interval_min: int, limit: int) -> list[Candle]:
        """The newest ``limit`` candles, oldest first."""

    def count_candles(self, pair: str, interval_min: int) -> int: ...

    def prune_candles(self, pair: str, interval_min: int, *, older_than: int, keep_newest: int) -> int:
        """Delete candles opening before ``older_than``, never the newest ``keep_newest``."""

    def load_state(self, key: str) -> dict[str, Any] | None:
        """The document under ``key``; :class:`errors.BadData` when it is there but not a JSON object."""

    def save_state(self, key: str, data: dict[str, Any], updated_at: float, *, previous_key: str | None = None) -> None:
        """Replace the document under ``key`` atomically (``ValueError`` for NaN or infinity: never written).

        With ``previous_key``, the document replaced is kept under that key in the same transaction.
        """

    def copy_state(self, key: str, to_key: str, *, remove: bool = False) -> bool:
        """Copy the row under ``key``, as stored, to ``to_key``; with ``remove``, a move. False when absent."""

    def record_tier_transition(self, row: dict[str, Any]) -> None:
        """Write one tier transition (idempotent on ``(pair, ts)``)."""

    def tier_transitions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest tier transitions, newest first."""

    def record_ai_opinion(self, row: dict[str, Any]) -> None:
        """Write one consumed advisor opinion (idempotent on ``(pair, ts)``)."""

    def record_ai_opinion_outcome(self, pair: str, ts: float, *, price_after: float, hit: bool) -> None:
        """Add the scorecard's verdict to the opinion written at ``ts``."""

    def ai_opinions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest opinions, newest first."""

    def record_fill(self, row: dict[str, Any]) -> None:
        """A grid fill (unique on pair and order id: recording it again changes nothing)."""
        ...

    def fills(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest fills first."""
        ...

    def status(self) -> dict[str, Any]:
        """The ``store`` block of the status payload: backend, ``ok``/``degraded``, pending writes, last error."""
        ...

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS ohlcv_candles (
    pair TEXT NOT NULL,
    interval_min INTEGER NOT NULL,
    time INTEGER NOT NULL,
    open REAL NOT NULL,
    high REAL NOT NULL,
    low REAL NOT NULL,
    close REAL NOT NULL,
    volume REAL NOT NULL,
    trade_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pair, interval_min, time)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bot_state (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS regime_tier_transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    pair TEXT NOT NULL,
    from_tier INTEGER NOT NULL,
    to_tier INTEGER NOT NULL,
    from_direction TEXT NOT NULL,
    to_direction TEXT NOT NULL,
    reason TEXT NOT NULL,
    regime TEXT,
    raw_confidence REAL,
    effective_confidence REAL,
    bias_signal REAL,
    shadow INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS regime_tier_transitions_pair_ts_key ON regime_tier_transitions (pair, ts);
CREATE TABLE IF NOT EXISTS ai_regime_opinions (
    pair TEXT NOT NULL,
    ts REAL NOT NULL,
    panelist TEXT NOT NULL,
    model TEXT,
    mechanical_tier INTEGER NOT NULL,
    mechanical_direction TEXT NOT NULL,
    ai_tier INTEGER NOT NULL,
    ai_direction TEXT NOT NULL,
    conviction INTEGER NOT NULL,
    agreement TEXT NOT NULL,
    rationale TEXT NOT NULL,
    watch_for TEXT NOT NULL,
    latency_sec REAL,
    price REAL,
    price_after REAL,
    hit INTEGER,
    PRIMARY KEY (pair, ts)
);
CREATE TABLE IF NOT EXISTS fills (
    pair TEXT NOT NULL,
    order_id TEXT NOT NULL,
    ts REAL NOT NULL,
    exchange TEXT NOT NULL,
    slot INTEGER NOT NULL,
    leg TEXT NOT NULL,
    role TEXT NOT NULL,
    side TEXT NOT NULL,
    price REAL NOT NULL,
    volume REAL NOT NULL,
    fee REAL NOT NULL,
    regime_at_entry TEXT NOT NULL,
    tier_at_entry INTEGER NOT NULL,
    cycle_net REAL,
    PRIMARY KEY (pair, order_id)
);
CREATE INDEX IF NOT EXISTS fills_pair_ts ON fills (pair, ts);
"""

FILL_COLUMNS = (
    "pair",
    "order_id",
    "ts",
    "exchange",
    "slot",
    "leg",
    "role",
    "side",
    "price",
    "volume",
    "fee",
    "regime_at_entry",
    "tier_at_entry",
    "cycle_net",
)

OPINION_COLUMNS = (
    "pair",
    "ts",
    "panelist",
    "model",
    "mechanical_tier",
    "mechanical_direction",
    "ai_tier",
    "ai_direction",
    "conviction",
    "agreement",
    "rationale",
    "watch_for",
    "latency_sec",
    "price",
)

TRANSITION_COLUMNS = (
    "ts",
    "pair",
    "from_tier",
    "to_tier",
    "from_direction",
    "to_direction",
    "reason",
    "regime",
    "raw_confidence",
    "effective_confidence",
    "bias_signal",
    "shadow",
)


def store_status(
    backend: str,
    path: str | None,
    *,
    degraded: bool = False,
    pending_writes: int = 0,
    rejected_writes: int = 0,
    last_error: str | None = None,
    last_error_at: float | None = None,
    degraded_since: float | None = None,
    last_remote_write_at: float | None = None,
) -> dict[str, Any]:
    """The ``store`` status block (README, "Status payload")."""
    return {
        "backend": backend,
        "state": "degraded" if degraded else "ok",
        "local_path": path,
        "pending_writes": pending_writes,
        "rejected_writes": rejected_writes,
        "last_error": last_error,
        "last_error_at": last_error_at,
        "degraded_since": degraded_since,
        "last_remote_write_at": last_remote_write_at,
    }


def state_document(key: str, text: str) -> dict[str, Any]:
    """A ``bot_state`` row's document; :class:`BadData` when the text is not a JSON object."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise BadData(f"bot_state {key!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadData(f"bot_state {key!r} holds a JSON {type(data).__name__}, not an object")
    bad = first_non_finite(data)
    if bad is not None:  # Python's json reads NaN, Infinity and 1e999; JSON has no such numbers
        raise BadData(f"bot_state {key!r}: {bad[0]} = {bad[1]!r}, which is not a finite number")
    return data


def first_non_finite(obj: Any, path: str = "") -> tuple[str, float] | None:
    """The key path and value of the first NaN or infinity anywhere in ``obj`` (None when there is none)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items: Iterator[tuple[str, Any]] = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub, value in items:
        found = first_non_finite(value, sub)
        if found is not None:
            return found
    return None
