"""The live exchange: :class:`exchange.Exchange` over Kraken's private REST API.

Thin on purpose: it turns the grid engine's orders into AddOrder/CancelOrder
calls and Kraken's order records back into :class:`exchange.Fill`, and makes
no trading decisions.

- Every order is a post-only limit order whose ``cl_ord_id`` is the engine's
  ``OrderRequest.client_id``, with the fee charged in the quote currency
  (``oflags=post,fciq``) as the paper exchange models it. Prices and volumes
  are sent as strings with exactly the pair's ``pair_decimals`` /
  ``lot_decimals``; one with more decimals is refused here with reason
  ``precision``, as :class:`paper_exchange.PaperBook` refuses it.
- This bot's orders are the open orders on the pair whose ``cl_ord_id`` starts
  with ``id_prefix``. Kraken documents ``cl_ord_id`` and ``userref`` as mutually
  exclusive on AddOrder, so orders carry no ``userref`` tag: the client id is
  the tag.
- Kraken answers a post-only order that would take liquidity by cancelling it
  ("posted or cancelled"). ``place`` reads the new order back once and raises
  ``OrderRejected("post_only")`` when it was cancelled at once, as the paper
  exchange does; an order that disappears later is logged and dropped by
  ``poll_fills``.
- :meth:`KrakenExchange.lookup` answers reconciliation as the paper exchange
  does (a Fill owed by each order that left the book unobserved, else
  ``None``); :meth:`KrakenExchange.order_statuses` gives Kraken's full word on
  each order.
- ``poll_fills`` asks QueryOrders about the orders this instance tracks (placed
  here or :meth:`KrakenExchange.adopt`-ed at reconciliation) and reports each
  order once, when it has finished: closed -> a Fill of the whole order;
  cancelled or expired after executing part -> a Fill of that part. The price is
  Kraken's average execution price, the fee Kraken's fee, ``ts`` its close time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from candles import Candle
from errors import BadData, RetryLater
from grid.exchange import Balances, Fill, OpenOrder, OrderRejected, OrderRequest, PairRules
from kraken.private_client import UNKNOWN_ORDER_ERROR, KrakenPrivateClient, valid_cl_ord_id
from kraken.public_client import PairInfo
from vocabulary import BUY, SELL

log = logging.getLogger(__name__)

OPEN, CLOSED, CANCELED, UNKNOWN = "open", "closed", "canceled", "unknown"
_STATUS = {"pending": OPEN, "open": OPEN, "closed": CLOSED, "canceled": CANCELED, "expired": CANCELED}
FINISHED_MEMORY = 10_000  # how many reported orders are remembered so none is reported twice


@dataclass(frozen=True)
class OrderStatus:
    """What Kraken says about one of this bot's orders (for reconciliation)."""

    client_id: str
    status: str  # open | closed | canceled | unknown
    txid: str | None = None
    side: str | None = None
    price: float | None = None  # the limit price
    volume: float = 0.0
    vol_exec: float = 0.0
    avg_price: float | None = None
    fee: float = 0.0
    reason: str | None = None
    opened_at: float | None = None
    closed_at: float | None = None


# Pure helpers -------------------------------------------------------------------------


def format_amount(value: float, decimals: int) -> str:
    """``value`` as positional text with exactly ``decimals`` decimals (``0.1`` -> ``"0.1000000"``).

    Raises ``ValueError`` when ``value`` has more decimals than that: the caller
    decides what a finer value means, this never rounds it silently.
    """
    if round(value, decimals) != value:
        raise ValueError(f"{value!r} has more than {decimals} decimals")
    return format(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-decimals)), "f")


def order_status(client_id: str, txid: str, info: dict[str, Any]) -> OrderStatus:
    """Parse one Kraken order record (OpenOrders/ClosedOrders/QueryOrders); raises :class:`BadData`."""
    try:
        descr = info.get("descr") or {}
        vol_exec = float(info.get("vol_exec") or 0.0)
        cost = float(info.get("cost") or 0.0)
        avg = float(info.get("price") or 0.0)
        if avg <= 0 and vol_exec > 0:
            avg = cost / vol_exec
        limit = float(descr["price"]) if descr.get("price") not in (None, "") else None
        closed_at = info.get("closetm")
        status = OrderStatus(
            client_id=client_id,
            status=_STATUS.get(str(info.get("status")), UNKNOWN),
            txid=txid,
            side=descr.get("type"),
            price=limit,
            volume=float(info["vol"]),
            vol_exec=vol_exec,
            avg_price=(avg or limit) if vol_exec > 0 else None,
            fee=float(info.get("fee") or 0.0),
            reason=info.get("reason"),
            opened_at=float(info["opentm"]) if info.get("opentm") is not None else None,
            closed_at=float(closed_at) if closed_at else None,
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise BadData(f"Kraken order {txid}: malformed record: {exc!r}") from None
    if status.side not in (BUY, SELL):
        raise BadData(f"Kraken order {txid}: unknown side {status.side!r}")
    if status.price is None or (status.vol_exec > 0 and not status.avg_price):
        raise BadData(f"Kraken order {txid}: no limit or execution price")
    return status


def fill_of(status: OrderStatus, now: float) -> Fill | None:
    """The Fill a finished order owes: all of it when closed, the executed part when cancelled, else ``None``."""
    if status.status not in (CLOSED, CANCELED) or status.vol_exec <= 0 or status.txid is None:
        return None
    if status.side is None or status.avg_price is None:
        raise BadData(f"Kraken order {status.txid}: executed without a side or price")
    ts = status.closed_at if status.closed_at is not None else now
    return Fill(status.client_id, status.txid, status.side, status.avg_price, status.vol_exec, status.fee, ts)


# The exchange ---------------------------------------------------------------------------


class KrakenExchange:
    """:class:`exchange.Exchange` on Kraken for one pair.

    ``info`` (rules and Kraken's asset names) is read from AssetPairs when not given.
    """

    fills_from_candles = False  # Kraken reports its own fills

    def __init__(
        self,
        client: KrakenPrivateClient,
        pair: str = "XDGUSD",
        *,
        info: PairInfo | None = None,
        id_prefix: str = "",
    ) -> None:
        self.client = client
        self.pair = pair
        self.id_prefix = id_prefix
        self._open: dict[str, OpenOrder] = {}  # tracked until reported finished, in placement order
        self._finished: dict[str, str] = {}  # client id -> txid of orders already reported
        self._uncertain: set[str] = set()  # AddOrder answered with RetryLater: the order may exist
        self.info = info if info is not None else client.asset_pair_info(pair)
        self.rules: PairRules = self.info.rules

    # Exchange -----------------------------------------------------------------------------

    def place(self, order: OrderRequest, now: float) -> str:
        cid = order.client_id
        if order.side not in (BUY, SELL):
            raise OrderRejected("other", f"unknown side {order.side!r}")
        if not valid_cl_ord_id(cid) or not cid.startswith(self.id_prefix):
            raise OrderRejected(
                "other", f"client id {cid!r} is not a Kraken cl_ord_id starting with {self.id_prefix!r}"
            )
        if cid in self._open:
            raise OrderRejected("other", f"order {cid} is already open")
        if not (order.price > 0 and order.volume > 0):
            raise OrderRejected("other", "price and volume must be positive")
        try:
            price = format_amount(order.price, self.rules.price_decimals)
            volume = format_amount(order.volume, self.rules.lot_decimals)
        except ValueError as exc:
            raise OrderRejected("precision", f"order {cid}: {exc}") from None
        if cid in self._uncertain:  # an earlier AddOrder got no answer: never place it twice
            found = self.client.find_order(cid)
            if found is not None:
                self._uncertain.discard(cid)
                self._track(cid, found[0], order, found[1].get("opentm", now))
                self._check_posted(cid, found[0])
                return found[0]
        try:
            txid = self.client.add_order(self.pair, order.side, price, volume, cl_ord_id=cid)
        except RetryLater:
            self._uncertain.add(cid)
            raise
        self._uncertain.discard(cid)
        self._track(cid, txid, order, now)
        self._check_posted(cid, txid)
        return txid

    def cancel(self, client_id: str, now: float) -> Fill | None:
        tracked = self._open.get(client_id)
        reported = self._finished.get(client_id)
        txid = tracked.txid if tracked else reported
        try:
            if txid is not None:
                self.client.cancel_order(txid)
            else:
                self.client.cancel_order(cl_ord_id=client_id)
        except BadData as exc:
            if UNKNOWN_ORDER_ERROR not in str(exc):
                raise
            log.info("cancel %s: no longer open (%s)", client_id, exc)
        if tracked is None and reported is not None:
            return None  # finished and reported by an earlier poll or cancel
        if txid is not None:
            status = self._statuses({client_id: txid}).get(client_id)
        else:
            hit = self.client.find_order(client_id)
            status = order_status(client_id, *hit) if hit else None
        if status is None:
            log.warning("cancel %s: Kraken does not know the order", client_id)
            return None
        if status.status == OPEN:
            # Not settled yet: track it; poll_fills reports any executed part once it has.
            log.warning("cancel %s: Kraken still reports it open", client_id)
            if tracked is None and status.txid is not None and status.side is not None:
                self._open[client_id] = OpenOrder(
                    client_id, status.txid, status.side, status.price or 0.0, status.volume, status.opened_at or now
                )
            return None
        return self._settle(status, now)

    def poll_fills(self, now: float, candle: Candle | None) -> list[Fill]:
        """Fills of the tracked orders that finished since the last poll; ``candle`` is not used."""
        if not self._open:
            return []
        statuses = self._statuses({cid: o.txid for cid, o in self._open.items()})
        fills = []
        for cid in list(self._open):
            status = statuses.get(cid)
            if status is None:
                log.warning("order %s (%s): Kraken does not know it", cid, self._open[cid].txid)
            elif status.status != OPEN:
                fill = self._settle(status, now)
                if fill is not None:
                    fills.append(fill)
        return fills

    def open_orders(self) -> dict[str, OpenOrder]:
        """This bot's open orders on the pair (``cl_ord_id`` with ``id_prefix``), by client id, oldest first."""
        orders = []
        for txid, info in self.client.open_orders().items():
            cid = info.get("cl_ord_id")
            if not cid or not str(cid).startswith(self.id_prefix) or not self._on_pair(info):
                continue
            status = order_status(str(cid), txid, info)  # side and limit price are checked there
            assert status.side is not None and status.price is not None
            opened = status.opened_at if status.opened_at is not None else 0.0
            orders.append(OpenOrder(status.client_id, txid, status.side, status.price, status.volume, opened))
        return {o.client_id: o for o in sorted(orders, key=lambda o: o.placed_at)}

    def balances(self) -> Balances:
        """Total quote and base balances (including what open orders hold), as the paper exchange reports them."""
        held = self.client.balance()
        return Balances(
            quote=_first(held, (self.info.quote_id, self.rules.quote_asset)),
            base=_first(held, (self.info.base_id, self.rules.base_asset)),
        )

    # reconciliation --------------------------------------------------------------------------

    def adopt(self, order: OpenOrder) -> None:
        """Track an order found open at reconciliation, so ``poll_fills``/``cancel`` report it."""
        self._open[order.client_id] = order
        self._uncertain.discard(order.client_id)

    def tracked(self) -> dict[str, OpenOrder]:
        """The orders this instance reports fills for (placed or adopted, not yet finished)."""
        return dict(self._open)

    def lookup(self, client_ids: Iterable[str]) -> dict[str, Fill | None]:
        """For orders that left the book unobserved: the Fill each owes, else ``None``.

        The contract of :meth:`paper_exchange.PaperExchange.lookup` that
        :meth:`grid_runner.GridRunner.reconcile` relies on: a closed order owes
        a Fill of all of it, one cancelled or expired after executing part a
        Fill of that part; an order cancelled without executing, unknown to
        Kraken or still open (not missing after all) owes nothing. A Fill
        returned here settles the order, so ``poll_fills`` and ``cancel`` never
        report it again, and one already reported is not returned again.
        """
        owed: dict[str, Fill | None] = {}
        for cid, status in self.order_statuses(client_ids).items():
            finished = status.status in (CLOSED, CANCELED)
            repeated = cid not in self._open and self._finished.get(cid) == status.txid
            fallback_ts = status.opened_at if status.opened_at is not None else 0.0
            owed[cid] = self._settle(status, fallback_ts) if finished and not repeated else None
        return owed

    def order_statuses(self, client_ids: Iterable[str]) -> dict[str, OrderStatus]:
        """Kraken's current word on each client id: open, closed, canceled or unknown, with amounts."""
        wanted = list(dict.fromkeys(client_ids))
        found: dict[str, OrderStatus] = {}
        for txid, info in self.client.open_orders().items():
            cid = info.get("cl_ord_id")
            if cid in wanted:
                found[cid] = order_status(cid, txid, info)
        known = {cid: self._txid_of(cid) for cid in wanted if cid not in found}
        found.update(self._statuses({cid: txid for cid, txid in known.items() if txid is not None}))
        for cid in wanted:
            if cid not in found:
                hit = self.client.find_order(cid)
                found[cid] = order_status(cid, *hit) if hit else OrderStatus(cid, UNKNOWN)
        return {cid: found[cid] for cid in wanted}

    # internals -------------------------------------------------------------------------------

    def _track(self, cid: str, txid: str, order: OrderRequest, placed_at: Any) -> None:
        self._open[cid] = OpenOrder(cid, txid, order.side, order.price, order.volume, float(placed_at))

    def _check_posted(self, cid: str, txid: str) -> None:
        """Raise like the paper exchange when Kraken cancelled the new post-only order at once."""
        try:
            status = self._statuses({cid: txid}).get(cid)
        except (RetryLater, BadData) as exc:  # the order exists; poll_fills will see how it ends
            log.warning("order %s placed as %s; could not read it back: %s", cid, txid, exc)
            return
        if status is not None and status.status == CANCELED and status.vol_exec <= 0:
            self._open.pop(cid, None)
            self._remember(cid, txid)
            reason = status.reason or "cancelled"
            kind = "post_only" if "post" in reason.lower() else "other"
            raise OrderRejected(kind, f"Kraken cancelled order {cid} ({txid}) at once: {reason}")

    def _statuses(self, txids: dict[str, str]) -> dict[str, OrderStatus]:
        """Status by client id for ``{client_id: txid}`` from QueryOrders."""
        if not txids:
            return {}
        records = self.client.query_orders(txids.values())
        return {cid: order_status(cid, txid, records[txid]) for cid, txid in txids.items() if txid in records}

    def _settle(self, status: OrderStatus, now: float) -> Fill | None:
        """Stop tracking a finished order and return its Fill, once."""
        cid = status.client_id
        self._open.pop(cid, None)
        if self._finished.get(cid) == status.txid:
            return None
        self._remember(cid, status.txid)
        fill = fill_of(status, now)
        if fill is None:
            log.warning("order %s (%s) %s without executing: %s", cid, status.txid, status.status, status.reason)
        return fill

    def _remember(self, cid: str, txid: str | None) -> None:
        if txid is None:
            return
        self._finished[cid] = txid
        while len(self._finished) > FINISHED_MEMORY:
            del self._finished[next(iter(self._finished))]

    def _txid_of(self, cid: str) -> str | None:
        tracked = self._open.get(cid)
        return tracked.txid if tracked else self._finished.get(cid)

    def _on_pair(self, info: dict[str, Any]) -> bool:
        pair = str((info.get("descr") or {}).get("pair", "")).upper()
        return pair in {self.info.name.upper(), self.info.altname.upper(), self.pair.upper()}


def _first(balances: dict[str, float], names: Iterable[str]) -> float:
    for name in names:
        if name in balances:
            return balances[name]
    return 0.0  # Kraken lists no entry for an asset the account never held
