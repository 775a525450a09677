"""The :class:`store.Store` on Supabase (Postgres behind PostgREST), through the ``supabase`` client.

The contract is exactly :class:`store.SQLiteStore`'s: same tables and columns
(``store/supabase_schema.sql`` creates them), same results, same errors. Choices:

- **Idempotent writes.** Candles are upserted on ``(pair, interval_min, time)``
  (``Prefer: resolution=merge-duplicates``, ``on_conflict``) in batches of
  ``batch_size``, de-duplicated by ``time`` first (last wins, as SQLite's
  ``executemany`` does; Postgres refuses a command that touches one key
  twice). A batch retried after a lost answer changes nothing. Batches are not
  one transaction: after a failure the earlier ones have landed and the caller
  simply sends everything again. Opinions and fills are inserted with
  ``resolution=ignore-duplicates`` on their keys, the snapshot upserted on
  ``key``. Tier transitions are unique on ``(pair, ts)`` and inserted the
  same way as opinions.
- **Paged loads.** Supabase answers at most ``db-max-rows`` (1000 by default)
  rows per request whatever ``limit`` asks. :meth:`SupabaseStore.load_candles`
  reads newest first in pages of ``page_size`` using the time of the oldest
  row seen so far (``time=lt.T``), not ``offset``: a candle written between two
  pages cannot shift a row into both. It stops at ``limit`` rows or when a page
  comes back shorter than the largest page seen (the server's cap is learnt,
  not assumed), and returns the rows oldest first. The event tables are read
  the same way with ``offset``.
- **Faults.** No retries inside (the client's own retry, which sleeps up to
  7 s on a 503, is off): network errors, timeouts (``timeout`` seconds per
  request), 5xx, 408 and 429 (with ``Retry-After``), and PostgREST's
  database-unavailable codes raise :class:`errors.RetryLater`; the caller tries
  again on its cadence. A refused key (401/403) or a missing table or column
  (schema not applied) raises :class:`errors.ConfigError` naming the fix; a row
  the database rejects raises :class:`errors.BadData`. No ``httpx`` or
  ``postgrest`` exception escapes. Like SQLite's, a state that is not JSON
  (NaN) raises ``ValueError`` before anything is sent.
- **Types.** Postgres renders a whole ``double precision`` as ``100``; rows are
  coerced back to the Python types SQLite returns (float for REAL columns,
  int for INTEGER ones), derived from :data:`store.SCHEMA`.
- :meth:`SupabaseStore.check` (not part of :class:`store.Store`) reads each
  table once, for a startup that wants to fail fast on a wrong key or schema.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
from postgrest import APIError, SyncRequestBuilder
from supabase import ClientOptions, create_client

from candles import Candle
from errors import BadData, ConfigError, RetryLater
from redaction import mask_url, scrub
from retry import parse_retry_after
from store.interface import FILL_COLUMNS, OPINION_COLUMNS, SCHEMA, TRANSITION_COLUMNS, state_document, store_status

log = logging.getLogger(__name__)

CANDLES = "ohlcv_candles"
STATE = "bot_state"
TRANSITIONS = "regime_tier_transitions"
OPINIONS = "ai_regime_opinions"
FILLS = "fills"
TABLES = (CANDLES, STATE, TRANSITIONS, OPINIONS, FILLS)  # the store's (the SQLite file has the same)
LEASES = "bot_leases"  # Supabase only: which bot runs a pair
LEASE_COLUMNS = ("pair", "holder", "host", "store", "pid", "port", "acquired_at", "expires_at")
# The lease table as SQLite DDL (store/supabase_schema.sql has it for Postgres): the local PostgREST of the tests.
LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bot_leases (
    pair TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    host TEXT NOT NULL,
    store TEXT NOT NULL,
    pid INTEGER NOT NULL,
    port INTEGER,
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""
LEASE_TTL_SEC = 90.0
LEASE_RENEW_SEC = 30.0
LEASE_RETRY_SEC = 2.0  # while not held (Supabase was unreachable at start): how often to try again
CANDLE_COLUMNS = ("time", "open", "high", "low", "close", "volume", "trade_count")
CANDLE_KEY = "pair,interval_min,time"
SCHEMA_FILE = "store/supabase_schema.sql"
DEFAULT_TIMEOUT_SEC = 10.0
RETRY_STATUSES = frozenset({408, 425, 429})
# Postgres SQLSTATE classes that say "not now": connection, resources, operator intervention, rollback.
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})
SCHEMA_SQLSTATES = frozenset({"42P01", "42703", "42P10", "42883", "3F000"})
_CONSTRAINTS = frozenset({"PRIMARY", "UNIQUE", "CONSTRAINT", "CHECK", "FOREIGN", "EXCLUDE"})
_COLUMN_OPTIONS = re.compile(r"\s+(NOT|NULL|DEFAULT|PRIMARY|GENERATED|REFERENCES|CHECK|UNIQUE|COLLATE)\b", re.I)


# Schema text (pure) ---------------------------------------------------------------


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += char == "("
        depth -= char == ")"
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_tables(sql: str) -> dict[str, dict[str, Any]]:
    """``{table: {"columns": {name: type}, "primary_key": [names]}}`` from ``CREATE TABLE`` statements.

    Understands the plain DDL of :data:`store.SCHEMA` and ``store/supabase_schema.sql``
    (SQLite and Postgres spellings alike); comments are ignored.
    """
    text = re.sub(r"--[^\n]*", "", sql)
    out: dict[str, dict[str, Any]] = {}
    pattern = re.compile(r"create\s+table\s+(?:if\s+not\s+exists\s+)?(?:public\.)?\"?(\w+)\"?\s*\(", re.I)
    for match in pattern.finditer(text):
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        columns: dict[str, str] = {}
        primary: list[str] = []
        for item in _split_top_level(text[match.end() : i - 1]):
            first = item.split()[0].upper()
            if first in _CONSTRAINTS:
                pk = re.search(r"primary\s+key\s*\(([^)]*)\)", item, re.I)
                if pk:
                    primary = [c.strip().strip('"') for c in pk[1].split(",")]
                continue
            name, _, rest = item.partition(" ")
            kind = _COLUMN_OPTIONS.split(" " + rest.strip(), maxsplit=1)[0].strip()
            columns[name.strip('"')] = kind.lower()
            if re.search(r"\bprimary\s+key\b", rest, re.I):
                primary = [name.strip('"')]
        out[match[1]] = {"columns": columns, "primary_key": primary}
    return out


def _converters(sql: str) -> dict[str, dict[str, Callable[[Any], Any]]]:
    """Per table and column, what turns a JSON value into the type SQLite would return."""
    table_converters: dict[str, dict[str, Callable[[Any], Any]]] = {}
    for table, spec in parse_tables(sql).items():
        table_converters[table] = {}
        for name, kind in spec["columns"].items():
            if "int" in kind:
                table_converters[table][name] = int
            elif kind in ("real", "double precision", "float", "numeric"):
                table_converters[table][name] = float
    return table_converters


CONVERTERS = _converters(SCHEMA + LEASE_SCHEMA)


def coerce_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with numbers as SQLite returns them (``100`` -> ``100.0`` in a REAL column)."""
    convert = CONVERTERS.get(table, {})
    return {k: (v if v is None or k not in convert else convert[k](v)) for k, v in row.items()}


# Faults (pure) ----------------------------------------------------------------------


def classify_api_error(
    status: int | None, code: str | None, message: str | None, *, retry_after: float | None, what: str
) -> Exception:
    """The bot's exception for an error answer (``status`` None when unknown)."""
    code = code or ""
    if code.isdigit() and len(code) == 3:  # no PostgREST body (HEAD, a proxy's page): the client puts the status here
        status, code = status or int(code), ""
    text = f"store: {what} failed: Supabase answered {status or '?'}" + (f" {code}" if code else "")
    text += f": {message}" if message else ""
    if (status is not None and (status >= 500 or status in RETRY_STATUSES)) or code.startswith("PGRST0"):
        return RetryLater(text, retry_after_sec=retry_after)
    if len(code) == 5 and code[:2] in TRANSIENT_SQLSTATE_CLASSES:  # a Postgres SQLSTATE
        return RetryLater(text, retry_after_sec=retry_after)
    if status in (401, 403) or code.startswith("PGRST3") or code == "42501":
        return ConfigError(f"{text} (check SUPABASE_KEY: the service-role key of this project)")
    if status == 404 or code.startswith("PGRST2") or code in SCHEMA_SQLSTATES:
        return ConfigError(f"{text} (apply {SCHEMA_FILE} to the project's database)")
    return BadData(text)


# The store --------------------------------------------------------------------------


class SupabaseStore:
    """:class:`store.Store` on a Supabase project's REST API. Any thread may call in.

    ``url`` is the project URL (``https://<ref>.supabase.co``) and ``key`` its
    service-role key (or a key that row-level security lets read and write
    these tables). Nothing goes over the network until the first call.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        page_size: int = 1000,
        batch_size: int = 500,
        timeout: float = DEFAULT_TIMEOUT_SEC,
    ) -> None:
        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise ConfigError(f"SUPABASE_URL={mask_url(url or '')!r} is not an http(s) URL")
        if not key or not key.strip():
            raise ConfigError("SUPABASE_KEY is empty")
        if page_size < 1 or batch_size < 1 or not timeout > 0:
            raise ValueError("page_size, batch_size and timeout must be positive")
        self.url = url
        self._secrets = (key,)  # masked in every error text: a proxy or the client may quote it
        self.page_size = page_size
        self.batch_size = batch_size
        self.timeout = timeout
        self._answer = threading.local()  # status and Retry-After of this thread's last answer
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4, keepalive_expiry=30.0),
            event_hooks={"response": [self._note_answer]},
        )
        options = ClientOptions(
            postgrest_client_retry=False,
            httpx_client=self._http,
            auto_refresh_token=False,
            persist_session=False,
        )
        try:
            self._client = create_client(url.rstrip("/"), key, options)
        except Exception as exc:  # the client validates its arguments
            self._http.close()
            raise ConfigError(scrub(f"cannot create the Supabase client for {url}: {exc}", self._secrets)) from None

    def _note_answer(self, response: httpx.Response) -> None:
        self._answer.status = response.status_code
        self._answer.retry_after = parse_retry_after(response.headers.get("retry-after"))

    @contextmanager
    def _faults(self, what: str) -> Iterator[None]:
        """Transport and server faults become :class:`RetryLater`; see :func:`classify_api_error`."""
        self._answer.status, self._answer.retry_after = None, None
        try:
            yield
        except APIError as exc:
            status, retry_after = self._answer.status, self._answer.retry_after
            message = scrub(exc.message, self._secrets) if exc.message else exc.message
            raise classify_api_error(status, exc.code, message, retry_after=retry_after, what=what) from exc
        except httpx.TimeoutException as exc:
            raise RetryLater(f"store: {what} failed: Supabase did not answer within {self.timeout:g} s") from exc
        except httpx.HTTPError as exc:  # connection refused or reset, dropped, protocol errors
            raise RetryLater(scrub(f"store: {what} failed: {type(exc).__name__}: {exc}", self._secrets)) from exc

    def _table(self, name: str) -> SyncRequestBuilder:
        return self._client.table(name)

    @staticmethod
    def _rows(data: Any, what: str) -> list[dict[str, Any]]:
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise RetryLater(f"store: {what} failed: Supabase answered something that is not a list of rows")
        return data

    def check(self) -> None:
        """Read each table once: :class:`ConfigError` for a refused key or a missing table or column."""
        columns = {
            CANDLES: ("pair", "interval_min", *CANDLE_COLUMNS),
            STATE: ("key", "data", "updated_at"),
            TRANSITIONS: ("id", *TRANSITION_COLUMNS),
            OPINIONS: (*OPINION_COLUMNS, "price_after", "hit"),
            FILLS: FILL_COLUMNS,
            LEASES: LEASE_COLUMNS,
        }
        for table, names in columns.items():
            with self._faults(f"checking table {table}"):
                self._table(table).select(",".join(names)).limit(1).execute()

    # candles ----------------------------------------------------------------------

    def upsert_candles(self, pair: str, interval_min: int, candles: Sequence[Candle]) -> None:
        by_time = {int(c.time): c for c in candles}  # one row per key and command, the last one wins
        rows = [
            {"pair": pair, "interval_min": interval_min, **dict(zip(CANDLE_COLUMNS, c, strict=True))}
            for c in by_time.values()
        ]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            with self._faults("writing candles"):
                self._table(CANDLES).upsert(batch, on_conflict=CANDLE_KEY, returning="minimal").execute()

    def load_candles(self, pair: str, interval_min: int, limit: int, *, deadline: float | None = None) -> list[Candle]:
        """The newest ``limit`` candles, oldest first. With ``deadline`` (a ``time.monotonic()``
        value) a load still paging when it passes raises :class:`RetryLater` instead of going on."""
        if limit <= 0:
            return []
        rows: list[dict[str, Any]] = []
        largest_page = 0
        while len(rows) < limit:
            if rows and deadline is not None and time.monotonic() > deadline:
                raise RetryLater(f"store: reading candles failed: Supabase too slow ({len(rows)} rows so far)")
            want = min(self.page_size, limit - len(rows))
            query = (
                self._table(CANDLES).select(",".join(CANDLE_COLUMNS)).eq("pair", pair).eq("interval_min", interval_min)
            )
            if rows:
                query = query.lt("time", rows[-1]["time"])
            with self._faults("reading candles"):
                page = self._rows(query.order("time", desc=True).limit(want).execute().data, "reading candles")
            rows.extend(page[:want])
            largest_page = max(largest_page, len(page))
            if not page or (len(page) < want and len(page) < largest_page):
                break
        rows.reverse()
        return [
            Candle(int(r["time"]), *(float(r[k]) for k in CANDLE_COLUMNS[1:6]), int(r["trade_count"] or 0))
            for r in rows
        ]

    def count_candles(self, pair: str, interval_min: int) -> int:
        with self._faults("counting candles"):
            answer = (
                self._table(CANDLES)
                .select("time", count="exact", head=True)
                .eq("pair", pair)
                .eq("interval_min", interval_min)
                .execute()
            )
        if answer.count is None:
            raise RetryLater("store: counting candles failed: Supabase sent no count (Content-Range)")
        return int(answer.count)

    def prune_candles(self, pair: str, interval_min: int, *, older_than: int, keep_newest: int) -> int:
        # The time of the keep_newest-th newest candle bounds the cut. Two requests, not one
        # transaction: rows written in between are newer, so the newest keep_newest still survive.
        with self._faults("pruning candles"):
            floor = self._rows(
                self._table(CANDLES)
                .select("time")
                .eq("pair", pair)
                .eq("interval_min", interval_min)
                .order("time", desc=True)
                .range(max(keep_newest - 1, 0), max(keep_newest - 1, 0))
                .execute()
                .data,
                "pruning candles",
            )
        if not floor:
            return 0
        cutoff = min(older_than, int(floor[0]["time"]))
        with self._faults("pruning candles"):
            answer = (
                self._table(CANDLES)
                .delete(count="exact", returning="minimal")
                .eq("pair", pair)
                .eq("interval_min", interval_min)
                .lt("time", cutoff)
                .execute()
            )
        if answer.count is None:
            log.warning("Supabase sent no count for a prune of %s %sm; reporting 0", pair, interval_min)
            return 0
        return int(answer.count)

    # state ------------------------------------------------------------------------

    def load_state(self, key: str) -> dict[str, Any] | None:
        entry = self.load_state_entry(key)
        return None if entry is None else entry[0]

    def load_state_entry(self, key: str) -> tuple[dict[str, Any], float] | None:
        """The document under ``key`` and when it was saved (not part of :class:`store.Store`)."""
        with self._faults("reading the state"):
            rows = self._rows(
                self._table(STATE).select("data,updated_at").eq("key", key).limit(1).execute().data,
                "reading the state",
            )
        if not rows:
            return None
        data = rows[0].get("data")
        if isinstance(data, str):  # a json/text column instead of jsonb
            data = state_document(key, data)
        elif not isinstance(data, dict):
            raise BadData(f"bot_state {key!r} holds a JSON {type(data).__name__}, not an object")
        return data, float(rows[0].get("updated_at") or 0.0)

    def save_state(self, key: str, data: dict[str, Any], updated_at: float, *, previous_key: str | None = None) -> None:
        # Serialised first, exactly as SQLite's store does: NaN raises ValueError before anything is sent.
        document = json.loads(json.dumps(data, separators=(",", ":"), allow_nan=False))
        rows = [{"key": key, "data": document, "updated_at": float(updated_at)}]
        if previous_key is not None:
            replaced = self._state_row(key)
            if replaced is not None:  # both rows in one upsert: one statement, one transaction
                rows.insert(0, {**replaced, "key": previous_key})
        with self._faults("saving the state"):
            self._table(STATE).upsert(rows, on_conflict="key", returning="minimal").execute()

    def copy_state(self, key: str, to_key: str, *, remove: bool = False) -> bool:
        """As :meth:`store.SQLiteStore.copy_state`, in two requests: the copy lands before the original goes."""
        row = self._state_row(key)
        if row is None:
            return False
        with self._faults("copying the state"):
            self._table(STATE).upsert({**row, "key": to_key}, on_conflict="key", returning="minimal").execute()
        if remove:
            self.delete_state(key)
        return True

    def delete_state(self, key: str) -> None:
        """Remove the row under ``key`` (the mirror's outbox replays a move with it)."""
        with self._faults("deleting the state"):
            self._table(STATE).delete(returning="minimal").eq("key", key).execute()

    def _state_row(self, key: str) -> dict[str, Any] | None:
        with self._faults("reading the state"):
            rows = self._rows(
                self._table(STATE).select("data,updated_at").eq("key", key).limit(1).execute().data,
                "reading the state",
            )
        return rows[0] if rows else None

    # events -----------------------------------------------------------------------

    def _newest(
        self, table: str, columns: Sequence[str], pair: str, order: Sequence[str], limit: int, what: str
    ) -> list[dict[str, Any]]:
        """The first ``limit`` rows of ``pair`` in ``order`` (descending), paged past the server's cap."""
        rows: list[dict[str, Any]] = []
        largest_page = 0
        while len(rows) < limit:
            want = min(self.page_size, limit - len(rows))
            query = self._table(table).select(",".join(columns)).eq("pair", pair)
            for column in order:
                query = query.order(column, desc=True)
            with self._faults(what):
                page = self._rows(query.range(len(rows), len(rows) + want - 1).execute().data, what)
            rows.extend(page[:want])
            largest_page = max(largest_page, len(page))
            if not page or (len(page) < want and len(page) < largest_page):
                break
        return [coerce_row(table, {c: r.get(c) for c in columns}) for r in rows]

    def record_tier_transition(self, row: dict[str, Any]) -> None:
        values = {c: row.get(c) for c in TRANSITION_COLUMNS}
        with self._faults("recording a tier transition"):
            self._table(TRANSITIONS).upsert(
                values, on_conflict="pair,ts", ignore_duplicates=True, returning="minimal"
            ).execute()

    def tier_transitions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._newest(TRANSITIONS, TRANSITION_COLUMNS, pair, ("ts", "id"), limit, "reading tier transitions")

    def record_ai_opinion(self, row: dict[str, Any]) -> None:
        values = {c: row.get(c) for c in OPINION_COLUMNS}
        with self._faults("recording an AI opinion"):
            self._table(OPINIONS).upsert(
                values, on_conflict="pair,ts", ignore_duplicates=True, returning="minimal"
            ).execute()

    def record_ai_opinion_outcome(self, pair: str, ts: float, *, price_after: float, hit: bool) -> None:
        with self._faults("scoring an AI opinion"):
            (
                self._table(OPINIONS)
                .update({"price_after": price_after, "hit": int(hit)}, returning="minimal")
                .eq("pair", pair)
                .eq("ts", ts)
                .execute()
            )

    def ai_opinions(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        columns = (*OPINION_COLUMNS, "price_after", "hit")
        rows = self._newest(OPINIONS, columns, pair, ("ts",), limit, "reading AI opinions")
        for row in rows:
            row["hit"] = None if row["hit"] is None else bool(row["hit"])
        return rows

    def record_fill(self, row: dict[str, Any]) -> None:
        values = {c: row.get(c) for c in FILL_COLUMNS}
        with self._faults("recording a fill"):
            self._table(FILLS).upsert(
                values, on_conflict="pair,order_id", ignore_duplicates=True, returning="minimal"
            ).execute()

    def fills(self, pair: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._newest(FILLS, FILL_COLUMNS, pair, ("ts", "order_id"), limit, "reading fills")

    def status(self) -> dict[str, Any]:
        return store_status("supabase", None)  # no local file; the bot runs it behind a mirror

    def close(self) -> None:
        self._http.close()


class StoreLease:
    """One bot per pair on a Supabase project: a row of ``bot_leases`` with an expiry, renewed while the bot runs.

    :meth:`acquire` inserts the row (``ignore-duplicates``: of two machines racing, one insert lands) or
    takes it over with a conditional update: where it has expired (``expires_at=lt.now``), or where its
    holder ran on this host with this same store file (that holder is gone: this process holds the
    file's lock). Postgres evaluates the condition under the row's lock, so two machines cannot both win.
    A live holder elsewhere is refused (:class:`ConfigError` naming it). A thread renews the row every
    ``renew_sec`` (:meth:`start`); :meth:`release` deletes it at a clean shutdown, and a crashed
    holder's row runs out after ``ttl_sec``. While Supabase is unreachable the bot runs on (Supabase is
    never a reason to stop trading) and the thread acquires once it answers; ``on_lost`` is called
    when another bot holds the pair by then, or took it over after this one failed to renew in time.
    """

    def __init__(
        self,
        client: SupabaseStore,
        pair: str,
        *,
        store: str,
        now: Callable[[], float],
        ttl_sec: float = LEASE_TTL_SEC,
        renew_sec: float = LEASE_RENEW_SEC,
    ) -> None:
        self.client, self.pair, self.now = client, pair, now
        self.ttl_sec, self.renew_sec = ttl_sec, renew_sec
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.holder = f"{self.host}:{self.pid}:{secrets.token_hex(4)}"
        self.store = store
        self.port: int | None = None
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost: Callable[[str], None] = lambda message: None

    def _table(self) -> SyncRequestBuilder:
        return self.client._table(LEASES)

    def _row(self, now: float) -> dict[str, Any]:
        return {
            "pair": self.pair, "holder": self.holder, "host": self.host, "store": self.store, "pid": self.pid,
            "port": self.port, "acquired_at": now, "expires_at": now + self.ttl_sec,
        }  # fmt: skip

    def acquire(self) -> None:
        """Hold the pair's lease; :class:`ConfigError` naming the holder when another bot holds it.

        :class:`RetryLater` when Supabase does not answer (the caller may go on and :meth:`start`).
        """
        now = self.now()
        row, current = self._row(now), None
        with self.client._faults("taking the bot lease"):
            won = self._table().upsert(row, on_conflict="pair", ignore_duplicates=True).execute().data
            if not won:
                won = self._table().update(row).eq("pair", self.pair).lt("expires_at", now).execute().data
            if not won:
                current = self._holder()
                if current and current.get("host") == self.host and current.get("store") == self.store:
                    won = self._table().update(row).eq("pair", self.pair).eq("holder", current["holder"]).execute().data
        if not won:
            raise ConfigError(self._refusal(current, now))
        self.held = True
        log.info("bot lease on %s taken in Supabase (holder %s, valid %.0f s)", self.pair, self.holder, self.ttl_sec)

    def _holder(self) -> dict[str, Any] | None:
        rows = self.client._rows(
            self._table().select(",".join(LEASE_COLUMNS)).eq("pair", self.pair).limit(1).execute().data,
            "reading the bot lease",
        )
        return rows[0] if rows else None

    def _refusal(self, current: dict[str, Any] | None, now: float) -> str:
        if not current:
            return f"the bot lease on {self.pair} in Supabase changed hands while it was taken; start again"
        port = current.get("port")
        return (
            f"another bot (PID {current.get('pid')} on {current.get('host')}, dashboard port "
            f"{port if port is not None else 'not bound yet'}, store {current.get('store')}) holds {self.pair} in "
            f"Supabase for {max(0.0, float(current['expires_at']) - now):.0f} s more; stop it first, or wait "
            f"{self.ttl_sec:.0f} s if it crashed"
        )

    def renew(self) -> bool:
        """Extend the lease (and record the port); False when another bot has taken it over."""
        now = self.now()
        with self.client._faults("renewing the bot lease"):
            kept = (
                self._table()
                .update({"expires_at": now + self.ttl_sec, "port": self.port})
                .eq("pair", self.pair)
                .eq("holder", self.holder)
                .execute()
                .data
            )
        self.held = bool(kept)
        return self.held

    def release(self) -> None:
        """Stop renewing and delete the row (only if still ours); an unreachable Supabase lets it run out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.client.timeout + 5)
        if not self.held:
            return
        try:
            with self.client._faults("releasing the bot lease"):
                self._table().delete(returning="minimal").eq("pair", self.pair).eq("holder", self.holder).execute()
            self.held = False
            log.info("bot lease on %s released", self.pair)
        except (RetryLater, ConfigError, BadData) as exc:
            log.warning("the bot lease on %s could not be released (%s); it runs out by itself", self.pair, exc)

    def start(self) -> None:
        """Renew every ``renew_sec`` in a daemon thread (after an outage at start: acquire, every few seconds)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bot-lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.renew_sec if self.held else min(self.renew_sec, LEASE_RETRY_SEC)):
            self.tick()

    def tick(self) -> None:
        """One renewal (the thread's step; tests call it directly)."""
        try:
            if self.held:
                if not self.renew():
                    self.on_lost(f"the bot lease on {self.pair} in Supabase was taken over by another bot")
            else:
                self.acquire()
        except ConfigError as exc:
            self.on_lost(str(exc))
        except (RetryLater, BadData) as exc:
            log.warning("bot lease on %s not renewed (%s); trying again in %.0f s", self.pair, exc, self.renew_sec)
