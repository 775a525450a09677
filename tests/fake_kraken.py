"""A local fake of Kraken's public REST API (``GET /0/public/OHLC``,
``GET /0/public/Trades`` and ``GET /0/public/AssetPairs``) for tests.

A real HTTP server on 127.0.0.1 (port 0) in a daemon thread, serving a list of
1-minute :class:`candles.Candle` as Kraken would at the injected ``now``:

- ``{"error": [], "result": {PAIR: [[time, "open", "high", "low", "close",
  "vwap", "volume", count], ...], "last": int}}`` with prices and volume as
  strings, oldest first;
- at most the 720 newest entries, the last one always the candle still forming
  (present whatever ``since`` is); closed entries only when ``time > since``;
- ``last`` is the time of the newest committed (closed) candle, i.e. the
  ``since`` that polls for new committed data. Kraken's docs define it as
  "ID to be used as since when polling for new, committed OHLC data"; a live
  answer to ``interval=60&since=<now>`` shows one forming row at T and
  ``"last": T - 3600``;
- intervals other than 1 are aggregated from the 1-minute candles
  (:func:`candles.aggregate`, buckets aligned to the epoch).

Trades (:meth:`FakeKraken.set_trades`, :class:`kraken_client.Trade`) are served
as ``{"error": [], "result": {PAIR: [["price", "volume", time, "b"|"s",
"m"|"l", "", trade_id], ...], "last": "<nanoseconds>"}}``: at most ``count``
(default and maximum 1000) trades, oldest first, only those done by ``now``;
with ``since`` the first ones newer than it (exclusive; nanoseconds, or unix
seconds when below 10^11, as Kraken accepts both), without it the newest
ones; ``last`` is the nanosecond time of the last trade returned (``since``
itself when none is).

AssetPairs serves the :class:`AssetPair` entries given (by default the fake's
own pair with XDGUSD's rules): ``{"error": [], "result": {NAME: {...}}}`` with
Kraken's fields (``pair_decimals``, ``lot_decimals``, ``ordermin`` and
``costmin`` as strings, ``fees_maker`` tiers, ``status``, ...), every entry
without ``pair``, the matching ones (by entry name or altname) with it, and
``{"error": ["EQuery:Unknown asset pair"]}`` when one asked for is not there.

Failures are injected with :meth:`FakeKraken.fail_next` (they apply to OHLC,
Trades and AssetPairs requests alike). Rendering is pure (:func:`render_ohlc`,
:func:`render_trades`, :func:`asset_pair_entry`); the request handler is a thin
adapter bound to its server by a factory.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from loopback_server import LoopbackServer

from candles import Candle, aggregate
from grid.exchange import PairRules
from kraken.public_client import Trade

log = logging.getLogger(__name__)

OHLC_PATH = "/0/public/OHLC"
TRADES_PATH = "/0/public/Trades"
ASSET_PAIRS_PATH = "/0/public/AssetPairs"
PUBLIC_PATHS = (OHLC_PATH, TRADES_PATH, ASSET_PAIRS_PATH)
TRADES_MAX_COUNT = 1000
SINCE_SECONDS_BELOW = 10**11  # a smaller ``since`` is unix seconds, a larger one nanoseconds
NS_PER_SEC = 1_000_000_000
KRAKEN_WINDOW = 720
KRAKEN_INTERVALS = (1, 5, 15, 30, 60, 240, 1440, 10080, 21600)
PRICE_DECIMALS = 7  # XDGUSD pair_decimals
VOLUME_DECIMALS = 8  # XDGUSD lot_decimals
BAD_ROW_INDEX = 0  # the row "bad_row" corrupts
BAD_PRICE = "n/a"
MAX_POST_BYTES = 64 * 1024  # a POST body larger than this is refused unread

ERROR_ARRAYS = {
    "rate_limit": "EAPI:Rate limit exceeded",
    "too_many": "EGeneral:Too many requests",
    "unavailable": "EService:Unavailable",
    "unknown_pair": "EQuery:Unknown asset pair",
}
HTTP_FAILURES = {"http_429": 429, "http_502": 502, "http_503": 503}
FAIL_KINDS = frozenset({*ERROR_ARRAYS, *HTTP_FAILURES, "malformed", "bad_row", "slow"})

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
REASONS = {429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable"}

Response = tuple[int, dict[str, str], bytes]


class Failure(NamedTuple):
    kind: str
    retry_after: float | None = None
    delay: float = 0.0


class AssetPair(NamedTuple):
    """One entry the fake's AssetPairs serves; ``rules.pair`` is its altname."""

    rules: PairRules
    name: str | None = None  # the entry's key (Kraken's XXBTZUSD); the altname when None
    base_id: str = "XXDG"
    quote_id: str = "ZUSD"
    status: str = "online"
    fees_published: bool = True

    @property
    def key(self) -> str:
        return self.name or self.rules.pair


# Pure rendering ---------------------------------------------------------------


def _decimal_text(value: float, min_decimals: int) -> str:
    """Positional text that parses back to exactly ``value``, padded like Kraken's fixed decimals."""
    whole, _, frac = format(Decimal(repr(float(value))), "f").partition(".")
    return f"{whole}.{frac.ljust(min_decimals, '0')}"


def kraken_row(c: Candle) -> list[Any]:
    """``[time, open, high, low, close, vwap, volume, count]`` with Kraken's string fields."""
    vwap = round((c.high + c.low + c.close) / 3.0, PRICE_DECIMALS)
    price = [_decimal_text(p, PRICE_DECIMALS) for p in (c.open, c.high, c.low, c.close, vwap)]
    return [int(c.time), *price, _decimal_text(c.volume, VOLUME_DECIMALS), int(c.trade_count)]


def ohlc_entries(candles: Sequence[Candle], interval_min: int, now: float) -> tuple[list[Candle], Candle | None]:
    """Closed candles (at most 719, oldest first) and the forming one, as Kraken holds them at ``now``.

    ``candles`` are 1-minute candles sorted by time. When no candle covers
    ``now`` (the data ran out) the forming entry is a flat, empty candle at the
    last close, as on a market without trades. ``None`` when nothing traded yet.
    """
    width = interval_min * 60
    current = math.floor(now) // width * width
    times = [c.time for c in candles]
    lo = bisect.bisect_left(times, current - KRAKEN_WINDOW * width)
    hi = bisect.bisect_right(times, now)
    visible = list(candles[lo:hi])
    entries = visible if interval_min == 1 else aggregate(visible, interval_min, closed_before=math.inf)
    closed = [c for c in entries if c.time + width <= now]
    forming = next((c for c in entries if c.time == current), None)
    if forming is None:
        last = entries[-1] if entries else (candles[hi - 1] if hi else None)
        if last is None:
            return closed[-(KRAKEN_WINDOW - 1) :], None
        forming = Candle(current, last.close, last.close, last.close, last.close, 0.0, 0)
    return closed[-(KRAKEN_WINDOW - 1) :], forming


def render_ohlc(
    candles: Sequence[Candle], pair: str, interval_min: int, since: int | None, now: float
) -> dict[str, Any]:
    """The decoded ``/0/public/OHLC`` answer for ``pair`` at ``now``."""
    closed, forming = ohlc_entries(candles, interval_min, now)
    if since is not None:
        closed = [c for c in closed if c.time > since]
    rows = [kraken_row(c) for c in closed]
    if forming is not None:
        rows.append(kraken_row(forming))
        last = forming.time - interval_min * 60
    else:
        last = since or 0
    return {"error": [], "result": {pair: rows, "last": last}}


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return status, {"Content-Type": JSON_TYPE, **(headers or {})}, body


def _html(status: int, headers: dict[str, str] | None = None) -> Response:
    title = f"{status} {REASONS.get(status, 'Error')}"
    body = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center></body></html>"
    return status, {"Content-Type": HTML_TYPE, **(headers or {})}, body.encode()


def _kraken_error(message: str) -> Response:
    return _json(200, {"error": [message]})


def respond_ohlc(
    candles: Sequence[Candle], pair: str, params: dict[str, str], now: float, failure: Failure | None
) -> Response:
    """Status, headers and body of one OHLC request (after any ``slow`` wait)."""
    kind = failure.kind if failure else None
    if kind in ERROR_ARRAYS:
        return _kraken_error(ERROR_ARRAYS[kind])
    if kind in HTTP_FAILURES:
        extra = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
        return _html(HTTP_FAILURES[kind], extra)
    requested = params.get("pair", "")
    if not requested:
        return _kraken_error("EGeneral:Invalid arguments")
    if requested.upper() != pair.upper():
        return _kraken_error("EQuery:Unknown asset pair")
    try:
        interval = int(params.get("interval", "1"))
        since = int(params["since"]) if params.get("since", "") != "" else None
    except ValueError:
        return _kraken_error("EGeneral:Invalid arguments")
    if interval not in KRAKEN_INTERVALS:
        return _kraken_error("EGeneral:Invalid arguments")
    payload = render_ohlc(candles, pair, interval, since, now)
    if kind == "bad_row":
        rows = payload["result"][pair]
        if rows:
            rows[BAD_ROW_INDEX][4] = BAD_PRICE
    status, headers, body = _json(200, payload)
    if kind == "malformed":
        body = body[: len(body) // 2]  # a cut-off object is never valid JSON
    return status, headers, body


def trade_ns(time: float) -> int:
    """A trade's time in nanoseconds, exact for the float's shortest decimal text."""
    return int(Decimal(repr(float(time))) * NS_PER_SEC)


def trade_row(trade: Trade, trade_id: int) -> list[Any]:
    """``[price, volume, time, buy/sell, market/limit, misc, trade_id]`` with Kraken's string fields."""
    side = "b" if trade_id % 2 else "s"
    kind = "m" if trade_id % 3 == 0 else "l"
    price = _decimal_text(trade.price, PRICE_DECIMALS)
    return [price, _decimal_text(trade.volume, VOLUME_DECIMALS), float(trade.time), side, kind, "", trade_id]


def render_trades(
    trades: Sequence[Trade], times_ns: Sequence[int], pair: str, since_ns: int | None, count: int, now: float
) -> dict[str, Any]:
    """The decoded ``/0/public/Trades`` answer at ``now``.

    ``trades`` are sorted by time and ``times_ns`` are their :func:`trade_ns`;
    a trade's id is its position in ``trades`` plus one.
    """
    done = bisect.bisect_right(times_ns, trade_ns(now))
    lo = max(0, done - count) if since_ns is None else bisect.bisect_right(times_ns, since_ns, 0, done)
    hi = min(done, lo + count)
    rows = [trade_row(trades[i], i + 1) for i in range(lo, hi)]
    empty_last = since_ns if since_ns is not None else trade_ns(now)
    last = times_ns[hi - 1] if hi > lo else empty_last
    return {"error": [], "result": {pair: rows, "last": str(last)}}


def _since_ns(text: str) -> int | None:
    """``since`` as nanoseconds; unix seconds (possibly fractional) below :data:`SINCE_SECONDS_BELOW`."""
    if text == "":
        return None
    value = Decimal(text)
    if not value.is_finite() or value < 0:
        raise ValueError(text)
    return int(value * NS_PER_SEC) if value < SINCE_SECONDS_BELOW else int(value)


def _failure_answer(failure: Failure | None) -> Response | None:
    """The answer of an injected error array or HTTP failure, else ``None``."""
    kind = failure.kind if failure else None
    if kind in ERROR_ARRAYS:
        return _kraken_error(ERROR_ARRAYS[kind])
    if kind in HTTP_FAILURES:
        extra = {"Retry-After": f"{failure.retry_after:g}"} if failure.retry_after is not None else {}
        return _html(HTTP_FAILURES[kind], extra)
    return None


def respond_trades(
    trades: Sequence[Trade],
    times_ns: Sequence[int],
    pair: str,
    params: dict[str, str],
    now: float,
    failure: Failure | None,
) -> Response:
    """Status, headers and body of one Trades request (after any ``slow`` wait)."""
    failed = _failure_answer(failure)
    if failed is not None:
        return failed
    requested = params.get("pair", "")
    if not requested:
        return _kraken_error("EGeneral:Invalid arguments")
    if requested.upper() != pair.upper():
        return _kraken_error("EQuery:Unknown asset pair")
    try:
        since = _since_ns(params.get("since", ""))
        count = int(params.get("count", str(TRADES_MAX_COUNT)))
    except (ArithmeticError, ValueError):
        return _kraken_error("EGeneral:Invalid arguments")
    if not 1 <= count <= TRADES_MAX_COUNT:
        return _kraken_error("EGeneral:Invalid arguments")
    payload = render_trades(trades, times_ns, pair, since, count, now)
    if failure is not None and failure.kind == "bad_row":
        rows = payload["result"][pair]
        if rows:
            rows[BAD_ROW_INDEX][0] = BAD_PRICE
    status, headers, body = _json(200, payload)
    if failure is not None and failure.kind == "malformed":
        body = body[: len(body) // 2]  # a cut-off object is never valid JSON
    return status, headers, body


def _amount(value: float) -> str:
    """Positional text that parses back to exactly ``value``."""
    return format(Decimal(repr(float(value))), "f")


def _asset_code(asset_id: str) -> str:
    return asset_id[1:] if len(asset_id) == 4 and asset_id[0] in "XZ" else asset_id


def asset_pair_entry(pair: AssetPair) -> dict[str, Any]:
    """The AssetPairs entry of ``pair`` with Kraken's fields and types."""
    r, fee = pair.rules, pair.rules.maker_fee_pct
    return {
        "altname": r.pair,
        "wsname": f"{_asset_code(pair.base_id)}/{_asset_code(pair.quote_id)}",
        "aclass_base": "currency",
        "base": pair.base_id,
        "aclass_quote": "currency",
        "quote": pair.quote_id,
        "lot": "unit",
        "cost_decimals": 5,
        "pair_decimals": r.price_decimals,
        "lot_decimals": r.lot_decimals,
        "lot_multiplier": 1,
        "leverage_buy": [],
        "leverage_sell": [],
        # Illustrative tiers: only the first maker tier (the rules' fee) matters to the bot.
        "fees": [[0, fee + 0.15], [10000, fee + 0.1], [50000, fee + 0.05]] if pair.fees_published else [],
        "fees_maker": [[0, fee], [10000, fee - 0.05], [50000, fee - 0.1]] if pair.fees_published else [],
        "fee_volume_currency": "ZUSD",
        "margin_call": 80,
        "margin_stop": 40,
        "ordermin": _amount(r.ordermin),
        "costmin": _amount(r.costmin),
        "tick_size": _amount(10.0**-r.price_decimals),
        "status": pair.status,
    }


def respond_asset_pairs(pairs: Sequence[AssetPair], params: dict[str, str], failure: Failure | None) -> Response:
    """Status, headers and body of one AssetPairs request."""
    failed = _failure_answer(failure)
    if failed is not None:
        return failed
    wanted = [p.strip().upper() for p in params.get("pair", "").split(",") if p.strip()]
    chosen = []
    for name in wanted:
        found = [p for p in pairs if name in (p.key.upper(), p.rules.pair.upper())]
        if not found:
            return _kraken_error("EQuery:Unknown asset pair")
        chosen.extend(found)
    result = {p.key: asset_pair_entry(p) for p in (chosen if wanted else pairs)}
    status, headers, body = _json(200, {"error": [], "result": result})
    if failure is not None and failure.kind == "malformed":
        body = body[: len(body) // 2]
    return status, headers, body


# The server -------------------------------------------------------------------


def _make_handler(fake: FakeKraken) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body leave at once: no 40 ms delayed-ACK stall per request

        def version_string(self) -> str:
            return "FakeKraken/1.0"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            params = dict(parse_qsl(parts.query, keep_blank_values=True))
            self._send_answer(fake.handle(parts.path, params, dict(self.headers.items())))

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_POST_BYTES:
                self._send_answer(_json(413, {"error": ["EGeneral:Invalid arguments"]}))
                return
            body = self.rfile.read(length)
            self._send_answer(fake.handle_post(urlsplit(self.path).path, body, dict(self.headers.items())))

        def _send_answer(self, answer: Response | None) -> None:
            if answer is None:  # stopped while waiting, or a dropped connection on purpose: close it unanswered
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
                self.wfile.write(body)
            except OSError:  # the client gave up (e.g. its timeout fired)
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("fake Kraken: " + format, *args)

    return Handler


class FakeKraken:
    """Kraken's public OHLC, Trades and AssetPairs endpoints over real HTTP, driven by a clock.

    Use as a context manager, or :meth:`start` / :meth:`stop`. Every request
    is recorded in :attr:`requests` as ``{"path", "params", "headers", "at"}``
    (``at``: the fake's ``now`` when it arrived).
    """

    def __init__(
        self,
        candles: list[Candle],
        *,
        now: Callable[[], float],
        pair: str = "XDGUSD",
        trades: Sequence[Trade] = (),
        asset_pairs: Sequence[AssetPair] | None = None,
    ) -> None:
        self.pair = pair
        self.url = ""
        self.requests: list[dict] = []
        self._now = now
        self._lock = threading.Lock()
        self._candles: list[Candle] = []
        self._trades: list[Trade] = []
        self._trade_ns: list[int] = []
        self._failures: deque[Failure] = deque()
        self._asset_pairs: list[AssetPair] = []
        self._stop = threading.Event()
        self._http = LoopbackServer(_make_handler(self), "fake-kraken")
        self.set_candles(candles)
        self.set_trades(trades)
        self.set_asset_pairs(asset_pairs if asset_pairs is not None else [AssetPair(replace(PairRules(), pair=pair))])

    # control --------------------------------------------------------------------

    def set_candles(self, candles: list[Candle]) -> None:
        """Replace the market data (1-minute candles, any order)."""
        ordered = sorted(candles, key=lambda c: c.time)
        with self._lock:
            self._candles = ordered

    def set_trades(self, trades: Sequence[Trade]) -> None:
        """Replace the public trades (any order; equal times keep their given order)."""
        ordered = sorted(trades, key=lambda t: t.time)
        times = [trade_ns(t.time) for t in ordered]
        with self._lock:
            self._trades, self._trade_ns = ordered, times

    def set_asset_pairs(self, pairs: Sequence[AssetPair]) -> None:
        """Replace the entries AssetPairs serves."""
        with self._lock:
            self._asset_pairs = list(pairs)

    def fail_next(self, n: int, kind: str, *, retry_after: float | None = None, delay: float = 0.0) -> None:
        """Make the next ``n`` OHLC, Trades or AssetPairs requests fail with ``kind`` (queued after earlier ones)."""
        if kind not in FAIL_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {sorted(FAIL_KINDS)}")
        if n < 0 or delay < 0 or (retry_after is not None and retry_after < 0):
            raise ValueError("n, delay and retry_after must not be negative")
        with self._lock:
            self._failures.extend([Failure(kind, retry_after, delay)] * n)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # lifecycle ------------------------------------------------------------------

    def start(self) -> str:
        self._stop.clear()
        self.url = self._http.start()
        return self.url

    def stop(self) -> None:
        self._stop.set()  # wakes every "slow" answer
        self._http.stop()

    def __enter__(self) -> FakeKraken:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # serving --------------------------------------------------------------------

    def handle_post(self, path: str, body: bytes, headers: dict[str, str]) -> Response | None:
        """Answer one POST (private endpoints live in a subclass); ``None`` drops the connection unanswered."""
        with self._lock:
            self.requests.append({"path": path, "params": {}, "headers": headers, "method": "POST"})
        return _json(404, {"error": ["EGeneral:Unknown method"]})

    def handle(self, path: str, params: dict[str, str], headers: dict[str, str]) -> Response | None:
        """Answer one GET (called from a handler thread); ``None`` when stopped meanwhile."""
        arrived = self._now()
        with self._lock:
            self.requests.append({"path": path, "params": params, "headers": headers, "at": arrived})
            if path not in PUBLIC_PATHS:
                return _json(404, {"error": ["EGeneral:Unknown method"]})
            failure = self._failures.popleft() if self._failures else None
        if failure is not None and failure.kind == "slow" and self._stop.wait(failure.delay):
            return None
        with self._lock:
            candles, trades, trade_times = self._candles, self._trades, self._trade_ns
            asset_pairs = list(self._asset_pairs)
        if path == ASSET_PAIRS_PATH:
            return respond_asset_pairs(asset_pairs, params, failure)
        if path == TRADES_PATH:
            return respond_trades(trades, trade_times, self.pair, params, self._now(), failure)
        return respond_ohlc(candles, self.pair, params, self._now(), failure)
