"""Supabase as the deep store, with the local SQLite file as its mirror (SPEC section 2; README "Supabase").

:class:`MirroredStore` is the :class:`store.Store` the bot gets when
``SUPABASE_URL`` and ``SUPABASE_KEY`` are set. Supabase is never a reason to
stop trading, so nothing on the main loop waits for it to accept a write:

- **Writes go to the mirror first.** :class:`LocalMirror` is the SQLite store at
  ``DB_PATH`` plus an outbox table: every write lands in the mirror and queues
  itself in the outbox *in the same transaction*, so after a crash the two
  agree. A writer thread sends the outbox to Supabase in order, merging runs
  of candle writes into one batched upsert, and deletes what Supabase
  acknowledged. Every remote write is idempotent (keys and ``ON CONFLICT``),
  so an answer lost in transit and a write sent again change nothing. Only
  the newest snapshot of a ``bot_state`` key and the newest prune of a series
  wait in the outbox: older ones would be overwritten anyway.
- **Faults back off.** A failed send marks the store degraded with the error
  and retries after 1, 2, 4 ... seconds up to ``SUPABASE_RETRY_MAX_SEC`` (or
  the server's ``Retry-After``). The outbox is in the file, so pending writes
  survive a restart. A row Supabase rejects as bad (:class:`errors.BadData`)
  is set aside from the outbox (it stays in the mirror) and counted, so one
  bad row cannot hold up the others.
- **Reads prefer Supabase and fall back to the mirror.** Training loads merge
  Supabase's rows (the deep history, other machines' candles) with the
  mirror's (the writes still pending), newest wins per ``time``. While
  degraded, reads go straight to the mirror without touching the network; a
  healthy but slow Supabase gets ``SUPABASE_TIMEOUT_SEC`` per request and the
  same again for a whole paged load, then the load falls back too. At start
  the snapshot is the newer of Supabase's and the mirror's, so a restart
  during an outage restores from the mirror. Row counts (for the training
  tier) are the larger of the mirror's and the last count Supabase gave, which
  the writer refreshes after each send: counting never waits on the network
  after the first time. The event tables are read from the mirror, which
  holds everything this machine wrote.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from candles import Candle, merge_candles
from config import Settings
from errors import BadData, ConfigError, RetryLater
from store.interface import store_status
from store.sqlite import SQLiteStore
from store.supabase import SupabaseStore

log = logging.getLogger(__name__)

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    merge_key TEXT UNIQUE,
    payload TEXT NOT NULL
);
"""
SEND_BATCH_OPS = 200  # outbox rows read per round
MAX_CANDLES_PER_SEND = 5000  # a run of candle writes is merged up to this many candles
FIRST_RETRY_SEC = 1.0
GATHER_SEC = 0.25  # the writer waits this long after a write before sending


@dataclass(frozen=True)
class Pending:
    """One queued write: its outbox id, the store method's name and its arguments."""

    id: int
    op: str
    args: list[Any]


def _merge_key(op: str, args: tuple[Any, ...]) -> str | None:
    """Writes that supersede earlier ones of the same key: only the newest waits in the outbox."""
    if op in ("state", "state_delete"):  # a move's delete and a later save of the key supersede each other
        return f"state:{args[0]}"
    if op == "prune":
        return f"prune:{args[0]}:{args[1]}"
    return None


class LocalMirror(SQLiteStore):
    """The SQLite store whose every write also queues itself, in the same transaction, for the remote."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        try:
            with self._lock:
                self._conn.executescript(OUTBOX_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot create the outbox in {self.path}: {exc}") from exc
        self._pending = -1  # unknown: counted when asked, and again after each change

    def _written(self, conn: sqlite3.Connection, op: str, args: tuple[Any, ...]) -> None:
        if op == "state":  # the document is already JSON text: not serialised twice
            key, text, updated_at = args
            payload = f"[{json.dumps(key)},{text},{json.dumps(updated_at)}]"
        else:
            payload = json.dumps(args, separators=(",", ":"), allow_nan=False)
        conn.execute(
            "INSERT OR REPLACE INTO store_outbox (op, merge_key, payload) VALUES (?, ?, ?)",
            (op, _merge_key(op, args), payload),
        )
        self._pending = -1  # under the store's lock, like every change of it

    def pending_count(self) -> int:
        """Writes not yet acknowledged by the remote."""
        with self._lock:
            if self._pending < 0:
                try:
                    self._pending = self._conn.execute("SELECT COUNT(*) FROM store_outbox").fetchone()[0]
                except sqlite3.Error:
                    return 0
            return self._pending

    def pending(self, limit: int) -> list[Pending]:
        """The oldest ``limit`` queued writes, in the order they were made."""
        try:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT id, op, payload FROM store_outbox ORDER BY id LIMIT ?", (limit,)
                ).fetchall()
        except sqlite3.Error as exc:
            raise RetryLater(f"store: reading the outbox failed: {exc}") from exc
        return [Pending(i, op, json.loads(payload)) for i, op, payload in rows]

    def done(self, ids: Iterable[int]) -> None:
        """Forget writes the remote acknowledged (a write superseded meanwhile has a new id and stays)."""
        try:
            with self._lock, self._conn:
                self._conn.execute("BEGIN")
                self._conn.executemany("DELETE FROM store_outbox WHERE id = ?", [(i,) for i in ids])
                self._pending = -1
        except sqlite3.Error as exc:
            raise RetryLater(f"store: updating the outbox failed: {exc}") from exc


def _send(remote: SupabaseStore, op: str, args: list[Any]) -> None:
    """Replay one mirror write on the remote (the same method, the same arguments)."""
    if op == "candles":
        pair, interval, rows = args
        remote.upsert_candles(pair, interval, [Candle(*r) for r in rows])
    elif op == "prune":
        pair, interval, older_than, keep_newest = args
        remote.prune_candles(pair, interval, older_than=older_than, keep_newest=keep_newest)
    elif op == "state":
        remote.save_state(*args)
    elif op == "state_delete":
        remote.delete_state(*args)
    elif op == "transition":
        remote.record_tier_transition(*args)
    elif op == "opinion":
        remote.record_ai_opinion(*args)
    elif op == "opinion_outcome":
        pair, ts, price_after, hit = args
        remote.record_ai_opinion_outcome(pair, ts, price_after=price_after, hit=hit)
    elif op == "fill":
        remote.record_fill(*args)
    else:
        raise BadData(f"unknown outbox operation {op!r}")


def next_retry_delay(previous: float, failure: Exception | None, retry_max_sec: float) -> float:
    """Seconds before the writer tries again: none after a success, doubling from 1 s after a
    fault (at least the server's ``Retry-After``), the longest for a refused key or schema."""
    if failure is None:
        return 0.0
    if isinstance(failure, ConfigError):
        return retry_max_sec
    delay = max(previous * 2, FIRST_RETRY_SEC)
    if isinstance(failure, RetryLater) and failure.retry_after_sec is not None:
        delay = max(delay, failure.retry_after_sec)
    return min(delay, retry_max_sec)


def group_writes(batch: Sequence[Pending]) -> list[list[Pending]]:
    """Consecutive candle writes of one series become one send; everything else goes alone, in order."""
    groups: list[list[Pending]] = []
    size = 0
    for item in batch:
        last = groups[-1] if groups else None
        if (
            last is not None
            and item.op == last[0].op == "candles"
            and item.args[:2] == last[0].args[:2]
            and size + len(item.args[2]) <= MAX_CANDLES_PER_SEND
        ):
            last.append(item)
            size += len(item.args[2])
        else:
            groups.append([item])
            size = len(item.args[2]) if item.op == "candles" else 0
    return groups


def _merged(group: Sequence[Pending]) -> tuple[str, list[Any]]:
    if len(group) == 1:
        return group[0].op, group[0].args
    pair, interval = group[0].args[:2]
    return "candles", [pair, interval, [row for item in group for row in item.args[2]]]


class MirroredStore:
    """:class:`store.Store` on Supabase with a local mirror; see the module docstring.

    ``remote`` is used by the writer thread only and ``reader`` by the callers'
    threads, so a slow send never holds up a read. ``now`` stamps the status.
    """

    def __init__(
        self,
        mirror: LocalMirror,
        remote: SupabaseStore,
        reader: SupabaseStore,
        *,
        now: Callable[[], float],
        retry_max_sec: float = 60.0,
        read_budget_sec: float = 5.0,
    ) -> None:
        self.mirror, self.remote, self.reader = mirror, remote, reader
        self.now = now
        self.retry_max_sec = retry_max_sec
        self.read_budget_sec = read_budget_sec
        self._lock = threading.Lock()  # the health fields and the count cache
        self._degraded = False
        self._degraded_since: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_remote_write_at: float | None = None
        self._rejected = 0
        self._failure: Exception | None = None  # of the last flush, for the back-off
        self._remote_counts: dict[tuple[str, int], int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # health -------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._degraded

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            first = not self._degraded
            self._degraded = True
            self._last_error, self._last_error_at = str(exc), self.now()
            if first:
                self._degraded_since = self._last_error_at
        if first:
            log.warning("Supabase degraded (%s); trading goes on with the local mirror", exc)
            self._wake.set()  # the writer probes the way back

    def _healthy(self, *, wrote: bool) -> None:
        with self._lock:
            recovered = self._degraded
            self._degraded, self._degraded_since = False, None
            if wrote:
                self._last_remote_write_at = self.now()
        if recovered:
            log.info("Supabase reachable again")

    def status(self) -> dict[str, Any]:
        with self._lock:
            return store_status(
                "supabase",
                self.mirror.path,
                degraded=self._degraded,
                pending_writes=self.mirror.pending_count(),
                rejected_writes=self._rejected,
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                degraded_since=self._degraded_since,
                last_remote_write_at=self._last_remote_write_at,
            )

    # writes: the mirror now, the remote from the outbox -----------------------

    def upsert_candles(self, pair: str, interval_min: int, candles: Sequence[Candle]) -> None:
        self.mirror.upsert_candles(pair, interval_min, candles)
        self._wake.set()

    def prune_candles(self, pair: str, interval_min: int, *, older_than: int, keep_newest: int) -> int:
        removed = self.mirror.prune_candles(pair, interval_min, older_than=older_than, keep_newest=keep_newest)
        self._wake.set()
        return removed

    def save_state(self, key: str, data: dict[str, Any], updated_at: float, *, previous_key: str | None = None) -> None:
        self.mirror.save_state(key, data, updated_at, previous_key=previous_key)
        self._wake.set()

    def copy_state(self, key: str, to_key: str, *, remove: bool = False) -> bool:
        """On the mirror, queued for Supabase; a newer document only Supabase holds is first brought into the mirror."""
        remote = None
        if not self._degraded:
            try:
                remote = self.reader.load_state_entry(key)
            except BadData:
                remote = None
            except (RetryLater, ConfigError) as exc:
                self._failed(exc)
        if remote is not None:
            try:
                local = self.mirror.load_state_entry(key)
            except BadData:  # an unreadable local row is moved as it is, never overwritten
                local = ({}, math.inf)
            if local is None or remote[1] > local[1]:
                self.mirror.save_state(key, remote[0], remote[1])
        copied = self.mirror.copy_state(key, to_key, remove=remove)
        self._wake.set()
        return copied

    def record_tier_transition(self, row: dict[str, Any]) -> None:
        self.mirror.record_tier_transition(row)
        self._wake.set()

    def record_ai_opinion(self, row: dict[str, Any]) -> None:
        self.mirror.record_ai_opinion(row)
        self._wake.set()

    def record_ai_opinion_outcome(self, pair: str, ts: float, *, price_after: float, hit: bool) -> None:
        self.mirror.record_ai_opinion_outcome(pair, ts, price_after=price_after, hit=hit)
        self._wake.set()

    def record_fill(self, row: dict[str, Any]) -> None:
        self.mirror.record_fill(row)
        self._wake.set()

    # reads --------------------------------------------------------------------

    def load_candles(self, pair: str, interval_min: int, limit: int) -> list[Candle]:
        local = self.mirror.load_candles(pair, interval_min, limit)
        if self._degraded or limit <= 0:
            return local
        try:
            deep = self.reader.load_candles(pair, interval_min, limit, deadline=time.monotonic() + self.read_budget_sec)
        except (RetryLater, ConfigError, BadData) as exc:
            self._failed(exc)
            return local
        return merge_candles(deep, local, limit)

    def count_candles(self, pair: str, interval_min: int) -> int:
        local = self.mirror.count_candles(pair, interval_min)
        with self._lock:
            remote = self._remote_counts.get((pair, interval_min))
        if remote is None and not self._degraded:
            remote = self._count_remote(self.reader, pair, interval_min)
        return max(local, remote or 0)

    def _count_remote(self, client: SupabaseStore, pair: str, interval_min: int) -> int | None:
        try:
            count = client.count_candles(pair, interval_min)
        except (RetryLater, ConfigError, BadData) as exc:
            self._failed(exc)
            return None
        with self._lock:
            self._remote_counts[(pair, interval_min)] = count
        return count

    def load_state(self, key: str) -> dict[str, Any] | None:
        """The newer of the mirror's and Supabase's documents (the mirror's alone while degraded)."""
        entries = [self.mirror.load_state_entry(key)]
        if not self._degraded:
            try:
                entries.append(self.reader.load_state_entry(key))
            except (RetryLater, ConfigError, BadData) as exc:
                self._failed(exc)
        found = [e for e in entries if e is not None]
        return max(found, key=lambda e: e[1])[0] if found else None

    def tier_transitions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        return self.mirror.tier_transitions(pair, limit)

    def ai_opinions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        return self.mirror.ai_opinions(pair, limit)

    def fills(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        return self.mirror.fills(pair, limit)

    # the writer -----------------------------------------------------------------

    def flush(self) -> bool:
        """Send the outbox to Supabase, oldest first, until it is empty or a send fails.

        Returns True when everything pending has landed. While degraded with
        nothing pending, one probe (a read of each table) tests the way back.
        """
        touched: set[tuple[str, int]] = set()
        try:
            sent = self._send_pending(touched)
            if not sent and self._degraded:
                self.remote.check()
        except (RetryLater, ConfigError) as exc:
            self._failure = exc
            self._failed(exc)
            return False
        self._failure = None
        self._healthy(wrote=sent > 0)
        for pair, interval in sorted(touched):
            self._count_remote(self.remote, pair, interval)
        return not self._degraded

    def _send_pending(self, touched: set[tuple[str, int]]) -> int:
        sent = 0
        while batch := self.mirror.pending(SEND_BATCH_OPS):
            for group in group_writes(batch):
                self._send_group(group)
                self.mirror.done(item.id for item in group)
                sent += len(group)
                if group[0].op in ("candles", "prune"):
                    touched.add((group[0].args[0], group[0].args[1]))
        return sent

    def _send_group(self, group: list[Pending]) -> None:
        try:
            _send(self.remote, *_merged(group))
        except BadData as exc:
            if len(group) > 1:  # find the bad one: the rest still lands
                for item in group:
                    self._send_group([item])
                return
            with self._lock:
                self._rejected += 1
                self._last_error, self._last_error_at = str(exc), self.now()
            log.error("Supabase rejected a %s write; it stays in the local mirror only: %s", group[0].op, exc)

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)  # backing off: new writes only join the queue
            else:
                self._wake.wait()
                # Let the cycle that wrote finish first, and gather what else it writes.
                self._stop.wait(GATHER_SEC)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception as exc:  # a bug must not end the writer: report it and back off
                log.exception("the Supabase writer failed")
                self._failure = exc
                self._failed(exc)
            delay = next_retry_delay(delay, self._failure, self.retry_max_sec)

    def start(self) -> None:
        """Start the writer thread (tests may call :meth:`flush` themselves instead)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supabase-writer", daemon=True)
            self._thread.start()
            self._wake.set()  # writes left from the last run go first

    def close(self) -> None:
        """Stop the writer, send what is pending once more unless degraded, close both ends."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.read_budget_sec + 5)
        if not self._degraded and self.mirror.pending_count():
            self.flush()
        pending = self.mirror.pending_count()
        if pending:
            log.warning("%d writes wait for Supabase in %s; they are sent at the next start", pending, self.mirror.path)
        self.remote.close()
        self.reader.close()
        self.mirror.close()


def open_store(settings: Settings, now: Callable[[], float], db_path: str) -> SQLiteStore | MirroredStore:
    """The store the settings ask for: SQLite at ``db_path``, or Supabase mirrored there.

    A refused key or a schema not applied stops the start (:class:`ConfigError`);
    Supabase being unreachable does not: the bot starts degraded on the mirror.
    """
    if not (settings.SUPABASE_URL and settings.SUPABASE_KEY):
        return SQLiteStore(db_path)
    mirror = LocalMirror(db_path)
    timeout = settings.SUPABASE_TIMEOUT_SEC
    remote = SupabaseStore(settings.SUPABASE_URL, settings.SUPABASE_KEY, timeout=timeout)
    reader = SupabaseStore(settings.SUPABASE_URL, settings.SUPABASE_KEY, timeout=timeout)
    store = MirroredStore(
        mirror, remote, reader, now=now, retry_max_sec=settings.SUPABASE_RETRY_MAX_SEC, read_budget_sec=timeout
    )
    try:
        reader.check()
    except ConfigError:
        for end in (remote, reader, mirror):
            end.close()
        raise
    except RetryLater as exc:
        store._failed(exc)
    store.start()
    log.info(
        "store: Supabase at %s, mirrored in %s (%d writes pending)",
        settings.SUPABASE_URL,
        mirror.path,
        mirror.pending_count(),
    )
    return store
