"""Kraken public REST client (OHLC, Trades, AssetPairs), with pure parsers.

Kraken answers HTTP 200 with ``{"error": [...], "result": {...}}``; a
non-empty ``error`` array is a failure. Rate limits and service errors are
retried with exponential backoff through an injected ``sleep`` (the clock's),
so tests never wait on the wall clock. Everything else is a :class:`BadData`
that the caller skips; a pair Kraken does not list (``EQuery:Unknown asset
pair``, or an AssetPairs answer without it) is an :class:`UnknownPair`.

AssetPairs (docs.kraken.com, "Get Tradable Asset Pairs") gives each pair's
``base``/``quote`` asset ids, ``pair_decimals`` (price), ``lot_decimals``
(volume), ``ordermin`` (base asset), ``costmin`` (quote asset), ``status`` and
the maker fee schedule ``fees_maker`` as ``[[volume, percent], ...]``. The
live client (:mod:`kraken_private`) parses it with :func:`parse_asset_pair` too.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import requests

from candles import Candle, OhlcPage, candle_problem
from errors import BadData, RetryLater
from grid.exchange import PairRules
from retry import call_with_retries, parse_retry_after

log = logging.getLogger(__name__)

USER_AGENT = "regime-grid-bot/0.1"
RETRYABLE_ERROR_PREFIXES = (
    "EAPI:Rate limit exceeded",
    "EGeneral:Too many requests",
    "EGeneral:Temporary lockout",
    "EService:Unavailable",
    "EService:Busy",
    "EService:Market in cancel_only mode",
)
RETRYABLE_HTTP = {429, 500, 502, 503, 504, 520, 522, 524}
MAX_BACKOFF_SEC = 8.0
MAX_RETRY_AFTER_SEC = 30.0
ASSET_PAIRS_PATH = "/0/public/AssetPairs"
UNKNOWN_PAIR_ERROR = "EQuery:Unknown asset pair"

T = TypeVar("T")


class UnknownPair(BadData):
    """Kraken does not list the pair that was asked for."""


def classify_errors(errors: list[Any]) -> Exception:
    """The exception for a non-empty Kraken ``error`` array."""
    text = "; ".join(str(e) for e in errors)
    if any(str(e).startswith(RETRYABLE_ERROR_PREFIXES) for e in errors):
        return RetryLater(f"Kraken: {text}")
    return BadData(f"Kraken: {text}")


def parse_ohlc(payload: Any, interval_min: int, now: float) -> OhlcPage:
    """Parse a decoded ``/0/public/OHLC`` answer.

    The last row is the candle still forming and is returned as ``forming``;
    rows whose interval has not ended by ``now`` are never reported as closed.
    Raises :class:`RetryLater` or :class:`BadData` for error arrays and
    malformed answers.
    """
    if not isinstance(payload, dict):
        raise BadData("Kraken OHLC: the answer is not a JSON object")
    errors = payload.get("error") or []
    if not isinstance(errors, list):
        raise BadData("Kraken OHLC: 'error' is not a list")
    if errors:
        raise classify_errors(errors)
    result = payload.get("result")
    if not isinstance(result, dict):
        raise BadData("Kraken OHLC: no 'result' object")
    series = [v for k, v in result.items() if k != "last"]
    if len(series) != 1 or not isinstance(series[0], list):
        raise BadData("Kraken OHLC: expected exactly one pair in 'result'")
    try:
        last = _as_int(result["last"]) if result.get("last") is not None else None
    except (TypeError, ValueError):
        raise BadData(f"Kraken OHLC: 'last' is not an integer: {result.get('last')!r}") from None

    candles = [_parse_row(row, i) for i, row in enumerate(series[0])]
    for i in range(1, len(candles)):
        # Everything downstream relies on oldest-first, unique times (e.g. the newest stored time).
        if candles[i].time <= candles[i - 1].time:
            raise BadData(f"Kraken OHLC: row {i} ({candles[i].time}) is not newer than row {i - 1}")
    forming = candles.pop() if candles else None
    width = interval_min * 60
    closed = [c for c in candles if c.time + width <= now]
    return OhlcPage(closed, forming, last)


def _parse_row(row: Any, index: int) -> Candle:
    # [time, open, high, low, close, vwap, volume, count]; prices and volume are strings.
    if not isinstance(row, list) or len(row) < 8:
        raise BadData(f"Kraken OHLC: row {index} is not an 8-field list: {row!r}")
    try:
        time = _as_int(row[0])
    except (TypeError, ValueError):
        raise BadData(f"Kraken OHLC: row {index} has a non-integer time: {row!r}") from None
    try:
        candle = Candle(
            time=time,
            open=float(row[1]),
            high=float(row[2]),
            low=float(row[3]),
            close=float(row[4]),
            volume=float(row[6]),
            trade_count=_as_int(row[7]),
        )
    except (TypeError, ValueError):
        raise BadData(f"Kraken OHLC: row {index} has a non-numeric field: {row!r}") from None
    problem = candle_problem(candle)
    if problem:
        raise BadData(f"Kraken OHLC: row {index} ({candle.time}): {problem}")
    return candle


def _as_int(value: Any) -> int:
    """An integer field; a fractional number or a bool is an error, never silently truncated."""
    if isinstance(value, bool):
        raise TypeError(f"not an integer: {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    return int(value)


class Trade(NamedTuple):
    """One public trade: unix seconds (sub-second), price, and volume in the base asset."""

    time: float
    price: float
    volume: float


class TradesPage(NamedTuple):
    """One ``/0/public/Trades`` answer: trades oldest first and ``last``, the
    nanosecond cursor to pass as the next ``since``."""

    trades: list[Trade]
    last: int


def parse_trades(payload: Any) -> TradesPage:
    """Parse a decoded ``/0/public/Trades`` answer.

    Rows are ``[price, volume, time, buy/sell, market/limit, misc, trade_id]``
    with string price and volume and float seconds; ``last`` is a nanosecond
    timestamp (a string). Raises :class:`RetryLater` or :class:`BadData` like
    :func:`parse_ohlc`.
    """
    if not isinstance(payload, dict):
        raise BadData("Kraken Trades: the answer is not a JSON object")
    errors = payload.get("error") or []
    if not isinstance(errors, list):
        raise BadData("Kraken Trades: 'error' is not a list")
    if errors:
        raise classify_errors(errors)
    result = payload.get("result")
    if not isinstance(result, dict):
        raise BadData("Kraken Trades: no 'result' object")
    series = [v for k, v in result.items() if k != "last"]
    if len(series) != 1 or not isinstance(series[0], list):
        raise BadData("Kraken Trades: expected exactly one pair in 'result'")
    try:
        last = _as_int(result["last"])
    except (KeyError, TypeError, ValueError):
        raise BadData(f"Kraken Trades: 'last' is not an integer: {result.get('last')!r}") from None
    trades = [_parse_trade(row, i) for i, row in enumerate(series[0])]
    for i in range(1, len(trades)):
        if trades[i].time < trades[i - 1].time:
            raise BadData(f"Kraken Trades: row {i} ({trades[i].time}) is older than row {i - 1}")
    return TradesPage(trades, last)


def _parse_trade(row: Any, index: int) -> Trade:
    if not isinstance(row, list) or len(row) < 3:
        raise BadData(f"Kraken Trades: row {index} is not a [price, volume, time, ...] list: {row!r}")
    if any(isinstance(v, bool) for v in row[:3]):
        raise BadData(f"Kraken Trades: row {index} has a non-numeric field: {row!r}")
    try:
        trade = Trade(time=float(row[2]), price=float(row[0]), volume=float(row[1]))
    except (TypeError, ValueError):
        raise BadData(f"Kraken Trades: row {index} has a non-numeric field: {row!r}") from None
    if not (math.isfinite(trade.price) and trade.price > 0):
        raise BadData(f"Kraken Trades: row {index}: price must be finite and positive: {row!r}")
    if not (math.isfinite(trade.volume) and trade.volume >= 0):
        raise BadData(f"Kraken Trades: row {index}: volume must be finite and non-negative: {row!r}")
    if not (math.isfinite(trade.time) and trade.time > 0):
        raise BadData(f"Kraken Trades: row {index}: time must be a positive unix timestamp: {row!r}")
    return trade


@dataclass(frozen=True)
class PairInfo:
    """One pair from AssetPairs: the trading rules plus Kraken's names for it and its assets."""

    rules: PairRules
    name: str  # the key of the AssetPairs entry, e.g. XDGUSD or XXBTZUSD
    altname: str
    base_id: str  # Balance key of the base asset, e.g. XXDG
    quote_id: str  # Balance key of the quote asset, e.g. ZUSD
    status: str = "online"  # Kraken's: online, cancel_only, post_only, limit_only, reduce_only, ...
    fee_published: bool = True  # False: the entry had no fee schedule and the fee is the caller's default


_DISPLAY_NAMES = {"XDG": "DOGE", "XBT": "BTC"}


def display_asset(asset_id: str) -> str:
    """``XXDG`` -> ``DOGE``, ``ZUSD`` -> ``USD``: Kraken's legacy X/Z-prefixed ids in everyday names."""
    name = asset_id[1:] if len(asset_id) == 4 and asset_id[0] in "XZ" else asset_id
    return _DISPLAY_NAMES.get(name, name)


def parse_asset_pair(payload: Any, pair: str, *, default_maker_fee_pct: float | None = None) -> PairInfo:
    """:class:`PairInfo` for ``pair`` (entry name or altname) from a decoded AssetPairs answer.

    The fee is the first maker tier (a fresh account's rate). An entry without
    a fee schedule takes ``default_maker_fee_pct`` when given (and says so in
    ``fee_published``), else it is malformed. Raises :class:`UnknownPair` when
    Kraken does not list ``pair``, :class:`RetryLater` or :class:`BadData` for
    other error arrays and malformed answers.
    """
    if not isinstance(payload, dict):
        raise BadData("Kraken AssetPairs: the answer is not a JSON object")
    errors = payload.get("error") or []
    if not isinstance(errors, list):
        raise BadData("Kraken AssetPairs: 'error' is not a list")
    warnings = [e for e in errors if str(e).startswith("W")]
    if warnings:
        log.warning("Kraken AssetPairs: %s", "; ".join(map(str, warnings)))
    failures = [e for e in errors if not str(e).startswith("W")]
    if any(str(e).startswith(UNKNOWN_PAIR_ERROR) for e in failures):
        raise UnknownPair(f"Kraken AssetPairs: {'; '.join(map(str, failures))} ({pair})")
    if failures:
        raise classify_errors(failures)
    result = payload.get("result")
    if not isinstance(result, dict):
        raise BadData("Kraken AssetPairs: no 'result' object")
    matches = [
        (k, v)
        for k, v in result.items()
        if isinstance(v, dict) and pair.upper() in (k.upper(), str(v.get("altname", "")).upper())
    ]
    if not matches and len(result) == 1:  # asked by an alias (BTCUSD): Kraken answers with its own entry
        matches = list(result.items())
    if not matches:
        raise UnknownPair(f"Kraken AssetPairs: the answer has no entry for {pair}")
    if len(matches) != 1 or not isinstance(matches[0][1], dict):
        raise BadData(f"Kraken AssetPairs: no single entry for {pair}")
    name, entry = matches[0]
    fee_published = True
    try:
        schedule = entry.get("fees_maker") or entry.get("fees")
        if schedule:
            fee = float(schedule[0][1])  # the first tier: a fresh account's rate
        elif default_maker_fee_pct is not None:
            fee, fee_published = default_maker_fee_pct, False
        else:
            raise KeyError("fees_maker")
        base_id, quote_id = str(entry["base"]), str(entry["quote"])
        rules = PairRules(
            pair=name,
            base_asset=display_asset(base_id),
            quote_asset=display_asset(quote_id),
            price_decimals=_as_int(entry["pair_decimals"]),
            lot_decimals=_as_int(entry["lot_decimals"]),
            ordermin=float(entry["ordermin"]),
            costmin=float(entry.get("costmin") or 0.0),
            maker_fee_pct=fee,
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise BadData(f"Kraken AssetPairs: malformed entry for {name}: {exc!r}") from None
    if rules.price_decimals < 0 or rules.lot_decimals < 0 or rules.ordermin < 0 or rules.maker_fee_pct < 0:
        raise BadData(f"Kraken AssetPairs: implausible rules for {name}: {rules}")
    status = str(entry.get("status") or "online")
    return PairInfo(rules, name, str(entry.get("altname") or name), base_id, quote_id, status, fee_published)


class KrakenPublicClient:
    """Kraken public market data for one pair (the :class:`candles.MarketData` of paper/live)."""

    def __init__(
        self,
        base_url: str,
        pair: str,
        *,
        now: Callable[[], float],
        sleep: Callable[[float], None],
        timeout: float = 10.0,
        max_retries: int = 3,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.pair = pair
        self._now = now
        self._sleep = sleep
        self.timeout = timeout
        self.max_retries = max_retries
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT

    def fetch_ohlc(self, interval_min: int, since: int | None = None) -> OhlcPage:
        params: dict[str, Any] = {"pair": self.pair, "interval": interval_min}
        if since is not None:
            params["since"] = since
        return self._with_retries(lambda: parse_ohlc(self._get("/0/public/OHLC", params), interval_min, self._now()))

    def fetch_trades(self, since: int | None = None, count: int | None = None) -> TradesPage:
        """Public trades after ``since`` (a nanosecond cursor, exclusive), at most ``count`` (Kraken: 1000)."""
        params: dict[str, Any] = {"pair": self.pair}
        if since is not None:
            params["since"] = since
        if count is not None:
            params["count"] = count
        return self._with_retries(lambda: parse_trades(self._get("/0/public/Trades", params)))

    def fetch_asset_pair(self, *, default_maker_fee_pct: float | None = None) -> PairInfo:
        """The pair's order rules and names from ``/0/public/AssetPairs`` (see :func:`parse_asset_pair`)."""
        return self._with_retries(
            lambda: parse_asset_pair(
                self._get(ASSET_PAIRS_PATH, {"pair": self.pair}),
                self.pair,
                default_maker_fee_pct=default_maker_fee_pct,
            )
        )

    def _with_retries(self, call: Callable[[], T]) -> T:
        return call_with_retries(
            call,
            max_retries=self.max_retries,
            sleep=self._sleep,
            on_retry=self._log_retry,
            cap=MAX_BACKOFF_SEC,
            retry_after_cap=MAX_RETRY_AFTER_SEC,
        )

    def _log_retry(self, exc: Exception, retry: int, delay: float) -> None:
        log.warning("%s; retry %d/%d in %.1fs", exc, retry, self.max_retries, delay)

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        url = self.base_url + path
        try:
            resp = self._session.get(url, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise RetryLater(f"Kraken {path}: {transport_problem(exc, url, self.timeout)}") from None
        if resp.status_code in RETRYABLE_HTTP:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise RetryLater(f"Kraken {path}: HTTP {resp.status_code}", retry_after_sec=retry_after)
        if resp.status_code != 200:
            raise BadData(f"Kraken {path}: HTTP {resp.status_code}")
        try:
            return json.loads(resp.content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadData(f"Kraken {path}: the answer is not valid JSON") from None


def transport_problem(exc: BaseException, url: str, timeout: float) -> str:
    """A failed HTTP exchange in plain words: what went wrong and where, not the library's repr.

    ``requests`` wraps the cause two or three levels deep (a ``ConnectionError``
    around urllib3's ``MaxRetryError`` around a ``NameResolutionError``
    around ``socket.gaierror``); the innermost known cause names the problem.
    """
    host = urlsplit(url).hostname or url
    causes = list(_causes(exc))
    if any(isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError" for c in causes):
        return f"cannot resolve {host}: no network, or no DNS?"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"{host} refused the connection"
    if any(isinstance(c, requests.Timeout | TimeoutError | socket.timeout) for c in causes):
        return f"{host} did not answer within {timeout:g} s"
    if any(isinstance(c, ssl.SSLError | requests.exceptions.SSLError) for c in causes):
        return f"the TLS handshake with {host} failed (check the system clock and CA certificates)"
    if any(isinstance(c, ConnectionResetError | requests.exceptions.ChunkedEncodingError) for c in causes):
        return f"{host} dropped the connection"
    if any(isinstance(c, OSError) and c.strerror for c in causes):
        err = next(c for c in causes if isinstance(c, OSError) and c.strerror)
        return f"cannot reach {host}: {err.strerror}"
    return f"cannot reach {host} ({type(exc).__name__})"


def _causes(exc: BaseException | None, depth: int = 0):
    """``exc`` and everything it wraps: causes, contexts, urllib3's ``reason`` and exception arguments."""
    if exc is None or depth > 8:
        return
    yield exc
    nested = [exc.__cause__, exc.__context__, getattr(exc, "reason", None)]
    nested += [a for a in exc.args if isinstance(a, BaseException)]
    for inner in nested:
        if isinstance(inner, BaseException) and inner is not exc:
            yield from _causes(inner, depth + 1)
