"""What the grid engine needs from an exchange, and the values it trades in.

The paper exchange (:mod:`paper_exchange`) and the live Kraken exchange
(:mod:`kraken_exchange`) implement :class:`Exchange` the same way, so the
engine and the main loop cannot tell them apart. Amounts are floats in the
pair's own units: ``volume`` in the base asset (DOGE), prices and fees in the
quote asset (USD). Fees are charged in the quote asset, as Kraken does by
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from candles import Candle
from errors import BotError
from vocabulary import BUY


class OrderRejected(BotError):
    """The exchange refused an order for a reason that retrying will not fix (funds, size, post-only)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "funds" | "post_only" | "minimum" | "precision" | "other"


@dataclass(frozen=True)
class PairRules:
    """Order rules of one pair (Kraken's ``AssetPairs``)."""

    pair: str = "XDGUSD"
    base_asset: str = "DOGE"
    quote_asset: str = "USD"
    price_decimals: int = 7
    lot_decimals: int = 8
    ordermin: float = 50.0  # smallest volume, in the base asset
    costmin: float = 0.5  # smallest price x volume, in the quote asset
    maker_fee_pct: float = 0.25

    def round_price(self, price: float, side: str) -> float:
        """``price`` on the pair's tick, rounded away from the market (down for buys, up for sells)."""
        scale = 10**self.price_decimals
        ticks = price * scale
        ticks = math.floor(ticks + 1e-9) if side == BUY else math.ceil(ticks - 1e-9)
        return round(ticks / scale, self.price_decimals)

    def round_volume(self, volume: float) -> float:
        scale = 10**self.lot_decimals
        return round(math.floor(volume * scale + 1e-9) / scale, self.lot_decimals)

    def round_volume_up(self, volume: float) -> float:
        """``volume`` on the lot step, rounded up (the smallest lot at least ``volume``)."""
        scale = 10**self.lot_decimals
        return round(math.ceil(volume * scale - 1e-9) / scale, self.lot_decimals)

    def size_problem(self, price: float, volume: float) -> str | None:
        if volume < self.ordermin:
            return f"volume {volume:g} is below the minimum of {self.ordermin:g} {self.base_asset}"
        if price * volume < self.costmin:
            return f"cost {price * volume:.4f} is below the minimum of {self.costmin:g} {self.quote_asset}"
        return None

    def fee(self, price: float, volume: float) -> float:
        return price * volume * self.maker_fee_pct / 100.0


@dataclass(frozen=True)
class OrderRequest:
    client_id: str  # ours, unique per order; the exchange keeps it (Kraken: cl_ord_id)
    side: str
    price: float
    volume: float


@dataclass(frozen=True)
class OpenOrder:
    client_id: str
    txid: str
    side: str
    price: float
    volume: float
    placed_at: float


@dataclass(frozen=True)
class Fill:
    """An order that executed, wholly or (when the rest was cancelled) in part."""

    client_id: str
    txid: str
    side: str
    price: float
    volume: float
    fee: float
    ts: float


@dataclass(frozen=True)
class Balances:
    quote: float
    base: float


class Exchange(Protocol):
    rules: PairRules
    fills_from_candles: bool  # paper: fills come from matching each candle; live: from the exchange

    def place(self, order: OrderRequest, now: float) -> str:
        """Rest ``order`` as a post-only limit order; returns the exchange's id.

        Raises :class:`OrderRejected` or :class:`errors.RetryLater`.
        """
        ...

    def cancel(self, client_id: str, now: float) -> Fill | None:
        """Cancel an open order; returns the part that executed before, if any."""
        ...

    def poll_fills(self, now: float, candle: Candle | None) -> list[Fill]:
        """Fills since the last poll (paper: against ``candle``; live: from the exchange)."""
        ...

    def open_orders(self) -> dict[str, OpenOrder]: ...

    def adopt(self, order: OpenOrder) -> None:
        """Track an order of this bot found open at reconciliation, as if :meth:`place` had placed it."""
        ...

    def lookup(self, client_ids: list[str]) -> dict[str, Fill | None]:
        """What became of orders that left the book: their fill, or ``None`` (cancelled, expired, unknown)."""
        ...

    def balances(self) -> Balances: ...
