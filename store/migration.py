"""Copy the local SQLite store into Supabase: ``python bot.py --migrate-to-supabase [--db PATH]``.

For an operator who started on the embedded SQLite default and now sets
``SUPABASE_URL`` / ``SUPABASE_KEY``. Choices:

- **Read-only source.** The file is opened with :mod:`sqlite3` directly
  (``mode=ro``), not through :class:`store.SQLiteStore`, which would create a
  missing file, upgrade its schema and switch it to WAL. The migration never
  writes the file nor creates it; a bot may keep running on it meanwhile (WAL
  readers see committed rows only). Like any reader of a WAL file, SQLite may
  leave empty ``-wal`` / ``-shm`` files beside it.
- **Idempotent, so restartable.** Every remote write is one the store already
  makes idempotent: candles upserted on their key, events inserted ignoring
  duplicates, an opinion's outcome set to the same values again, a ``bot_state``
  document written only when Supabase has none or an older one (``updated_at``).
  Nothing is remembered between runs: after a failure the operator runs it
  again and the rows already there change nothing.
- **Keyset reads.** Each ``(pair, interval_min)`` series is read oldest first in
  pages of ``batch_size`` on ``time > last`` (``OFFSET`` rescans the skipped
  rows and shifts when the bot prunes meanwhile) and each page is one upsert.
  Event tables are read the same way on ``rowid``, i.e. in insertion order, so
  Supabase's transition ids keep the local order; they are written one request
  per row, as the store's API records them. Progress goes out about every
  twentieth of a series or table, and at 100 %.
- **Faults.** :func:`run` first reads each remote table once, so a wrong key
  or a missing schema stops it before anything is written.
  :class:`errors.RetryLater` is retried with exponential back-off (or the
  server's ``Retry-After``) through the injected ``sleep``, up to
  ``max_attempts`` attempts, then the migration stops with it;
  :class:`errors.ConfigError` stops it at once. A row Supabase rejects
  (:class:`errors.BadData`, or the ``ValueError`` the store raises for a value
  JSON cannot carry, such as an infinite volume) is reported, counted and left
  behind; a refused candle page is resent one candle at a time to find the
  culprits.
- **Output.** Progress, retries, rejections, errors and the summary all go to
  ``out`` (stdout from ``bot.py``): one place for the operator to read. :func:`run`
  returns the exit code: 0 done, 1 stopped by a fault that outlived its
  retries (run it again), 2 cannot start or must not go on (settings, source
  file, key, schema).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from candles import Candle
from config import Settings
from errors import BadData, ConfigError, RetryLater
from redaction import mask_url
from retry import backoff_delay as doubling_delay
from store.interface import FILL_COLUMNS, OPINION_COLUMNS, TRANSITION_COLUMNS
from store.supabase import CANDLE_COLUMNS, CANDLES, FILLS, OPINIONS, STATE, TABLES, TRANSITIONS, SupabaseStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_ATTEMPTS = 5
BACKOFF_BASE_SEC = 1.0
BACKOFF_MAX_SEC = 30.0
PROGRESS_STEPS = 20  # progress lines per series or table, at most (plus a final one if rows arrived meanwhile)
KEY_FLOOR = -(2**63)  # below every SQLite integer: the first keyset page starts here
SCORED_OPINION_COLUMNS = (*OPINION_COLUMNS, "price_after", "hit")
RERUN_IS_SAFE = "What was copied stays in Supabase; running the migration again is safe (nothing is duplicated)."


class Target(Protocol):
    """What the migration writes to (:class:`supabase_store.SupabaseStore`)."""

    def upsert_candles(self, pair: str, interval_min: int, candles: Sequence[Candle]) -> None: ...

    def load_state_entry(self, key: str) -> tuple[dict[str, Any], float] | None: ...

    def save_state(self, key: str, data: dict[str, Any], updated_at: float) -> None: ...

    def record_fill(self, row: dict[str, Any]) -> None: ...

    def record_ai_opinion(self, row: dict[str, Any]) -> None: ...

    def record_ai_opinion_outcome(self, pair: str, ts: float, *, price_after: float, hit: bool) -> None: ...

    def record_tier_transition(self, row: dict[str, Any]) -> None: ...


@dataclass
class TableCount:
    """Rows of one table: written to Supabase, left alone on purpose, refused by it."""

    copied: int = 0
    skipped: int = 0
    rejected: int = 0


@dataclass
class MigrationReport:
    """What one migration did, per table (``rejected`` also counts refused opinion outcomes)."""

    candles: TableCount = field(default_factory=TableCount)
    series: int = 0
    state: TableCount = field(default_factory=TableCount)
    fills: TableCount = field(default_factory=TableCount)
    opinions: TableCount = field(default_factory=TableCount)
    scored: int = 0
    transitions: TableCount = field(default_factory=TableCount)

    @property
    def rejected(self) -> int:
        return sum(c.rejected for c in (self.candles, self.state, self.fills, self.opinions, self.transitions))

    def summary(self) -> list[str]:
        """One line per table."""
        c, s = self.candles, self.state
        return [
            f"{CANDLES}: {c.copied} candles copied in {self.series} series, {c.rejected} rejected",
            f"{STATE}: {s.copied} copied, {s.skipped} skipped (Supabase's is as new or newer), {s.rejected} rejected",
            f"{FILLS}: {self.fills.copied} copied, {self.fills.rejected} rejected",
            f"{OPINIONS}: {self.opinions.copied} copied ({self.scored} scored), {self.opinions.rejected} rejected",
            f"{TRANSITIONS}: {self.transitions.copied} copied, {self.transitions.rejected} rejected",
        ]


# Pure helpers -------------------------------------------------------------------------


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): the server's ``Retry-After``
    when it sent one, else 1, 2, 4 ... seconds, capped."""
    if retry_after is not None:
        return retry_after
    return doubling_delay(attempt - 1, base=BACKOFF_BASE_SEC, cap=BACKOFF_MAX_SEC)


def progress_due(before: int, after: int, total: int, steps: int = PROGRESS_STEPS) -> bool:
    """Whether going from ``before`` to ``after`` rows done crosses another ``1/steps`` of ``total``."""
    if total <= 0 or before >= total:
        return False
    return after >= total or after * steps // total > before * steps // total


def progress_line(label: str, done: int, total: int) -> str:
    """``ohlcv_candles XDGUSD 1m: 12000/40320 (29.8%)`` (rows written meanwhile raise the total)."""
    total = max(total, done)
    share = 100.0 * done / total if total else 100.0
    return f"{label}: {done}/{total} ({share:.1f}%)"


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


class _Progress:
    """Prints :func:`progress_line` when :func:`progress_due`, and the final count once."""

    def __init__(self, out: TextIO, label: str, total: int) -> None:
        self.out, self.label, self.total = out, label, total
        self.done = 0
        self._shown = -1

    def add(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if progress_due(before, self.done, self.total):
            self._show()

    def finish(self) -> None:
        if self.done and self._shown != self.done:
            self._show()

    def _show(self) -> None:
        _say(self.out, progress_line(self.label, self.done, self.total))
        self._shown = self.done


@dataclass(frozen=True)
class _Retrying:
    """Calls a remote operation until it stops raising :class:`RetryLater`, sleeping in between."""

    out: TextIO
    sleep: Callable[[float], None]
    max_attempts: int

    def __call__(self, what: str, call: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return call()
            except RetryLater as exc:
                if attempt >= self.max_attempts:
                    raise RetryLater(
                        f"{what}: {exc} (gave up after {attempt} attempts)", retry_after_sec=exc.retry_after_sec
                    ) from exc
                delay = backoff_delay(attempt, exc.retry_after_sec)
                _say(self.out, f"{what}: {exc}; retrying in {delay:g} s (attempt {attempt + 1} of {self.max_attempts})")
                self.sleep(delay)
                attempt += 1


# The source file ----------------------------------------------------------------------


def open_source(path: str | Path) -> tuple[sqlite3.Connection, set[str]]:
    """A read-only connection to the SQLite store at ``path`` and the bot tables it has.

    Raises :class:`ConfigError` for a missing file (never created), one that is not
    SQLite, or a database without any of the bot's tables.
    """
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"no SQLite store at {path}: nothing to migrate (name it with --db or DB_PATH)")
    try:
        conn = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path} read-only: {exc}") from exc
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ConfigError(f"cannot read {path} as a SQLite store: {exc}") from exc
    tables = names & set(TABLES)
    if not tables:
        conn.close()
        raise ConfigError(f"{path} is not the bot's SQLite store: it has none of the tables {', '.join(TABLES)}")
    return conn, tables


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """A fault reading the source (locked, I/O) stops the migration as one worth retrying."""
    try:
        yield
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise RetryLater(f"reading {what} from the SQLite store failed: {exc}") from exc


def _count(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> int:
    with _reading("a row count"):
        return int(conn.execute(sql, args).fetchone()[0])


def candle_series(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """Every ``(pair, interval_min)`` with candles, in key order."""
    with _reading(CANDLES):
        rows = conn.execute(f"SELECT DISTINCT pair, interval_min FROM {CANDLES} ORDER BY pair, interval_min")
        return [(str(pair), int(interval_min)) for pair, interval_min in rows]


def candle_pages(conn: sqlite3.Connection, pair: str, interval_min: int, page_size: int) -> Iterator[list[Candle]]:
    """One series oldest first, ``page_size`` candles at a time, each page after the last time seen."""
    sql = (
        f"SELECT {', '.join(CANDLE_COLUMNS)} FROM {CANDLES} "
        "WHERE pair = ? AND interval_min = ? AND time > ? ORDER BY time LIMIT ?"
    )
    last = KEY_FLOOR
    while True:
        with _reading(CANDLES):
            rows = conn.execute(sql, (pair, interval_min, last, page_size)).fetchall()
        if not rows:
            return
        yield [Candle(*r) for r in rows]
        last = rows[-1][0]


def row_pages(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], page_size: int
) -> Iterator[list[dict[str, Any]]]:
    """The rows of an event table in insertion (``rowid``) order, ``page_size`` at a time."""
    sql = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"
    last = KEY_FLOOR
    while True:
        with _reading(table):
            rows = conn.execute(sql, (last, page_size)).fetchall()
        if not rows:
            return
        yield [dict(zip(columns, r[1:], strict=True)) for r in rows]
        last = rows[-1][0]


def state_documents(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
    """``(key, JSON text, updated_at)`` of every ``bot_state`` document."""
    with _reading(STATE):
        return [(str(k), str(d), float(u)) for k, d, u in conn.execute(f"SELECT key, data, updated_at FROM {STATE}")]


def _document(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# The copy -----------------------------------------------------------------------------


class _Migration:
    """One pass over the source; every remote call goes through :class:`_Retrying`."""

    def __init__(
        self, conn: sqlite3.Connection, tables: set[str], remote: Target, out: TextIO, batch_size: int, retry: _Retrying
    ) -> None:
        self.conn, self.tables, self.remote, self.out = conn, tables, remote, out
        self.batch_size = batch_size
        self.retry = retry
        self.report = MigrationReport()

    def run(self) -> MigrationReport:
        steps = (
            (CANDLES, self.copy_candles),
            (STATE, self.copy_state),
            (FILLS, self.copy_fills),
            (OPINIONS, self.copy_opinions),
            (TRANSITIONS, self.copy_transitions),
        )
        for table, copy in steps:
            if table in self.tables:
                copy()
            else:
                _say(self.out, f"{table}: not in the SQLite store, nothing to copy")
        return self.report

    def _reject(self, what: str, reason: object, count: TableCount) -> None:
        count.rejected += 1
        _say(self.out, f"{what}: rejected, not copied: {reason}")

    def _write(self, what: str, call: Callable[[], None], count: TableCount) -> bool:
        """One write; a row Supabase refuses is reported and counted, and the copy goes on."""
        try:
            self.retry(what, call)
        except (BadData, ValueError) as exc:
            self._reject(what, exc, count)
            return False
        return True

    def _send(self, what: str, call: Callable[[], None], count: TableCount) -> bool:
        """:meth:`_write` of one row, counted as copied when it lands."""
        if not self._write(what, call, count):
            return False
        count.copied += 1
        return True

    # candles ----------------------------------------------------------------------

    def copy_candles(self) -> None:
        for pair, interval_min in candle_series(self.conn):
            self.report.series += 1
            self.copy_series(pair, interval_min)

    def copy_series(self, pair: str, interval_min: int) -> None:
        label = f"{CANDLES} {pair} {interval_min}m"
        total = _count(
            self.conn, f"SELECT COUNT(*) FROM {CANDLES} WHERE pair = ? AND interval_min = ?", (pair, interval_min)
        )
        progress = _Progress(self.out, label, total)
        for page in candle_pages(self.conn, pair, interval_min, self.batch_size):
            self._send_candles(label, pair, interval_min, page)
            progress.add(len(page))
        progress.finish()

    def _send_candles(self, label: str, pair: str, interval_min: int, page: list[Candle]) -> None:
        upsert = partial(self.remote.upsert_candles, pair, interval_min)
        try:
            self.retry(f"{label} from time {page[0].time}", partial(upsert, page))
        except (BadData, ValueError):  # find the candles refused; the rest still go, one by one
            for candle in page:
                self._send(f"{label} candle at time {candle.time}", partial(upsert, [candle]), self.report.candles)
            return
        self.report.candles.copied += len(page)

    # state ------------------------------------------------------------------------

    def copy_state(self) -> None:
        count = self.report.state
        for key, text, updated_at in state_documents(self.conn):
            what = f"{STATE} {key}"
            data = _document(text)
            if data is None:
                self._reject(what, "not a JSON object in the SQLite store", count)
                continue
            remote = self.retry(what, partial(self.remote.load_state_entry, key))
            if remote is not None and remote[1] >= updated_at:
                count.skipped += 1
                _say(self.out, f"{what}: skipped, Supabase's (updated_at {remote[1]:.3f}) is as new or newer")
            elif self._send(what, partial(self.remote.save_state, key, data, updated_at), count):
                _say(self.out, f"{what}: copied (updated_at {updated_at:.3f})")

    # events -----------------------------------------------------------------------

    def _copy_events(
        self, table: str, columns: Sequence[str], send: Callable[[str, dict[str, Any]], None], *key: str
    ) -> None:
        progress = _Progress(self.out, table, _count(self.conn, f"SELECT COUNT(*) FROM {table}"))
        for page in row_pages(self.conn, table, columns, self.batch_size):
            for row in page:
                send(" ".join([table, *(str(row[k]) for k in key)]), row)
            progress.add(len(page))
        progress.finish()

    def copy_fills(self) -> None:
        def send(what: str, row: dict[str, Any]) -> None:
            self._send(what, partial(self.remote.record_fill, row), self.report.fills)

        self._copy_events(FILLS, FILL_COLUMNS, send, "pair", "order_id")

    def copy_transitions(self) -> None:
        def send(what: str, row: dict[str, Any]) -> None:  # without the local id: Supabase numbers its own
            self._send(what, partial(self.remote.record_tier_transition, row), self.report.transitions)

        self._copy_events(TRANSITIONS, TRANSITION_COLUMNS, send, "pair", "ts")

    def copy_opinions(self) -> None:
        self._copy_events(OPINIONS, SCORED_OPINION_COLUMNS, self._send_opinion, "pair", "ts")

    def _send_opinion(self, what: str, row: dict[str, Any]) -> None:
        count = self.report.opinions
        if not self._send(what, partial(self.remote.record_ai_opinion, row), count):
            return
        if row["price_after"] is None or row["hit"] is None:
            return
        outcome = partial(
            self.remote.record_ai_opinion_outcome,
            row["pair"],
            row["ts"],
            price_after=row["price_after"],
            hit=bool(row["hit"]),
        )
        if self._write(f"{what} outcome", outcome, count):
            self.report.scored += 1


def migrate(
    source_path: str | Path,
    remote: Target,
    *,
    out: TextIO,
    batch_size: int = DEFAULT_BATCH_SIZE,
    sleep: Callable[[float], None] = time.sleep,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> MigrationReport:
    """Copy every table of the SQLite store at ``source_path`` into ``remote``; see the module docstring.

    Raises :class:`ConfigError` (source unreadable, key or schema refused) or
    :class:`RetryLater` (a fault outlived ``max_attempts`` attempts); what was
    copied before stays, and running it again is safe.
    """
    if batch_size < 1 or max_attempts < 1:
        raise ValueError("batch_size and max_attempts must be positive")
    conn, tables = open_source(source_path)
    try:
        retry = _Retrying(out, sleep, max_attempts)
        return _Migration(conn, tables, remote, out, batch_size, retry).run()
    finally:
        conn.close()


# The command --------------------------------------------------------------------------


def cannot_start(settings: Settings, db_path: str) -> str | None:
    """Why the migration cannot begin, told without the network (settings, source file), or ``None``."""
    if not settings.SUPABASE_URL or not settings.SUPABASE_KEY:
        return (
            "SUPABASE_URL and SUPABASE_KEY must both be set (in the environment or the .env file) "
            "to migrate into Supabase"
        )
    try:
        conn, _ = open_source(db_path)
    except ConfigError as exc:
        return str(exc)
    conn.close()
    return None


def run(settings: Settings, db_path: str, out: TextIO, *, sleep: Callable[[float], None] = time.sleep) -> int:
    """``bot.py --migrate-to-supabase``: every message goes to ``out``; the exit code is returned
    (0 done, 1 stopped by a lasting fault: run it again, 2 cannot start: fix the settings)."""
    problem = cannot_start(settings, db_path)
    if problem:
        _say(out, f"migration not started: {problem}")
        return 2
    try:
        remote = SupabaseStore(settings.SUPABASE_URL, settings.SUPABASE_KEY, timeout=settings.SUPABASE_TIMEOUT_SEC)
    except ConfigError as exc:
        _say(out, f"migration not started: {exc}")
        return 2
    try:
        return _migrate_into(remote, settings.SUPABASE_URL, db_path, out, sleep)
    finally:
        remote.close()


def _migrate_into(remote: SupabaseStore, url: str, db_path: str, out: TextIO, sleep: Callable[[float], None]) -> int:
    _say(out, f"migrating {db_path} into Supabase at {mask_url(url)}")
    try:
        _Retrying(out, sleep, DEFAULT_MAX_ATTEMPTS)("checking Supabase", remote.check)
    except ConfigError as exc:
        _say(out, f"migration not started: {exc}")
        return 2
    except RetryLater as exc:
        _say(out, f"migration not started: {exc}")
        _say(out, "Nothing was copied; run it again once Supabase answers.")
        return 1
    try:
        report = migrate(db_path, remote, out=out, sleep=sleep)
    except ConfigError as exc:
        _say(out, f"migration stopped: {exc}")
        _say(out, RERUN_IS_SAFE)
        return 2
    except RetryLater as exc:
        _say(out, f"migration failed: {exc}")
        _say(out, RERUN_IS_SAFE)
        return 1
    for line in report.summary():
        _say(out, line)
    if report.rejected:
        _say(out, f"{report.rejected} rows were rejected by Supabase and not copied (listed above)")
    _say(out, "migration complete")
    return 0
