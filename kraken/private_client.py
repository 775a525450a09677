"""Kraken private REST client (live trading), with a pure signer and pure parsers.

What this relies on, and where it comes from:

- Authentication (docs.kraken.com, "Spot REST Authentication"): private
  calls are ``POST /0/private/<Method>`` with a form-encoded body that carries
  ``nonce``, an ``API-Key`` header (the public key) and ``API-Sign`` =
  base64(HMAC-SHA512(key=base64decode(secret), msg=uri_path + SHA256(nonce +
  postdata))), where ``uri_path`` starts at ``/0/private``. The page's worked
  example (an AddOrder of 1.25 XBTUSD at 37500, nonce 1616492376594) is
  reproduced byte for byte in the tests.
- The nonce is an "always increasing, unsigned 64-bit integer" per API key.
  :class:`NonceSource` uses wall-clock microseconds, never less than the last
  value it issued, persisted so a restart continues above it.
- Every answer is HTTP 200 ``{"error": [...], "result": ...}``; entries that
  start with ``W`` are warnings on a successful call, ``E`` entries are
  errors (docs "Spot Error Messages").
- AddOrder (krakenfx/api-specs ``schemas/requests/trading/orders/add.yaml``):
  ``ordertype=limit``, ``type=buy|sell``, ``price``/``volume`` as strings,
  ``oflags`` a comma list (``post`` = post-only; ``fciq`` = fee in the quote
  currency, the default only for buys, ``fcib`` being the default for sells),
  ``validate=true`` checks without placing. ``cl_ord_id`` (a UUID, 32 hex
  digits, or free ASCII text of at most 18 characters) and ``userref``
  (int32) are documented as *mutually exclusive*. The answer is
  ``{"descr": {...}, "txid": ["O..."]}``.
- CancelOrder takes ``txid`` (a txid or a userref) or ``cl_ord_id`` and answers
  ``{"count": n}``. OpenOrders and ClosedOrders filter by ``userref`` or
  ``cl_ord_id`` and answer ``{"open": {txid: order}}`` / ``{"closed": {...}}``;
  QueryOrders takes a comma list of txids (20 at a time here, the lower of the
  two documented limits). An order has ``status`` (pending, open, closed,
  canceled, expired), ``vol``, ``vol_exec``, ``cost``, ``fee``, ``price``
  (average execution price), ``opentm``/``closetm``, ``reason`` and
  ``descr.{pair,type,ordertype,price}``.
- Balance answers ``{asset: "amount"}`` with Kraken's asset ids (``XXDG``,
  ``ZUSD``); AssetPairs (public, parsed by :func:`kraken_client.parse_asset_pair`)
  gives each pair's ``base``/``quote`` ids and its order rules.

Failures map onto what the loop does (:mod:`errors`): ``EAPI:Invalid nonce``
is retried at once with a fresh nonce (bounded); rate limits and service
errors are retried after a bounded backoff through the injected ``sleep`` and
then raise :class:`errors.RetryLater`; order refusals (funds, post-only,
minimums, price precision) raise :class:`exchange.OrderRejected`; any other
error array raises :class:`errors.BadData`.

AddOrder is never re-sent after a timeout, a dropped connection or a garbled
answer: the order may have been placed. The client looks it up by its
``cl_ord_id`` (OpenOrders, then ClosedOrders) and returns its txid, or raises
:class:`errors.RetryLater` when no such order exists (yet). Keep the session's
HTTP adapter free of automatic retries for the same reason.

Neither the secret nor a signature is ever logged or put into an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests

from errors import BadData, ConfigError, RetryLater
from grid.exchange import OrderRejected, PairRules
from kraken.public_client import ASSET_PAIRS_PATH, PairInfo, parse_asset_pair, transport_problem
from redaction import scrub
from retry import backoff_delay, call_with_retries, parse_retry_after
from vocabulary import BUY, SELL

log = logging.getLogger(__name__)

USER_AGENT = "regime-grid-bot/0.1"
PRIVATE_PREFIX = "/0/private/"
FORM_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

NONCE_ERROR = "EAPI:Invalid nonce"
LOCKOUT_ERROR = "EGeneral:Temporary lockout"
UNKNOWN_ORDER_ERROR = "EOrder:Unknown order"
# Retried after a backoff, then RetryLater: the request was answered and not carried out.
BACKOFF_ERROR_PREFIXES = (
    "EAPI:Rate limit exceeded",
    "EOrder:Rate limit exceeded",
    "EGeneral:Too many requests",
    "EService:Unavailable",
    "EService:Busy",
    "EService:Market in cancel_only mode",
    "EService:Market in post_only mode",
    "EService:Deadline elapsed",
)
# Refusals of one order that retrying will not fix, with the OrderRejected reason they carry.
ORDER_REJECTIONS = (
    ("EOrder:Insufficient funds", "funds"),
    ("EOrder:Post only order", "post_only"),
    ("EOrder:Order minimum not met", "minimum"),
    ("EOrder:Cost minimum not met", "minimum"),
    ("EOrder:Invalid price", "precision"),
    ("EOrder:Tick size check failed", "precision"),
    ("EOrder:Orders limit exceeded", "other"),
)
RETRYABLE_HTTP = {429, 500, 502, 503, 504, 520, 522, 524}
MAX_BACKOFF_SEC = 8.0
MAX_RETRY_AFTER_SEC = 30.0
QUERY_BATCH = 20
_CL_ORD_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # long UUID
    r"|[0-9a-fA-F]{32}"  # short UUID
    r"|[\x21-\x7e]{1,18}"  # free text
)


class InvalidNonce(RetryLater):
    """``EAPI:Invalid nonce``: the request was refused before it was carried out."""


class TemporaryLockout(RetryLater):
    """``EGeneral:Temporary lockout``: not retried at once, since every attempt restarts the lockout."""


class NoAnswer(RetryLater):
    """The request may or may not have been carried out (timeout, dropped connection, bad gateway)."""


# Signing and nonces -------------------------------------------------------------------


def sign(urlpath: str, postdata: str, nonce: str | int, secret_b64: str) -> str:
    """Kraken's ``API-Sign`` for one request (pure).

    ``postdata`` is the exact form-encoded body that is sent (it contains the
    nonce too); ``urlpath`` starts with ``/0/private``.
    """
    digest = hashlib.sha256((str(nonce) + postdata).encode()).digest()
    secret = base64.b64decode(secret_b64, validate=True)
    return base64.b64encode(hmac.new(secret, urlpath.encode() + digest, hashlib.sha512).digest()).decode()


class NonceSource:
    """Strictly increasing nonces for one API key, across threads and restarts.

    A nonce is the wall time in microseconds, or one more than the last nonce
    issued when the clock has not moved on (or went backwards). With ``path``
    the last nonce is written there (temp file + ``os.replace``, so a crash
    never leaves a torn file) before it is handed out, and read back at start.
    No fsync: a killed process loses nothing the page cache holds, and after a
    power loss the microsecond clock has moved far past the lost value.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, time_fn: Callable[[], float] = time.time) -> None:
        self.path = Path(path) if path is not None else None
        self._time = time_fn
        self._lock = threading.Lock()
        self._last = self._read() if self.path is not None else 0

    @property
    def last(self) -> int:
        with self._lock:
            return self._last

    def next(self) -> int:
        """The next nonce; raises :class:`errors.RetryLater` when it cannot be persisted."""
        with self._lock:
            nonce = max(math.floor(self._time() * 1_000_000), self._last + 1)
            if self.path is not None:
                try:
                    self._write(nonce)
                except OSError as exc:
                    raise RetryLater(f"cannot persist the Kraken nonce to {self.path}: {exc}") from None
            self._last = nonce
            return nonce

    def _read(self) -> int:
        assert self.path is not None
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise ConfigError(f"cannot read the Kraken nonce file {self.path}: {exc}") from None
        if not text.isdigit():
            raise ConfigError(f"the Kraken nonce file {self.path} does not hold a nonce; remove it to start afresh")
        return int(text)

    def _write(self, nonce: int) -> None:
        assert self.path is not None
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{nonce}\n")
        os.replace(tmp, self.path)


# Pure parsing ---------------------------------------------------------------------------


def valid_cl_ord_id(value: str) -> bool:
    """Whether Kraken accepts ``value`` as a ``cl_ord_id`` (UUID, 32 hex digits, or <= 18 ASCII characters)."""
    return isinstance(value, str) and _CL_ORD_ID.fullmatch(value) is not None


def classify_private_errors(errors: Sequence[Any]) -> Exception:
    """The exception for a non-empty array of Kraken ``E...`` errors."""
    texts = [str(e) for e in errors]
    message = "Kraken: " + "; ".join(texts)
    for text in texts:
        for prefix, reason in ORDER_REJECTIONS:
            if text.startswith(prefix):
                return OrderRejected(reason, message)
    if any(t.startswith(NONCE_ERROR) for t in texts):
        return InvalidNonce(message)
    if any(t.startswith(LOCKOUT_ERROR) for t in texts):
        return TemporaryLockout(message)
    if any(t.startswith(BACKOFF_ERROR_PREFIXES) for t in texts):
        return RetryLater(message)
    return BadData(message)


def result_of(payload: Any, what: str, secrets: Iterable[str] = ()) -> Any:
    """``result`` of a decoded answer; raises the classified error for an ``E`` error array.

    ``secrets`` (the API key and secret) are masked in the error texts, should Kraken echo one.
    """
    if not isinstance(payload, dict):
        raise BadData(f"Kraken {what}: the answer is not a JSON object")
    errors = payload.get("error") or []
    if not isinstance(errors, list):
        raise BadData(f"Kraken {what}: 'error' is not a list")
    errors = [scrub(str(e), secrets) for e in errors]
    warnings = [e for e in errors if str(e).startswith("W")]
    if warnings:
        log.warning("Kraken %s: %s", what, "; ".join(map(str, warnings)))
    failures = [e for e in errors if not str(e).startswith("W")]
    if failures:
        raise classify_private_errors(failures)
    if "result" not in payload:
        raise BadData(f"Kraken {what}: no 'result'")
    return payload["result"]


def _orders_map(result: Any, key: str | None, what: str) -> dict[str, dict[str, Any]]:
    orders = result.get(key) if key is not None and isinstance(result, dict) else result
    if orders is None and key is not None:
        orders = {}
    if not isinstance(orders, dict) or not all(isinstance(v, dict) for v in orders.values()):
        raise BadData(f"Kraken {what}: malformed order list")
    return orders


def matching_cl_ord_id(orders: dict[str, dict[str, Any]], cl_ord_id: str) -> tuple[str, dict[str, Any]] | None:
    """The (txid, order) among ``orders`` whose ``cl_ord_id`` is ``cl_ord_id``."""
    for txid, info in orders.items():
        if info.get("cl_ord_id") == cl_ord_id:
            return txid, info
    return None


# The client -------------------------------------------------------------------------------


class KrakenPrivateClient:
    """Kraken's private REST endpoints (and public AssetPairs) for one API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        nonce: NonceSource,
        sleep: Callable[[float], None],
        timeout: float = 10.0,
        max_retries: int = 3,
        max_nonce_retries: int = 2,
        session: requests.Session | None = None,
    ) -> None:
        if not api_key or not api_secret:
            raise ConfigError("Kraken live trading needs both an API key and an API secret")
        try:
            base64.b64decode(api_secret, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                "the Kraken API secret is not valid base64 (copy it exactly as Kraken shows it)"
            ) from None
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._secret = api_secret
        self._nonce = nonce
        self._sleep = sleep
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_nonce_retries = max_nonce_retries
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT

    def __repr__(self) -> str:
        return f"KrakenPrivateClient({self.base_url!r}, key=...{self._api_key[-4:]})"

    # orders -----------------------------------------------------------------------

    def add_order(
        self,
        pair: str,
        side: str,
        price: str,
        volume: str,
        cl_ord_id: str | None = None,
        userref: int | None = None,
        post_only: bool = True,
    ) -> str:
        """Place a limit order with the fee in the quote currency; returns its txid.

        After a timeout, a dropped connection or an unreadable answer the order
        is looked up by ``cl_ord_id`` instead of being sent again; raises
        :class:`errors.RetryLater` when it is not found (or has no cl_ord_id).
        """
        params = self._order_params(pair, side, price, volume, cl_ord_id, userref, post_only)
        try:
            result = self._private("AddOrder", params, idempotent=False)
            txids = result.get("txid") if isinstance(result, dict) else None
            if not (isinstance(txids, list) and len(txids) == 1 and isinstance(txids[0], str) and txids[0]):
                raise NoAnswer(f"Kraken AddOrder: no txid in the answer: {result!r}")
            return txids[0]
        except NoAnswer as exc:
            if cl_ord_id is None:
                raise RetryLater(f"{exc}; the order may exist and has no cl_ord_id to look it up by") from None
            log.warning("%s; looking the order up by cl_ord_id %s instead of sending it again", exc, cl_ord_id)
            try:
                found = self.find_order(cl_ord_id)
            except RetryLater as lookup:
                raise RetryLater(f"{exc}; whether order {cl_ord_id} exists is unknown: {lookup}") from None
            if found is None:
                raise RetryLater(f"{exc}; no order {cl_ord_id} exists (yet)") from None
            log.info("order %s was placed after all: %s", cl_ord_id, found[0])
            return found[0]

    def cancel_order(self, txid: str | None = None, *, cl_ord_id: str | None = None) -> dict[str, Any]:
        """Cancel one open order by txid or by cl_ord_id; returns ``{"count": n, ...}``.

        An order that is no longer open answers ``EOrder:Unknown order`` (a :class:`errors.BadData`).
        """
        if (txid is None) == (cl_ord_id is None):
            raise ValueError("give exactly one of txid and cl_ord_id")
        params = [("txid", txid)] if txid is not None else [("cl_ord_id", str(cl_ord_id))]
        result = self._private("CancelOrder", params)
        if not isinstance(result, dict):
            raise BadData(f"Kraken CancelOrder: unexpected answer {result!r}")
        return result

    def open_orders(self, userref: int | None = None, *, cl_ord_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Open orders by txid, optionally only those with ``userref`` or ``cl_ord_id``."""
        params = _filters(userref, cl_ord_id)
        return _orders_map(self._private("OpenOrders", params), "open", "OpenOrders")

    def closed_orders(self, userref: int | None = None, *, cl_ord_id: str | None = None) -> dict[str, dict[str, Any]]:
        """The most recent closed (filled, cancelled, expired) orders by txid, optionally filtered."""
        params = _filters(userref, cl_ord_id)
        return _orders_map(self._private("ClosedOrders", params), "closed", "ClosedOrders")

    def query_orders(self, txids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Orders by txid, open or closed (asked for 20 at a time)."""
        ids = list(dict.fromkeys(txids))
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), QUERY_BATCH):
            batch = ids[i : i + QUERY_BATCH]
            found.update(_orders_map(self._private("QueryOrders", [("txid", ",".join(batch))]), None, "QueryOrders"))
        return found

    def find_order(self, cl_ord_id: str) -> tuple[str, dict[str, Any]] | None:
        """``(txid, order)`` of the order with ``cl_ord_id``, open or recently closed, else ``None``."""
        found = matching_cl_ord_id(self.open_orders(cl_ord_id=cl_ord_id), cl_ord_id)
        return found or matching_cl_ord_id(self.closed_orders(cl_ord_id=cl_ord_id), cl_ord_id)

    def balance(self) -> dict[str, float]:
        """Total balances by Kraken asset id (``XXDG``, ``ZUSD``), including amounts held by open orders."""
        result = self._private("Balance", [])
        if not isinstance(result, dict):
            raise BadData("Kraken Balance: 'result' is not an object")
        try:
            return {str(k): float(v) for k, v in result.items()}
        except (TypeError, ValueError):
            raise BadData("Kraken Balance: a balance is not a number") from None

    # public ---------------------------------------------------------------------------

    def asset_pair(self, pair: str) -> PairRules:
        """The order rules of ``pair`` from ``/0/public/AssetPairs``; the fee is the first maker tier."""
        return self.asset_pair_info(pair).rules

    def asset_pair_info(self, pair: str, *, default_maker_fee_pct: float | None = None) -> PairInfo:
        """See :func:`kraken_client.parse_asset_pair` (:class:`kraken_client.UnknownPair` for an unlisted pair)."""
        payload = self._public(ASSET_PAIRS_PATH, {"pair": pair})
        return parse_asset_pair(payload, pair, default_maker_fee_pct=default_maker_fee_pct)

    # transport -----------------------------------------------------------------------

    @staticmethod
    def _order_params(
        pair: str, side: str, price: str, volume: str, cl_ord_id: str | None, userref: int | None, post_only: bool
    ) -> list[tuple[str, str]]:
        if side not in (BUY, SELL):
            raise ValueError(f"side must be buy or sell, got {side!r}")
        if cl_ord_id is not None and userref is not None:
            raise ValueError("Kraken documents cl_ord_id and userref as mutually exclusive; give one")
        if cl_ord_id is not None and not valid_cl_ord_id(cl_ord_id):
            raise ValueError(f"{cl_ord_id!r} is not a Kraken cl_ord_id (UUID, 32 hex digits or <= 18 ASCII characters)")
        flags = ["post", "fciq"] if post_only else ["fciq"]
        params = [("ordertype", "limit"), ("type", side), ("pair", pair), ("price", price), ("volume", volume)]
        params.append(("oflags", ",".join(flags)))
        if cl_ord_id is not None:
            params.append(("cl_ord_id", cl_ord_id))
        if userref is not None:
            params.append(("userref", str(int(userref))))
        return params

    def _private(self, method: str, params: Sequence[tuple[str, str]], *, idempotent: bool = True) -> Any:
        """POST one private call; ``idempotent=False`` raises :class:`NoAnswer` instead of re-sending."""
        path = PRIVATE_PREFIX + method
        attempt = nonce_retries = 0
        while True:
            nonce = self._nonce.next()
            postdata = urlencode([("nonce", str(nonce)), *params])
            headers = {"API-Key": self._api_key, "API-Sign": sign(path, postdata, nonce, self._secret)}
            headers["Content-Type"] = FORM_TYPE
            log.debug("Kraken %s %s", method, list(params))
            try:
                payload = self._send(
                    "POST", path, method, data=postdata.encode(), headers=headers, unsure=not idempotent
                )
                return result_of(payload, method, (self._api_key, self._secret))
            except InvalidNonce as exc:
                if nonce_retries >= self.max_nonce_retries:
                    raise
                nonce_retries += 1
                log.warning("%s; retrying with a fresh nonce (%d/%d)", exc, nonce_retries, self.max_nonce_retries)
            except TemporaryLockout:
                raise
            except NoAnswer as exc:
                if not idempotent:
                    raise
                attempt = self._back_off(exc, attempt)
            except RetryLater as exc:
                attempt = self._back_off(exc, attempt)

    def _public(self, path: str, params: dict[str, str]) -> Any:
        return call_with_retries(
            lambda: self._send("GET", path, path, params=params),
            max_retries=self.max_retries,
            sleep=self._sleep,
            on_retry=self._log_retry,
            cap=MAX_BACKOFF_SEC,
            retry_after_cap=MAX_RETRY_AFTER_SEC,
        )

    def _back_off(self, exc: RetryLater, attempt: int) -> int:
        """Sleep before retry ``attempt + 1``, or re-raise ``exc`` when the retries are used up.

        :meth:`_private` keeps its own loop (fresh nonces, never re-sending an order that may
        have arrived); the delay is :func:`retry.backoff_delay`'s, as in :meth:`_public`.
        """
        if attempt >= self.max_retries:
            raise exc
        delay = backoff_delay(
            attempt, cap=MAX_BACKOFF_SEC, retry_after=exc.retry_after_sec, retry_after_cap=MAX_RETRY_AFTER_SEC
        )
        self._log_retry(exc, attempt + 1, delay)
        self._sleep(delay)
        return attempt + 1

    def _log_retry(self, exc: Exception, retry: int, delay: float) -> None:
        log.warning("%s; retry %d/%d in %.1fs", exc, retry, self.max_retries, delay)

    def _send(self, http_method: str, path: str, what: str, *, unsure: bool = False, **kwargs: Any) -> Any:
        """One HTTP exchange, decoded.

        Raises :class:`NoAnswer` when Kraken may not have answered (transport
        errors, gateway statuses, garbled JSON) and, with ``unsure``, for any
        other HTTP status too: a 4xx/5xx from a proxy says nothing about
        whether an order reached the matching engine.
        """
        try:
            resp = self._session.request(http_method, self.base_url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            problem = transport_problem(exc, self.base_url, self.timeout)
            raise NoAnswer(f"Kraken {what}: {problem}") from None
        if resp.status_code != 200:
            if resp.status_code in RETRYABLE_HTTP or unsure:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise NoAnswer(f"Kraken {what}: HTTP {resp.status_code}", retry_after_sec=retry_after)
            raise BadData(f"Kraken {what}: HTTP {resp.status_code}")
        try:
            return json.loads(resp.content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise NoAnswer(f"Kraken {what}: the answer is not valid JSON") from None


def _filters(userref: int | None, cl_ord_id: str | None) -> list[tuple[str, str]]:
    params = []
    if userref is not None:
        params.append(("userref", str(int(userref))))
    if cl_ord_id is not None:
        params.append(("cl_ord_id", cl_ord_id))
    return params
