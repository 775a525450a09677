"""The SQLite backend of the store (the default), and the one-bot-per-store lock.

The interface, the schema and the row shapes it shares with the other
backends are in :mod:`store.interface`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from candles import Candle
from errors import BadData, ConfigError, RetryLater
from store.interface import (
    FILL_COLUMNS,
    OPINION_COLUMNS,
    SCHEMA,
    TRANSITION_COLUMNS,
    state_document,
    store_status,
)

log = logging.getLogger(__name__)


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
