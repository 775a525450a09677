"""The candle and state store: one small interface, SQLite behind it by default.

Nothing outside this module (and the backend modules that implement
:class:`Store`) knows which backend is active. Tables follow SPEC section 2:
``ohlcv_candles`` unique on ``(pair, interval_min, time)``, ``bot_state``
holding the snapshot under one key, ``regime_tier_transitions``, and
``ai_regime_opinions`` (SPEC section 6) unique on ``(pair, ts)``, like the
transitions, and ``fills`` unique on ``(pair, order_id)``: every write can be
repeated without changing anything, which is what lets a remote store retry.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from candles import Candle
from errors import BadData, ConfigError, RetryLater

log = logging.getLogger(__name__)


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


@contextmanager
def _faults(what: str) -> Iterator[None]:
    """Runtime database faults become :class:`RetryLater`; misuse (a bug) is not masked."""
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise RetryLater(f"store: {what} failed: {exc}") from exc


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older version up to :data:`SCHEMA` (before it runs)."""
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    if "regime_tier_transitions_pair_ts" in indexes:  # transitions became unique on (pair, ts)
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "DELETE FROM regime_tier_transitions WHERE id NOT IN "
                "(SELECT MIN(id) FROM regime_tier_transitions GROUP BY pair, ts)"
            )
            conn.execute("DROP INDEX regime_tier_transitions_pair_ts")


class SQLiteStore:
    """:class:`Store` on a SQLite file in WAL mode (or ``:memory:``).

    WAL with ``synchronous=NORMAL`` keeps the file consistent through a
    ``kill -9``: a committed transaction is never lost or torn by a crashed
    process. One connection, guarded by a lock, so any thread may call in.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout=5000")
            if self.path != ":memory:":
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise ConfigError(f"store {self.path}: cannot enable WAL mode (got {mode})")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            _upgrade(self._conn)
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open the store at {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write: committed whole or not at all."""
        with _faults(what), self._lock, self._conn:
            self._conn.execute("BEGIN")
            yield self._conn

    def _written(self, conn: sqlite3.Connection, op: str, args: tuple[Any, ...]) -> None:
        """Called inside every write's transaction with what was written (a mirror queues it for its remote).

        ``args`` are the method's arguments, except that a state document comes as its JSON text.
        """

    # candles ----------------------------------------------------------------

    def upsert_candles(self, pair: str, interval_min: int, candles: Sequence[Candle]) -> None:
        if not candles:
            return
        rows = [(pair, interval_min, *c) for c in candles]
        with self._transaction("writing candles") as conn:
            conn.executemany(
                "INSERT INTO ohlcv_candles (pair, interval_min, time, open, high, low, close, volume, trade_count) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (pair, interval_min, time) DO UPDATE SET open=excluded.open, high=excluded.high, "
                "low=excluded.low, close=excluded.close, volume=excluded.volume, trade_count=excluded.trade_count",
                rows,
            )
            self._written(conn, "candles", (pair, interval_min, list(candles)))

    def load_candles(self, pair: str, interval_min: int, limit: int) -> list[Candle]:
        if limit <= 0:
            return []
        with _faults("reading candles"), self._lock:
            rows = self._conn.execute(
                "SELECT time, open, high, low, close, volume, trade_count FROM ohlcv_candles "
                "WHERE pair = ? AND interval_min = ? ORDER BY time DESC LIMIT ?",
                (pair, interval_min, limit),
            ).fetchall()
        rows.reverse()
        return [Candle(*r) for r in rows]

    def count_candles(self, pair: str, interval_min: int) -> int:
        with _faults("counting candles"), self._lock:
            return self._conn.execute(
                "SELECT COUNT(*) FROM ohlcv_candles WHERE pair = ? AND interval_min = ?", (pair, interval_min)
            ).fetchone()[0]

    def prune_candles(self, pair: str, interval_min: int, *, older_than: int, keep_newest: int) -> int:
        with self._transaction("pruning candles") as conn:
            self._written(conn, "prune", (pair, interval_min, older_than, keep_newest))
            floor = conn.execute(
                "SELECT time FROM ohlcv_candles WHERE pair = ? AND interval_min = ? "
                "ORDER BY time DESC LIMIT 1 OFFSET ?",
                (pair, interval_min, max(keep_newest - 1, 0)),
            ).fetchone()
            if floor is None:
                return 0
            cutoff = min(older_than, floor[0])
            return conn.execute(
                "DELETE FROM ohlcv_candles WHERE pair = ? AND interval_min = ? AND time < ?",
                (pair, interval_min, cutoff),
            ).rowcount

    # state ------------------------------------------------------------------

    def load_state(self, key: str) -> dict[str, Any] | None:
        entry = self.load_state_entry(key)
        return None if entry is None else entry[0]

    def load_state_entry(self, key: str) -> tuple[dict[str, Any], float] | None:
        """The document under ``key`` and when it was saved (not part of :class:`Store`)."""
        with _faults("reading the state"), self._lock:
            row = self._conn.execute("SELECT data, updated_at FROM bot_state WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return state_document(key, row[0]), float(row[1])

    def save_state(self, key: str, data: dict[str, Any], updated_at: float, *, previous_key: str | None = None) -> None:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        with self._transaction("saving the state") as conn:
            if previous_key is not None:
                self._copy_row(conn, key, previous_key)
            self._put_row(conn, key, text, updated_at)

    def copy_state(self, key: str, to_key: str, *, remove: bool = False) -> bool:
        with self._transaction("copying the state") as conn:
            if not self._copy_row(conn, key, to_key):
                return False
            if remove:
                conn.execute("DELETE FROM bot_state WHERE key = ?", (key,))
                self._written(conn, "state_delete", (key,))
            return True

    def _put_row(self, conn: sqlite3.Connection, key: str, text: str, updated_at: float) -> None:
        conn.execute(
            "INSERT INTO bot_state (key, data, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
            (key, text, updated_at),
        )
        self._written(conn, "state", (key, text, updated_at))

    def _copy_row(self, conn: sqlite3.Connection, key: str, to_key: str) -> bool:
        row = conn.execute("SELECT data, updated_at FROM bot_state WHERE key = ?", (key,)).fetchone()
        if row is None:
            return False
        text, updated_at = row
        try:
            state_document(key, text)
        except BadData:  # kept here as it is; a remote copy takes JSON objects only
            conn.execute(
                "INSERT OR REPLACE INTO bot_state (key, data, updated_at) VALUES (?, ?, ?)", (to_key, text, updated_at)
            )
            return True
        self._put_row(conn, to_key, text, updated_at)
        return True

    # events -----------------------------------------------------------------

    def record_tier_transition(self, row: dict[str, Any]) -> None:
        values = tuple(row.get(c) for c in TRANSITION_COLUMNS)
        with self._transaction("recording a tier transition") as conn:
            conn.execute(
                f"INSERT INTO regime_tier_transitions ({', '.join(TRANSITION_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in TRANSITION_COLUMNS)}) ON CONFLICT (pair, ts) DO NOTHING",
                values,
            )
            self._written(conn, "transition", (dict(zip(TRANSITION_COLUMNS, values, strict=True)),))

    def tier_transitions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        with _faults("reading tier transitions"), self._lock:
            cur = self._conn.execute(
                f"SELECT {', '.join(TRANSITION_COLUMNS)} FROM regime_tier_transitions "
                "WHERE pair = ? ORDER BY ts DESC, id DESC LIMIT ?",
                (pair, limit),
            )
            return [dict(zip(TRANSITION_COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def record_ai_opinion(self, row: dict[str, Any]) -> None:
        values = tuple(row.get(c) for c in OPINION_COLUMNS)
        with self._transaction("recording an AI opinion") as conn:
            conn.execute(
                f"INSERT INTO ai_regime_opinions ({', '.join(OPINION_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in OPINION_COLUMNS)}) ON CONFLICT (pair, ts) DO NOTHING",
                values,
            )
            self._written(conn, "opinion", (dict(zip(OPINION_COLUMNS, values, strict=True)),))

    def record_ai_opinion_outcome(self, pair: str, ts: float, *, price_after: float, hit: bool) -> None:
        with self._transaction("scoring an AI opinion") as conn:
            conn.execute(
                "UPDATE ai_regime_opinions SET price_after = ?, hit = ? WHERE pair = ? AND ts = ?",
                (price_after, int(hit), pair, ts),
            )
            self._written(conn, "opinion_outcome", (pair, ts, price_after, hit))

    def ai_opinions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        columns = (*OPINION_COLUMNS, "price_after", "hit")
        with _faults("reading AI opinions"), self._lock:
            cur = self._conn.execute(
                f"SELECT {', '.join(columns)} FROM ai_regime_opinions WHERE pair = ? ORDER BY ts DESC LIMIT ?",
                (pair, limit),
            )
            rows = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
        for row in rows:
            row["hit"] = None if row["hit"] is None else bool(row["hit"])
        return rows

    def record_fill(self, row: dict[str, Any]) -> None:
        values = tuple(row.get(c) for c in FILL_COLUMNS)
        with self._transaction("recording a fill") as conn:
            conn.execute(
                f"INSERT INTO fills ({', '.join(FILL_COLUMNS)}) VALUES ({', '.join('?' for _ in FILL_COLUMNS)}) "
                "ON CONFLICT (pair, order_id) DO NOTHING",
                values,
            )
            self._written(conn, "fill", (dict(zip(FILL_COLUMNS, values, strict=True)),))

    def fills(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        with _faults("reading fills"), self._lock:
            cur = self._conn.execute(
                f"SELECT {', '.join(FILL_COLUMNS)} FROM fills WHERE pair = ? ORDER BY ts DESC, order_id DESC LIMIT ?",
                (pair, limit),
            )
            return [dict(zip(FILL_COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def status(self) -> dict[str, Any]:
        return store_status("sqlite", self.path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class StoreLock:
    """One bot per SQLite store: an exclusive ``flock`` on ``<db>.lock``, held for the process's lifetime.

    The file names its holder (JSON: pid, port, host, started_at, mode); the port is null until the
    dashboard has bound (:meth:`update`). A second process is refused with the holder's PID and port.
    The OS drops the lock when the holder exits, however it exits (``kill -9`` included), so a stale
    file never blocks a start; the file itself stays (removing it would race with a new holder).
    """

    def __init__(self, db_path: str, fd: int, info: dict[str, Any]) -> None:
        self.db_path, self.path, self._fd, self.info = db_path, f"{db_path}.lock", fd, info

    @classmethod
    def acquire(cls, db_path: str, *, mode: str, host: str, now: float) -> StoreLock:
        """Take the lock before anything is written to the store; :class:`ConfigError` naming the holder if held."""
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        path = f"{db_path}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot open the store's lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ConfigError(f"another bot ({holder}) is using {db_path}; stop it first or use another --db") from None
        lock = cls(db_path, fd, {"pid": os.getpid(), "port": None, "host": host, "started_at": now, "mode": mode})
        lock._write()
        return lock

    def update(self, **fields: Any) -> None:
        """Record more about the holder (the dashboard's port once it is bound)."""
        self.info.update(fields)
        self._write()

    def _write(self) -> None:
        data = json.dumps(self.info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def _lock_holder(fd: int) -> str:
    """``PID 1234, dashboard port 8080`` from a held lock file (read again once if caught mid-write)."""
    for _ in range(3):
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            port = info.get("port")
            shown = f"dashboard port {port}" if port is not None else "dashboard port not bound yet"
            return f"PID {info.get('pid')}, {shown}"
        time.sleep(0.05)
    return "its PID unknown"
