"""A local fake of Kraken's private REST API (and public AssetPairs) for tests.

:class:`FakeKrakenPrivate` extends :class:`fake_kraken.FakeKraken`, so one real
HTTP server on 127.0.0.1 (port 0) serves the public endpoints of the base
(AssetPairs with the ``rules`` given) and ``POST /0/private/<Method>`` for
AddOrder, CancelOrder, OpenOrders, ClosedOrders, QueryOrders and Balance.

Authentication is checked as Kraken documents it, with the signature formula
written out here again (not imported from :mod:`kraken_private`, so a bug in the
client's ``sign`` fails the tests): an unknown ``API-Key`` answers
``EAPI:Invalid key``, a wrong ``API-Sign`` ``EAPI:Invalid signature``, a nonce
not above the last one accepted for the key ``EAPI:Invalid nonce``.

Balances, reservations, minimums, precision and the post-only rule are those of
:class:`paper_exchange.PaperBook`, so live and paper runs see the same fills.
Its refusals become Kraken's error strings (``EOrder:Insufficient funds``,
``EOrder:Order minimum not met``, ``EOrder:Cost minimum not met``,
``EOrder:Invalid price:...``); a post-only order that would take liquidity is
accepted and cancelled at once with reason ``Post only order``, as Kraken says
post-only orders are "posted or cancelled".

Fills come from candles the test shows it: :meth:`FakeKrakenPrivate.on_candle`
matches the book against one candle exactly as ``PaperExchange.poll_fills``
does (orders rest from the fake's ``now`` at placement). The fill closes the
order (``status`` closed, ``vol_exec``, ``cost``, ``fee``, average ``price``,
``closetm`` = the fill's time). :meth:`FakeKrakenPrivate.partial_fill` executes
part of an order by hand, to test cancels after a partial execution.

Failures are injected with :meth:`FakeKrakenPrivate.fail_private` (see
:data:`PRIVATE_FAILURES`): Kraken error arrays, ``drop`` (the connection closes
before the request is carried out) and ``add_then_drop`` (the request is
carried out, then the connection closes unanswered: a crash between AddOrder
and its reply). Every request is recorded in ``requests`` (POSTs with
``"method": "POST"`` and their decoded form ``params``).

Fake-only choices (not Kraken facts): amounts are rendered with as many digits
as round-trip the float; sells must send ``oflags`` with ``fciq`` (fees are
modelled in the quote currency only) and every order must be post-only; an
unknown txid in QueryOrders is left out of the answer; a duplicate open
``cl_ord_id`` and ``cl_ord_id`` with ``userref`` answer ``EGeneral:Invalid
arguments:...``; a too fine volume answers ``EGeneral:Invalid arguments:volume``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from fake_kraken import AssetPair, FakeKraken, Response, _json

from candles import Candle
from grid.exchange import Fill, OrderRejected, OrderRequest, PairRules
from grid.paper_exchange import PaperBook
from vocabulary import BUY, SELL

PRIVATE_PREFIX = "/0/private/"
FORM_TYPE = "application/x-www-form-urlencoded"
API_KEY = "fake-public-key-3hT9"
API_SECRET = base64.b64encode(bytes(range(64))).decode()  # a fixed 64-byte test secret

PRIVATE_FAILURES = {
    "rate_limit": "EAPI:Rate limit exceeded",
    "order_rate_limit": "EOrder:Rate limit exceeded",
    "lockout": "EGeneral:Temporary lockout",
    "invalid_nonce": "EAPI:Invalid nonce",
    "unavailable": "EService:Unavailable",
    "busy": "EService:Busy",
    "insufficient_funds": "EOrder:Insufficient funds",
    "post_only": "EOrder:Post only order",
    "order_minimum": "EOrder:Order minimum not met",
    "cost_minimum": "EOrder:Cost minimum not met",
    "invalid_price": "EOrder:Invalid price:XDGUSD price can only be specified up to 7 decimals.",
    "invalid_arguments": "EGeneral:Invalid arguments",
    "permission_denied": "EGeneral:Permission denied",
}
DROP_KINDS = frozenset({"drop", "add_then_drop"})
FAIL_KINDS = frozenset({*PRIVATE_FAILURES, *DROP_KINDS})
_CL_ORD_ID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}|[\x21-\x7e]{1,18}")


def _amount(value: float) -> str:
    """Positional text that parses back to exactly ``value``."""
    return format(Decimal(repr(float(value))), "f")


def expected_signature(path: str, body: str, nonce: str, secret_b64: str) -> str:
    """Kraken's API-Sign, written out independently of :func:`kraken_private.sign`."""
    inner = hashlib.sha256(nonce.encode() + body.encode()).digest()
    key = base64.standard_b64decode(secret_b64)
    return base64.standard_b64encode(hmac.digest(key, path.encode() + inner, "sha512")).decode()


@dataclass
class FakeOrder:
    txid: str
    side: str
    price: float
    price_text: str
    volume: float
    opentm: float
    oflags: str
    cl_ord_id: str | None = None
    userref: int | None = None
    status: str = "open"
    vol_exec: float = 0.0
    cost: float = 0.0
    fee: float = 0.0
    closetm: float | None = None
    reason: str | None = None

    def record(self, pair: str, *, closed: bool) -> dict[str, Any]:
        info: dict[str, Any] = {
            "refid": None,
            "userref": self.userref or 0,
            "cl_ord_id": self.cl_ord_id,
            "status": self.status,
            "opentm": self.opentm,
            "starttm": 0,
            "expiretm": 0,
            "descr": {
                "pair": pair,
                "type": self.side,
                "ordertype": "limit",
                "price": self.price_text,
                "price2": "0",
                "leverage": "none",
                "order": f"{self.side} {self.volume:.8f} {pair} @ limit {self.price_text}",
                "close": "",
            },
            "vol": _amount(self.volume),
            "vol_exec": _amount(self.vol_exec),
            "cost": _amount(self.cost),
            "fee": _amount(self.fee),
            # Kraken's average execution price; a maker order only ever executes at its limit.
            "price": self.price_text if self.vol_exec > 0 else "0.0000000",
            "stopprice": "0.0000000",
            "limitprice": "0.0000000",
            "misc": "partial" if 0 < self.vol_exec < self.volume else "",
            "oflags": self.oflags,
        }
        if closed:
            info["closetm"] = self.closetm
            info["reason"] = self.reason
        return info


class FakeKrakenPrivate(FakeKraken):
    """Kraken's public OHLC plus the private trading endpoints, over real HTTP.

    ``rules`` are served by AssetPairs and enforced by the book; ``quote`` and
    ``base`` are the starting balances (``quote_id``/``base_id`` name them in
    Balance). ``seed`` makes the txids reproducible.
    """

    def __init__(
        self,
        candles: list[Candle],
        *,
        now: Callable[[], float],
        rules: PairRules | None = None,
        quote: float = 1_000.0,
        base: float = 10_000.0,
        api_key: str = API_KEY,
        api_secret: str = API_SECRET,
        base_id: str = "XXDG",
        quote_id: str = "ZUSD",
        seed: int = 5,
    ) -> None:
        self.rules = rules or PairRules()
        served = [AssetPair(self.rules, base_id=base_id, quote_id=quote_id)]
        super().__init__(candles, now=now, pair=self.rules.pair, asset_pairs=served)
        self.api_key, self.api_secret = api_key, api_secret
        self.base_id, self.quote_id = base_id, quote_id
        self.book = PaperBook(self.rules, quote=quote, base=base)
        self.orders: dict[str, FakeOrder] = {}  # every order ever accepted, by txid
        self.last_nonce: dict[str, int] = {}
        self._plock = threading.RLock()
        self._private_failures: list[tuple[str, str | None]] = []
        self._rng = random.Random(seed)

    # control ----------------------------------------------------------------------------

    def fail_private(self, n: int, kind: str, *, method: str | None = None) -> None:
        """Make the next ``n`` private requests (to ``method`` only, if given) fail with ``kind``."""
        if kind not in FAIL_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {sorted(FAIL_KINDS)}")
        with self._plock:
            self._private_failures.extend([(kind, method)] * n)

    def on_candle(self, candle: Candle) -> list[Fill]:
        """Match the resting orders against ``candle`` (the paper rule); returns the fills by cl_ord_id."""
        with self._plock:
            fills = []
            for fill in self.book.match(candle):
                order = self.orders[fill.client_id]  # the book is keyed by txid
                self._execute(order, fill.volume, fill.fee)
                order.status, order.closetm = "closed", float(fill.ts)
                fills.append(replace(fill, client_id=order.cl_ord_id or order.txid, txid=order.txid))
            return fills

    def partial_fill(self, cl_ord_id: str, volume: float) -> None:
        """Execute ``volume`` of the open order ``cl_ord_id`` at its limit price (it stays open)."""
        with self._plock:
            order = self._open_by_cl_ord_id(cl_ord_id)
            if order is None:
                raise KeyError(f"no open order {cl_ord_id}")
            resting = self.book.orders[order.txid]
            if not 0 < volume < resting.volume:
                raise ValueError("a partial fill must leave part of the order open")
            fee = self.rules.fee(order.price, volume)
            if order.side == BUY:
                self.book.quote -= order.price * volume + fee
                self.book.base += volume
            else:
                self.book.base -= volume
                self.book.quote += order.price * volume - fee
            self.book.orders[order.txid] = replace(resting, volume=round(resting.volume - volume, 12))
            self._execute(order, volume, fee)

    def open_cl_ord_ids(self) -> list[str]:
        with self._plock:
            return [o.cl_ord_id or o.txid for o in self.orders.values() if o.status == "open"]

    def private_requests(self, method: str | None = None) -> list[dict]:
        with self._lock:
            posts = [r for r in self.requests if r.get("method") == "POST"]
        return [r for r in posts if method is None or r["path"] == PRIVATE_PREFIX + method]

    # serving ----------------------------------------------------------------------------

    def handle_post(self, path: str, body: bytes, headers: dict[str, str]) -> Response | None:
        text = body.decode("utf-8", "replace")
        params = dict(parse_qsl(text, keep_blank_values=True))
        with self._lock:
            self.requests.append({"path": path, "params": params, "headers": headers, "method": "POST"})
        method = path.removeprefix(PRIVATE_PREFIX)
        handler = self._handlers().get(method) if path.startswith(PRIVATE_PREFIX) else None
        if handler is None:
            return _json(404, {"error": ["EGeneral:Unknown method"]})
        with self._plock:
            refusal = self._authenticate(path, text, params, headers)
            if refusal:
                return _error(refusal)
            failure = self._take_failure(method)
            nonce = int(params["nonce"])
            if failure == "invalid_nonce":
                return _error(PRIVATE_FAILURES[failure])  # refused: the nonce is not used up
            self.last_nonce[self.api_key] = nonce
            if failure in PRIVATE_FAILURES:
                return _error(PRIVATE_FAILURES[failure])
            if failure == "drop":
                return None
            answer = handler(params)
            return None if failure == "add_then_drop" else answer

    def _handlers(self) -> dict[str, Callable[[dict[str, str]], Response]]:
        return {
            "AddOrder": self._add_order,
            "CancelOrder": self._cancel_order,
            "OpenOrders": self._open_orders,
            "ClosedOrders": self._closed_orders,
            "QueryOrders": self._query_orders,
            "Balance": self._balance,
        }

    def _authenticate(self, path: str, body: str, params: dict[str, str], headers: dict[str, str]) -> str | None:
        lowered = {k.lower(): v for k, v in headers.items()}
        if not lowered.get("content-type", "").startswith(FORM_TYPE):
            return "EGeneral:Invalid arguments"
        if not hmac.compare_digest(lowered.get("api-key", ""), self.api_key):
            return "EAPI:Invalid key"
        nonce = params.get("nonce", "")
        if not nonce.isdigit():
            return "EAPI:Invalid nonce"
        given = lowered.get("api-sign", "")
        if not hmac.compare_digest(given, expected_signature(path, body, nonce, self.api_secret)):
            return "EAPI:Invalid signature"
        if int(nonce) <= self.last_nonce.get(self.api_key, 0):
            return "EAPI:Invalid nonce"
        return None

    def _take_failure(self, method: str) -> str | None:
        for i, (kind, only) in enumerate(self._private_failures):
            if only is None or only == method:
                del self._private_failures[i]
                return kind
        return None

    # endpoints --------------------------------------------------------------------------

    def _add_order(self, p: dict[str, str]) -> Response:
        side, oflags = p.get("type"), p.get("oflags", "")
        flags = set(oflags.split(",")) if oflags else set()
        if p.get("pair", "").upper() != self.pair.upper():
            return _error("EQuery:Unknown asset pair")
        if p.get("ordertype") != "limit" or side not in (BUY, SELL):
            return _error("EGeneral:Invalid arguments:ordertype")
        if "post" not in flags:
            return _error("EGeneral:Invalid arguments:oflags (the fake rests post-only orders only)")
        if "fcib" in flags or (side == SELL and "fciq" not in flags):
            return _error("EGeneral:Invalid arguments:oflags (the fake charges fees in the quote currency only)")
        cl_ord_id, userref = p.get("cl_ord_id"), p.get("userref")
        if cl_ord_id is not None and userref is not None:
            return _error("EGeneral:Invalid arguments:cl_ord_id and userref are mutually exclusive")
        if cl_ord_id is not None and (not _CL_ORD_ID.fullmatch(cl_ord_id) or self._open_by_cl_ord_id(cl_ord_id)):
            return _error("EGeneral:Invalid arguments:cl_ord_id")
        try:
            price, volume = float(p["price"]), float(p["volume"])
            ref = int(userref) if userref is not None else None
        except (KeyError, ValueError):
            return _error("EGeneral:Invalid arguments:price/volume")
        txid, now = self._new_txid(), self._now()
        order = FakeOrder(txid, side, price, p["price"], volume, now, oflags, cl_ord_id, ref)
        descr = {"order": order.record(self.pair, closed=False)["descr"]["order"]}
        try:
            self.book.add(OrderRequest(txid, side, price, volume), now)
        except OrderRejected as exc:
            if exc.reason != "post_only":
                return _error(self._kraken_refusal(exc))
            # Posted or cancelled: Kraken takes the order and cancels it at once.
            order.status, order.closetm, order.reason = "canceled", now, "Post only order"
        if p.get("validate") == "true":
            self.book.cancel(txid)
            return _json(200, {"error": [], "result": {"descr": descr}})
        self.orders[txid] = order
        return _json(200, {"error": [], "result": {"descr": descr, "txid": [txid]}})

    def _kraken_refusal(self, exc: OrderRejected) -> str:
        text = str(exc)
        if exc.reason == "funds":
            return "EOrder:Insufficient funds"
        if exc.reason == "minimum":
            return "EOrder:Order minimum not met" if text.startswith("volume") else "EOrder:Cost minimum not met"
        if exc.reason == "precision" and text.startswith("price"):
            d = self.rules.price_decimals
            return f"EOrder:Invalid price:{self.pair} price can only be specified up to {d} decimals."
        if exc.reason == "precision":
            return "EGeneral:Invalid arguments:volume"
        return "EGeneral:Invalid arguments"

    def _cancel_order(self, p: dict[str, str]) -> Response:
        if "cl_ord_id" in p:
            targets = [o for o in [self._open_by_cl_ord_id(p["cl_ord_id"])] if o is not None]
        elif p.get("txid", "").isdigit():
            targets = [o for o in self.orders.values() if o.status == "open" and o.userref == int(p["txid"])]
        else:
            order = self.orders.get(p.get("txid", ""))
            targets = [order] if order is not None and order.status == "open" else []
        if not targets:
            return _error("EOrder:Unknown order")
        for order in targets:
            self.book.cancel(order.txid)
            order.status, order.closetm, order.reason = "canceled", self._now(), "User requested"
        return _json(200, {"error": [], "result": {"count": len(targets)}})

    def _open_orders(self, p: dict[str, str]) -> Response:
        found = {t: o.record(self.pair, closed=False) for t, o in self._filtered(p).items() if o.status == "open"}
        return _json(200, {"error": [], "result": {"open": found}})

    def _closed_orders(self, p: dict[str, str]) -> Response:
        found = {t: o.record(self.pair, closed=True) for t, o in self._filtered(p).items() if o.status != "open"}
        return _json(200, {"error": [], "result": {"closed": found, "count": len(found)}})

    def _query_orders(self, p: dict[str, str]) -> Response:
        txids = [t.strip() for t in p.get("txid", "").split(",") if t.strip()]
        if not txids:
            return _error("EGeneral:Invalid arguments")
        found = {
            t: self.orders[t].record(self.pair, closed=self.orders[t].status != "open")
            for t in txids
            if t in self.orders
        }
        return _json(200, {"error": [], "result": found})

    def _balance(self, p: dict[str, str]) -> Response:
        return _json(
            200,
            {"error": [], "result": {self.quote_id: _amount(self.book.quote), self.base_id: _amount(self.book.base)}},
        )

    # internals --------------------------------------------------------------------------

    def _filtered(self, p: dict[str, str]) -> dict[str, FakeOrder]:
        orders = dict(self.orders)
        if "cl_ord_id" in p:
            orders = {t: o for t, o in orders.items() if o.cl_ord_id == p["cl_ord_id"]}
        if "userref" in p:
            orders = {t: o for t, o in orders.items() if str(o.userref) == p["userref"]}
        return orders

    def _open_by_cl_ord_id(self, cl_ord_id: str) -> FakeOrder | None:
        return next((o for o in self.orders.values() if o.cl_ord_id == cl_ord_id and o.status == "open"), None)

    def _execute(self, order: FakeOrder, volume: float, fee: float) -> None:
        order.vol_exec += volume
        order.cost += order.price * volume
        order.fee += fee

    def _new_txid(self) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
        while True:
            parts = ["".join(self._rng.choice(alphabet) for _ in range(n)) for n in (5, 5, 6)]
            txid = f"O{parts[0]}-{parts[1]}-{parts[2]}"
            if txid not in self.orders:
                return txid


def _error(message: str) -> Response:
    return _json(200, {"error": [message]})
