"""A local fake of Supabase's REST API (PostgREST) for tests, standard library only.

A real HTTP server on 127.0.0.1 (port 0 the first time, the same port after a
restart) in a daemon thread, serving ``/rest/v1/<table>`` for the bot's tables
(created in an in-memory SQLite database from :data:`store.SCHEMA` and
:data:`supabase_store.LEASE_SCHEMA`, so the columns are the store's). The
real ``supabase`` client talks to it unchanged.

What it speaks, as PostgREST 12 does:

- ``GET`` / ``HEAD`` with ``select=``, filters ``col=eq.X`` (``neq``, ``gt``,
  ``gte``, ``lt``, ``lte``, ``is.null``; ``not.`` negates), ``order=a.desc,b.asc``
  (``.nullsfirst`` / ``.nullslast``; Postgres's defaults otherwise), ``limit`` /
  ``offset`` and the ``Range: 0-999`` header (intersected), and a hard cap of
  ``max_rows`` rows per answer (Supabase's default ``db-max-rows`` is 1000).
  ``Content-Range: 0-999/*``, or with the total (``0-999/4000``) when
  ``Prefer: count=exact`` is sent; then 206 when the answer is partial and 416
  when the offset is past the end (PostgREST's ``rangeStatusHeader``); ``*/0``
  or ``*/*`` when empty. ``Accept: application/vnd.pgrst.object+json`` asks for
  exactly one row (406, ``PGRST116``, otherwise).
- ``POST`` of one object or an array (``columns=`` names the keys, missing keys
  are null unless ``Prefer: missing=default``), all rows in one transaction:
  a plain insert that hits a unique key is 409 ``23505``;
  ``Prefer: resolution=merge-duplicates`` upserts on ``on_conflict=`` (else the
  primary key) and, like Postgres, refuses a batch that touches one key twice
  (``21000``); ``resolution=ignore-duplicates`` skips existing keys. 201.
- ``PATCH`` and ``DELETE`` with filters (a filter is required, as Supabase's
  ``safeupdate`` demands: ``21000`` otherwise). 204, or 200 with the rows for
  ``Prefer: return=representation``; ``count=exact`` gives ``Content-Range: */N``.
- Errors are PostgREST's JSON ``{"code", "details", "hint", "message"}``:
  unknown table 404 ``PGRST205``, unknown column 400 ``42703`` / ``PGRST204``,
  ``ON CONFLICT`` without a matching key 400 ``42P10``, not-null 400 ``23502``.
- Numbers come back as Postgres renders them: a whole ``double precision`` is
  ``100``, not ``100.0``. ``bot_state.data`` is ``jsonb`` (a JSON value, not text).
- Every request needs ``apikey: <key>`` (401 ``Invalid API key`` / ``No API key
  found``, as Supabase's gateway answers) and ``Authorization: Bearer <key>``
  (401 ``PGRST301``).

Failures are injected with :meth:`FakePostgrest.fail_next`: ``http_400`` (a
row the database refuses, ``23514``), ``http_500``,
``http_502`` (an HTML gateway page), ``http_503``, ``http_429`` (with
``Retry-After``), ``slow`` (wait ``delay`` seconds, then answer normally: a
write the client gave up on still lands, as it may on a real server) and
``drop`` (read the request, close the connection unanswered). An injected
failure never touches the data. :meth:`FakePostgrest.stop` /
:meth:`FakePostgrest.start` make an outage; the data survives it and the
server comes back on the same port.

Parsing and rendering are pure functions; :class:`Database` runs the SQL; the
request handler is a thin adapter bound to its server by a factory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from loopback_server import LoopbackServer

from store.interface import SCHEMA as STORE_SCHEMA
from store.supabase import LEASE_SCHEMA

log = logging.getLogger(__name__)

REST_PREFIX = "/rest/v1/"
DEFAULT_MAX_ROWS = 1000  # Supabase's default db-max-rows
DEFAULT_KEY = "test-service-role-key"
SCHEMA_NAME = "public"
SCHEMA = STORE_SCHEMA + LEASE_SCHEMA  # every table of store/supabase_schema.sql
JSON_COLUMNS = {"bot_state": frozenset({"data"})}  # jsonb in Postgres, text in the SQLite underneath
MAX_BODY_BYTES = 16 * 1024 * 1024
RESERVED_PARAMS = frozenset({"select", "order", "limit", "offset", "on_conflict", "columns"})
OPERATORS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
HTTP_FAILURES = {"http_400": 400, "http_500": 500, "http_502": 502, "http_503": 503, "http_429": 429}
FAIL_KINDS = frozenset({*HTTP_FAILURES, "slow", "drop"})
SINGULAR_TYPE = "application/vnd.pgrst.object+json"
JSON_TYPE = "application/json; charset=utf-8"
REASONS = {
    400: "Bad Request", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable",
}  # fmt: skip

Response = tuple[int, dict[str, str], bytes]


class Failure(NamedTuple):
    kind: str
    delay: float = 0.0
    retry_after: float | None = None


class Request(NamedTuple):
    """One HTTP request as the handler read it (header names lower-cased)."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]
    body: bytes


class PostgrestError(Exception):
    """An answer in PostgREST's error shape."""

    def __init__(self, status: int, code: str, message: str, details: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.hint = status, code, message, details, hint


class Order(NamedTuple):
    column: str
    desc: bool
    nulls_first: bool


class Filter(NamedTuple):
    column: str
    operator: str  # a key of OPERATORS, or "is"
    value: str
    negate: bool


# Pure parsing -------------------------------------------------------------------


def _unquote(name: str) -> str:
    name = name.strip()
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


def _known(table: str, column: str, columns: Sequence[str]) -> str:
    if column not in columns:
        raise PostgrestError(400, "42703", f"column {table}.{column} does not exist")
    return column


def parse_prefer(headers: Mapping[str, str]) -> dict[str, str]:
    """``Prefer: return=minimal,count=exact`` as ``{"return": "minimal", "count": "exact"}``."""
    out: dict[str, str] = {}
    for part in headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            out[name.strip()] = value.strip()
    return out


def parse_select(table: str, text: str | None, columns: Sequence[str]) -> list[str]:
    if text is None or text.strip() in ("", "*"):
        return list(columns)
    return [_known(table, _unquote(c), columns) for c in text.split(",")]


def parse_order(table: str, text: str | None, columns: Sequence[str]) -> list[Order]:
    """``a.desc,b`` with Postgres's null placement: last when ascending, first when descending."""
    out = []
    for term in (text or "").split(","):
        if not term.strip():
            continue
        name, *mods = term.strip().split(".")
        desc = "desc" in mods
        if any(m not in ("asc", "desc", "nullsfirst", "nullslast") for m in mods):
            raise PostgrestError(400, "PGRST100", f'"failed to parse order ({term})"')
        nulls_first = "nullsfirst" in mods or (desc and "nullslast" not in mods)
        out.append(Order(_known(table, _unquote(name), columns), desc, nulls_first))
    return out


def parse_filters(table: str, params: Iterable[tuple[str, str]], columns: Sequence[str]) -> list[Filter]:
    out = []
    for name, text in params:
        if name in RESERVED_PARAMS:
            continue
        negate = text.startswith("not.")
        operator, dot, value = (text[4:] if negate else text).partition(".")
        if not dot or (operator not in OPERATORS and operator != "is"):
            raise PostgrestError(400, "PGRST100", f'"failed to parse filter ({text})"')
        if operator == "is" and value not in ("null", "true", "false"):
            raise PostgrestError(400, "PGRST100", f'"failed to parse filter ({text})"')
        out.append(Filter(_known(table, _unquote(name), columns), operator, value, negate))
    return out


def _non_negative(params: Mapping[str, str], name: str) -> int | None:
    if name not in params:
        return None
    try:
        value = int(params[name])
    except ValueError:
        value = -1
    if value < 0:
        raise PostgrestError(400, "PGRST100", f'"failed to parse {name} parameter ({params[name]})"')
    return value


def requested_range(headers: Mapping[str, str], params: Mapping[str, str], max_rows: int | None) -> tuple[int, int]:
    """``(lower, upper)`` inclusive row indexes (``upper`` -1 for no upper bound; below ``lower`` for none at all).

    The ``Range`` header and ``offset``/``limit`` intersect; ``max_rows`` then caps the answer.
    """
    lower, upper = 0, -1
    match = re.fullmatch(r"(\d+)-(\d*)", headers.get("range", "").strip())
    if match:
        lower = int(match[1])
        upper = int(match[2]) if match[2] else -1
    offset, limit = _non_negative(params, "offset"), _non_negative(params, "limit")
    if offset is not None:
        lower = max(lower, offset)
    if limit is not None:
        end = (offset or 0) + limit - 1
        upper = end if upper < 0 else min(upper, end)
        if limit == 0:
            upper = lower - 1
    if max_rows is not None:
        cap = lower + max_rows - 1
        upper = cap if upper == -1 else min(upper, cap)
    return lower, upper


def content_range(lower: int, n: int, total: int | None) -> str:
    """PostgREST's ``contentRangeH``: ``0-999/4000``, ``0-999/*``, ``*/0``."""
    first = f"{lower}-{lower + n - 1}" if n > 0 and total != 0 else "*"
    return f"{first}/{'*' if total is None else total}"


def range_status(lower: int, n: int, total: int | None) -> int:
    """PostgREST's ``rangeStatus``: 200 without a total; 416 past the end; 206 when partial."""
    if total is None:
        return 200
    if lower > total:
        return 416
    return 206 if n < total else 200


def where_sql(filters: Sequence[Filter]) -> tuple[str, list[Any]]:
    clauses, args = [], []
    for f in filters:
        if f.operator == "is":
            literal = {"null": "NULL", "true": "1", "false": "0"}[f.value]
            clause = f'"{f.column}" IS {literal}' if literal == "NULL" else f'"{f.column}" = {literal}'
        else:
            clause = f'"{f.column}" {OPERATORS[f.operator]} ?'
            args.append(f.value)  # SQLite converts it to the column's numeric affinity
        clauses.append(f"NOT ({clause})" if f.negate else clause)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def order_sql(order: Sequence[Order]) -> str:
    if not order:
        return ""
    terms = [f'"{o.column}" {"DESC" if o.desc else "ASC"} NULLS {"FIRST" if o.nulls_first else "LAST"}' for o in order]
    return " ORDER BY " + ", ".join(terms)


# Pure rendering -----------------------------------------------------------------


def _pg_number(value: Any) -> Any:
    """Postgres renders a whole ``double precision`` without a fraction (``100``, not ``100.0``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    if isinstance(value, dict):
        return {k: _pg_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pg_number(v) for v in value]
    return value


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(_pg_number(payload), separators=(",", ":")).encode()
    return status, {"Content-Type": JSON_TYPE, **(headers or {})}, body


def error_response(err: PostgrestError) -> Response:
    payload = {"code": err.code, "details": err.details, "hint": err.hint, "message": err.message}
    extra = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if err.status == 401 else {}
    return _json(err.status, payload, extra)


def gateway_response(status: int, payload: dict[str, Any]) -> Response:
    """An answer of Supabase's gateway (no PostgREST ``code``)."""
    return _json(status, payload)


def failure_response(failure: Failure) -> Response:
    status = HTTP_FAILURES[failure.kind]
    extra = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
    if status == 502:  # a proxy's page, not JSON
        title = f"{status} {REASONS[status]}"
        body = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>".encode()
        return status, {"Content-Type": "text/html", **extra}, body
    if status == 400:  # the database refused the row (a check constraint the operator added, say)
        payload = {"code": "23514", "details": None, "hint": None, "message": "new row violates check constraint"}
        return _json(status, payload, extra)
    code = "PGRST000" if status == 503 else ""
    payload = {"code": code or str(status), "details": None, "hint": None, "message": REASONS[status]}
    return _json(status, payload, extra)


def render_read(rows: list[dict[str, Any]], lower: int, total: int | None, *, head: bool, singular: bool) -> Response:
    status = range_status(lower, len(rows), total)
    headers = {"Content-Range": content_range(lower, len(rows), total), "Range-Unit": "items"}
    if status == 416:
        err = PostgrestError(
            416,
            "PGRST103",
            "Requested range not satisfiable",
            f"An offset of {lower} was requested, but there are only {total} rows.",
        )
        return error_response(err)
    if singular:
        if len(rows) != 1:
            err = PostgrestError(
                406,
                "PGRST116",
                "JSON object requested, multiple (or no) rows returned",
                f"The result contains {len(rows)} rows",
            )
            return error_response(err)
        status, headers, body = _json(status, rows[0], headers)
    else:
        status, headers, body = _json(status, rows, headers)
    return status, headers, (b"" if head else body)


def render_write(
    method: str, rows: list[dict[str, Any]], prefer: Mapping[str, str], applied: Sequence[str]
) -> Response:
    n = len(rows)
    total = n if prefer.get("count") else None
    first = "*" if method == "POST" or n == 0 else f"0-{n - 1}"
    headers = {"Content-Range": f"{first}/{'*' if total is None else total}"}
    if applied:
        headers["Preference-Applied"] = ",".join(applied)
    created = 201 if method == "POST" else 200
    if prefer.get("return") == "representation":
        return _json(created, rows, headers)
    return (201 if method == "POST" else 204), headers, b""


# The database -------------------------------------------------------------------


class Database:
    """The bot's tables in SQLite, with PostgREST's semantics on top. Not thread-safe: callers lock."""

    def __init__(self, schema: str = SCHEMA) -> None:
        self._conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._conn.executescript(schema)
        names = [r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        self.columns: dict[str, list[str]] = {}
        self.primary_keys: dict[str, list[str]] = {}
        for table in names:
            if table.startswith("sqlite_"):
                continue
            info = self._conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            self.columns[table] = [r[1] for r in info]
            self.primary_keys[table] = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]

    def reset(self) -> None:
        for table in self.columns:
            self._conn.execute(f'DELETE FROM "{table}"')
        with contextlib.suppress(sqlite3.OperationalError):
            self._conn.execute("DELETE FROM sqlite_sequence")

    def close(self) -> None:
        self._conn.close()

    def _decode(self, table: str, names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
        out = dict(zip(names, row, strict=True))
        for name in JSON_COLUMNS.get(table, ()):
            if out.get(name) is not None:
                out[name] = json.loads(out[name])
        return out

    def _encode(self, table: str, column: str, value: Any) -> Any:
        if column in JSON_COLUMNS.get(table, ()):
            return None if value is None else json.dumps(value, separators=(",", ":"))
        if isinstance(value, (dict, list)):
            raise PostgrestError(400, "22P02", f"invalid input syntax for column {column}: {json.dumps(value)}")
        return value

    def _fault(self, table: str, exc: sqlite3.Error, keys: Sequence[str] = ()) -> PostgrestError:
        text = str(exc)
        if "UNIQUE constraint failed" in text:
            cols = ", ".join(keys or self.primary_keys[table])
            return PostgrestError(
                409,
                "23505",
                f'duplicate key value violates unique constraint "{table}_pkey"',
                f"Key ({cols}) already exists.",
            )
        if "NOT NULL constraint failed" in text:
            column = text.rsplit(".", 1)[-1]
            return PostgrestError(
                400, "23502", f'null value in column "{column}" of relation "{table}" violates not-null constraint'
            )
        if "ON CONFLICT clause does not match" in text:
            return PostgrestError(
                400, "42P10", "there is no unique or exclusion constraint matching the ON CONFLICT specification"
            )
        return PostgrestError(500, "XX000", text)

    def count(self, table: str, filters: Sequence[Filter]) -> int:
        where, args = where_sql(filters)
        return self._conn.execute(f'SELECT COUNT(*) FROM "{table}"{where}', args).fetchone()[0]

    def select(
        self,
        table: str,
        select: Sequence[str],
        filters: Sequence[Filter],
        order: Sequence[Order],
        lower: int,
        upper: int,
    ) -> list[dict[str, Any]]:
        if upper != -1 and upper < lower:
            return []
        where, args = where_sql(filters)
        cols = ", ".join(f'"{c}"' for c in select)
        limit = -1 if upper == -1 else upper - lower + 1
        sql = f'SELECT {cols} FROM "{table}"{where}{order_sql(order)} LIMIT ? OFFSET ?'
        return [self._decode(table, select, r) for r in self._conn.execute(sql, [*args, limit, lower])]

    def insert(
        self,
        table: str,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str],
        *,
        resolution: str | None,
        on_conflict: Sequence[str],
        missing_default: bool,
    ) -> list[dict[str, Any]]:
        """Insert ``rows`` in one transaction; the stored rows (inserted or merged) in order."""
        keys = list(on_conflict) or self.primary_keys[table]
        if resolution == "merge-duplicates":
            seen: set[tuple[Any, ...]] = set()
            for row in rows:
                key = tuple(row.get(k) for k in keys)
                if key in seen:
                    raise PostgrestError(
                        400,
                        "21000",
                        "ON CONFLICT DO UPDATE command cannot affect row a second time",
                        hint="Ensure that no rows proposed for insertion within the same command "
                        "have duplicate constrained values.",
                    )
                seen.add(key)
        names = self.columns[table]
        out: list[dict[str, Any]] = []
        self._conn.execute("BEGIN")
        try:
            for row in rows:
                cols = [c for c in columns if c in row] if missing_default else list(columns)
                values = [self._encode(table, c, row.get(c)) for c in cols]
                target = ", ".join(f'"{k}"' for k in keys)
                conflict = ""
                updates = [c for c in cols if c not in keys]
                if resolution == "merge-duplicates":
                    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in updates)
                    conflict = f" ON CONFLICT ({target}) DO UPDATE SET {sets}" if updates else " ON CONFLICT DO NOTHING"
                elif resolution == "ignore-duplicates":
                    conflict = f" ON CONFLICT ({target}) DO NOTHING"
                col_sql = ", ".join(f'"{c}"' for c in cols)
                head = f'INSERT INTO "{table}" ({col_sql}) VALUES ({", ".join("?" for _ in cols)})'
                if not cols:
                    head = f'INSERT INTO "{table}" DEFAULT VALUES'
                returning = ", ".join(f'"{c}"' for c in names)
                for r in self._conn.execute(f"{head}{conflict} RETURNING {returning}", values).fetchall():
                    out.append(self._decode(table, names, r))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.execute("ROLLBACK")
            raise self._fault(table, exc, keys) from exc
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return out

    def update(self, table: str, values: Mapping[str, Any], filters: Sequence[Filter]) -> list[dict[str, Any]]:
        where, args = where_sql(filters)
        sets = ", ".join(f'"{c}" = ?' for c in values)
        encoded = [self._encode(table, c, v) for c, v in values.items()]
        names = self.columns[table]
        returning = ", ".join(f'"{c}"' for c in names)
        try:
            cur = self._conn.execute(f'UPDATE "{table}" SET {sets}{where} RETURNING {returning}', [*encoded, *args])
            return [self._decode(table, names, r) for r in cur.fetchall()]
        except sqlite3.Error as exc:
            raise self._fault(table, exc) from exc

    def delete(self, table: str, filters: Sequence[Filter]) -> list[dict[str, Any]]:
        where, args = where_sql(filters)
        names = self.columns[table]
        returning = ", ".join(f'"{c}"' for c in names)
        cur = self._conn.execute(f'DELETE FROM "{table}"{where} RETURNING {returning}', args)
        return [self._decode(table, names, r) for r in cur.fetchall()]

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of ``table`` in primary-key order (for assertions)."""
        names = self.columns[table]
        keys = ", ".join(f'"{k}"' for k in self.primary_keys[table])
        cur = self._conn.execute(f'SELECT * FROM "{table}" ORDER BY {keys}')
        return [self._decode(table, names, r) for r in cur.fetchall()]


# Answering one request ----------------------------------------------------------


def check_auth(headers: Mapping[str, str], key: str) -> PostgrestError | Response | None:
    """The gateway's ``apikey`` check, then PostgREST's bearer token check; ``None`` when both pass."""
    apikey = headers.get("apikey")
    if apikey is None:
        return gateway_response(
            401,
            {"message": "No API key found in request", "hint": "No `apikey` request header or url param was found."},
        )
    if not secrets.compare_digest(apikey.encode(), key.encode()):
        return gateway_response(
            401, {"message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."}
        )
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        return PostgrestError(401, "PGRST301", "No suitable key or wrong key type")
    return None


def _body_rows(body: bytes) -> list[dict[str, Any]]:
    try:
        payload = json.loads(body or b"null")
    except ValueError as exc:
        raise PostgrestError(400, "PGRST102", "Empty or invalid json") from exc
    rows = [payload] if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PostgrestError(400, "PGRST102", "Empty or invalid json")
    return rows


def _body_columns(table: str, rows: Sequence[Mapping[str, Any]], text: str | None, columns: Sequence[str]) -> list[str]:
    if text is not None:
        names = [_unquote(c) for c in text.split(",") if c.strip()]
    else:
        names = list(rows[0]) if rows else []
        if any(set(r) != set(names) for r in rows):
            raise PostgrestError(400, "PGRST102", "All object keys must match")
    for name in names:
        if name not in columns:
            raise PostgrestError(
                400, "PGRST204", f"Could not find the '{name}' column of '{table}' in the schema cache"
            )
    return names


def respond(db: Database, request: Request, table: str, max_rows: int | None) -> Response:
    """Status, headers and body of one authorised request on ``table`` (the caller holds the lock)."""
    if table not in db.columns:
        raise PostgrestError(404, "PGRST205", f"Could not find the table '{SCHEMA_NAME}.{table}' in the schema cache")
    for header in ("accept-profile", "content-profile"):
        if request.headers.get(header, SCHEMA_NAME) != SCHEMA_NAME:
            raise PostgrestError(406, "PGRST106", f"The schema must be one of the following: {SCHEMA_NAME}")
    columns = db.columns[table]
    params = dict(request.params)
    prefer = parse_prefer(request.headers)
    filters = parse_filters(table, request.params, columns)
    method = request.method
    if method in ("GET", "HEAD"):
        select = parse_select(table, params.get("select"), columns)
        order = parse_order(table, params.get("order"), columns)
        lower, upper = requested_range(request.headers, params, max_rows)
        rows = db.select(table, select, filters, order, lower, upper)
        total = db.count(table, filters) if prefer.get("count") in ("exact", "planned", "estimated") else None
        singular = request.headers.get("accept", "").startswith(SINGULAR_TYPE)
        return render_read(rows, lower, total, head=method == "HEAD", singular=singular)
    applied = [f"{k}={v}" for k, v in prefer.items() if k in ("return", "count", "resolution", "missing")]
    select = parse_select(table, params.get("select"), columns)
    if method == "POST":
        rows = _body_rows(request.body)
        names = _body_columns(table, rows, params.get("columns"), columns)
        on_conflict = [_known(table, _unquote(c), columns) for c in params.get("on_conflict", "").split(",") if c]
        stored = db.insert(
            table,
            rows,
            names,
            resolution=prefer.get("resolution"),
            on_conflict=on_conflict,
            missing_default=prefer.get("missing") == "default",
        )
    elif method in ("PATCH", "DELETE"):
        if not filters:
            raise PostgrestError(400, "21000", f"{'UPDATE' if method == 'PATCH' else 'DELETE'} requires a WHERE clause")
        if method == "PATCH":
            body = _body_rows(request.body)
            if len(body) != 1:
                raise PostgrestError(400, "PGRST102", "Empty or invalid json")
            _body_columns(table, body, None, columns)
            stored = db.update(table, body[0], filters)
        else:
            stored = db.delete(table, filters)
    else:
        raise PostgrestError(405, "PGRST117", f"Unsupported HTTP method: {method}")
    return render_write(method, [{c: r[c] for c in select} for r in stored], prefer, applied)


# The server ---------------------------------------------------------------------


def _make_handler(fake: FakePostgrest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def version_string(self) -> str:
            return "FakePostgREST/12"

        def _serve(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self._send(error_response(PostgrestError(413, "PGRST413", "Payload Too Large")), head=False)
                self.close_connection = True
                return
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(
                self.command,
                parts.path,
                tuple(parse_qsl(parts.query, keep_blank_values=True)),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            self._send(fake.handle(request), head=self.command == "HEAD")

        do_GET = do_HEAD = do_POST = do_PATCH = do_DELETE = _serve  # noqa: N815

        def _send(self, answer: Response | None, *, head: bool) -> None:
            if answer is None:  # a dropped connection on purpose, or stopped while waiting
                self.close_connection = True
                return
            status, headers, body = answer
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                if fake.stopping:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if not head:
                    self.wfile.write(body)
            except OSError:  # the client gave up (its timeout fired)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("fake PostgREST: " + format, *args)

    return Handler


class FakePostgrest:
    """Supabase's ``/rest/v1`` over real HTTP on loopback, data in SQLite.

    Use as a context manager, or :meth:`start` / :meth:`stop` (restartable on
    the same port; the data stays). Every request is recorded in
    :attr:`requests` as ``{"method", "path", "table", "params" (list of
    pairs, repeated names kept), "headers" (lower-cased), "body" (decoded
    JSON or None), "status" (None when dropped)}``.
    """

    def __init__(
        self, key: str = DEFAULT_KEY, *, max_rows: int | None = DEFAULT_MAX_ROWS, schema: str = SCHEMA
    ) -> None:
        """``schema``: the SQLite DDL of the tables served (the store's by default; a test may leave one out)."""
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be positive (or None for no cap)")
        self.key = key
        self.max_rows = max_rows
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        self.db = Database(schema)
        self._lock = threading.Lock()
        self._failures: deque[Failure] = deque()
        self._stop = threading.Event()
        self._http = LoopbackServer(_make_handler(self), "fake-postgrest")

    # control --------------------------------------------------------------------

    def fail_next(self, n: int, kind: str, *, delay: float = 0.0, retry_after: float | None = None) -> None:
        """Make the next ``n`` requests fail with ``kind`` (queued after earlier ones)."""
        if kind not in FAIL_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {sorted(FAIL_KINDS)}")
        if n < 0 or delay < 0 or (retry_after is not None and retry_after < 0):
            raise ValueError("n, delay and retry_after must not be negative")
        with self._lock:
            self._failures.extend([Failure(kind, delay, retry_after)] * n)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def reset(self) -> None:
        """Empty every table, forget the requests and pending failures."""
        with self._lock:
            self.db.reset()
            self.requests.clear()
            self._failures.clear()

    def rows(self, table: str) -> list[dict[str, Any]]:
        """The stored rows of ``table`` (primary-key order)."""
        with self._lock:
            return self.db.rows(table)

    def requests_to(self, table: str, method: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["table"] == table and (method is None or r["method"] == method)]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._http.running

    @property
    def port(self) -> int:
        return self._http.port

    # lifecycle ------------------------------------------------------------------

    def start(self) -> str:
        """Serve (again); the first start picks a free port, later ones reuse it."""
        self._stop.clear()
        self.url = self._http.start()
        return self.url

    def stop(self) -> None:
        """Stop answering and close every connection (an outage); the data stays."""
        self._stop.set()  # wakes every "slow" answer
        self._http.stop()

    def drop_connections(self) -> int:
        """Close the open (idle keep-alive) connections and go on serving; returns how many."""
        return self._http.drop_connections()

    def close(self) -> None:
        self.stop()
        self.db.close()

    def __enter__(self) -> FakePostgrest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # serving --------------------------------------------------------------------

    def handle(self, request: Request) -> Response | None:
        """Answer one request (called from a handler thread); ``None`` closes the connection unanswered."""
        table = request.path[len(REST_PREFIX) :].strip("/") if request.path.startswith(REST_PREFIX) else ""
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            body = None
        record = {
            "method": request.method,
            "path": request.path,
            "table": table,
            "params": list(request.params),
            "headers": dict(request.headers),
            "body": body,
            "status": None,
        }
        with self._lock:
            self.requests.append(record)
            failure = self._failures.popleft() if self._failures else None
        if failure is not None and failure.kind == "slow" and self._stop.wait(failure.delay):
            return None
        if failure is not None and failure.kind == "drop":
            return None
        if failure is not None and failure.kind in HTTP_FAILURES:
            answer = failure_response(failure)
        else:
            answer = self._answer(request, table)
        record["status"] = answer[0]
        return answer

    def _answer(self, request: Request, table: str) -> Response:
        try:
            refused = check_auth(request.headers, self.key)
            if isinstance(refused, PostgrestError):
                raise refused
            if refused is not None:
                return refused
            if not table or "/" in table:
                raise PostgrestError(404, "PGRST125", f"Invalid path specified in request URL: {request.path}")
            with self._lock:
                return respond(self.db, request, table, self.max_rows)
        except PostgrestError as err:
            return error_response(err)
