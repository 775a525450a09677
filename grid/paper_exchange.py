"""The paper exchange: resting post-only limit orders filled by later candles.

An order rests from the moment it is placed. A candle that opens at or after
that moment fills it when its range trades *through* the price (a buy when the
low is below it, a sell when the high is above it): touching the price is not
enough, since a resting order at the touch may be behind the queue. Fills are
at the limit price and pay the maker fee in the quote asset.

Balances never go negative: an order reserves what it may spend (a buy its
cost plus fee, a sell its volume), and an order that the free balance cannot
cover is refused, as Kraken refuses it with ``EOrder:Insufficient funds``.
:class:`PaperBook` is also what the fake Kraken server in the tests matches
with, so paper and live runs see the same fills.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from candles import Candle
from grid.exchange import Balances, Fill, OpenOrder, OrderRejected, OrderRequest, PairRules
from vocabulary import BUY, SELL


class PaperBook:
    """Open orders and balances of one pair, with the matching rule above."""

    def __init__(self, rules: PairRules, *, quote: float, base: float) -> None:
        if quote < 0 or base < 0:
            raise ValueError("paper balances must not be negative")
        self.rules = rules
        self.quote, self.base = float(quote), float(base)
        self.orders: dict[str, OpenOrder] = {}
        self.last_price: float | None = None
        self._next_txid = 1

    # reservations -----------------------------------------------------------------

    def reserved(self) -> Balances:
        fee = self.rules.maker_fee_pct / 100.0
        quote = sum(o.price * o.volume * (1 + fee) for o in self.orders.values() if o.side == BUY)
        base = sum(o.volume for o in self.orders.values() if o.side == SELL)
        return Balances(quote, base)

    def free(self) -> Balances:
        r = self.reserved()
        return Balances(self.quote - r.quote, self.base - r.base)

    # orders --------------------------------------------------------------------------

    def add(self, order: OrderRequest, now: float) -> OpenOrder:
        """Rest ``order``; raises :class:`OrderRejected` as Kraken would refuse it."""
        rules = self.rules
        if order.side not in (BUY, SELL):
            raise OrderRejected("other", f"unknown side {order.side!r}")
        if order.client_id in self.orders:
            raise OrderRejected("other", f"order {order.client_id} is already open")
        if not (order.price > 0 and order.volume > 0):
            raise OrderRejected("other", "price and volume must be positive")
        if round(order.price, rules.price_decimals) != order.price:
            raise OrderRejected("precision", f"price {order.price!r} has more than {rules.price_decimals} decimals")
        if round(order.volume, rules.lot_decimals) != order.volume:
            raise OrderRejected("precision", f"volume {order.volume!r} has more than {rules.lot_decimals} decimals")
        problem = rules.size_problem(order.price, order.volume)
        if problem:
            raise OrderRejected("minimum", problem)
        last = self.last_price
        if last is not None and (order.price >= last if order.side == BUY else order.price <= last):
            raise OrderRejected("post_only", f"post-only {order.side} at {order.price} would take at {last}")
        free = self.free()
        if order.side == BUY:
            need = order.price * order.volume + rules.fee(order.price, order.volume)
            if need > free.quote + 1e-9:
                raise OrderRejected("funds", f"needs {need:.4f} {rules.quote_asset}, {free.quote:.4f} free")
        elif order.volume > free.base + 1e-9:
            raise OrderRejected("funds", f"needs {order.volume:g} {rules.base_asset}, {free.base:g} free")
        resting = OpenOrder(order.client_id, f"P{self._next_txid}", order.side, order.price, order.volume, now)
        self._next_txid += 1
        self.orders[order.client_id] = resting
        return resting

    def cancel(self, client_id: str) -> OpenOrder | None:
        return self.orders.pop(client_id, None)

    def match(self, candle: Candle) -> list[Fill]:
        """Fill every order resting when ``candle`` opened that it trades through; the last price moves on."""
        fills = []
        for order in list(self.orders.values()):
            if order.placed_at > candle.time:
                continue
            through = candle.low < order.price if order.side == BUY else candle.high > order.price
            if through:
                fills.append(self._execute(order, candle.time + 60))
        self.last_price = candle.close
        return fills

    def _execute(self, order: OpenOrder, ts: float) -> Fill:
        del self.orders[order.client_id]
        cost = order.price * order.volume
        fee = self.rules.fee(order.price, order.volume)
        if order.side == BUY:
            self.quote -= cost + fee
            self.base += order.volume
        else:
            self.base -= order.volume
            self.quote += cost - fee
        return Fill(order.client_id, order.txid, order.side, order.price, order.volume, fee, ts)

    # persistence -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "quote": self.quote,
            "base": self.base,
            "last_price": self.last_price,
            "next_txid": self._next_txid,
            "orders": [o.__dict__ for o in self.orders.values()],
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Balances and orders from :meth:`to_dict`; a bad record raises KeyError, TypeError or ValueError."""
        orders = {o["client_id"]: OpenOrder(**o) for o in data["orders"]}
        quote, base = float(data["quote"]), float(data["base"])
        if quote < 0 or base < 0:
            raise ValueError("negative paper balance in the snapshot")
        self.quote, self.base, self.orders = quote, base, orders
        last = data.get("last_price")
        self.last_price = float(last) if last is not None else None
        self._next_txid = int(data.get("next_txid", len(orders) + 1))


class PaperExchange:
    """:class:`exchange.Exchange` over a :class:`PaperBook`; fills come from the candles it is shown."""

    fills_from_candles = True

    def __init__(self, rules: PairRules, *, quote: float, base: float) -> None:
        self.rules = rules
        self.book = PaperBook(rules, quote=quote, base=base)

    def place(self, order: OrderRequest, now: float) -> str:
        return self.book.add(order, now).txid

    def cancel(self, client_id: str, now: float) -> Fill | None:
        self.book.cancel(client_id)
        return None  # paper orders fill whole or not at all

    def poll_fills(self, now: float, candle: Candle | None) -> list[Fill]:
        return self.book.match(candle) if candle is not None else []

    def open_orders(self) -> dict[str, OpenOrder]:
        return dict(self.book.orders)

    def adopt(self, order: OpenOrder) -> None:
        """Nothing to do: the paper book is restored with the grid, so it holds no order the grid lacks."""

    def lookup(self, client_ids: list[str]) -> dict[str, Fill | None]:
        """Paper orders that left the book were cancelled (fills are reported as they happen)."""
        return dict.fromkeys(client_ids)

    def balances(self) -> Balances:
        return Balances(self.book.quote, self.book.base)


def paper_exchange_factory(
    rules: PairRules, *, start_quote: float, base_share: float
) -> Callable[[float], PaperExchange]:
    """Makes a paper exchange funded with ``start_quote``: ``base_share`` of it in the base asset at the first price."""

    def make(price: float) -> PaperExchange:
        base = rules.round_volume(start_quote * base_share / price)
        # max: base x price may come out a rounding error above start_quote when it is all spent on the base
        return PaperExchange(rules, quote=max(0.0, start_quote - base * price), base=base)

    return make
