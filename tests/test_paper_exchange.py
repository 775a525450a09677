"""The paper exchange: resting post-only limit orders that later candles fill."""

from __future__ import annotations

import json

import pytest

from candles import Candle
from grid.exchange import Balances, Fill, OrderRejected, OrderRequest, PairRules
from grid.paper_exchange import PaperBook, PaperExchange, paper_exchange_factory
from vocabulary import BUY, SELL

RULES = PairRules()  # 7 price decimals, 8 lot decimals, at least 50 DOGE and 0.5 USD, 0.25% maker fee
T0 = 1_767_225_600


def candle(time: int, low: float, high: float, *, open_: float | None = None, close: float | None = None) -> Candle:
    open_ = (low + high) / 2 if open_ is None else open_
    close = (low + high) / 2 if close is None else close
    return Candle(time, open_, high, low, close, 1000.0)


def book(quote: float = 1000.0, base: float = 10_000.0) -> PaperBook:
    return PaperBook(RULES, quote=quote, base=base)


def buy(client_id: str = "b1", price: float = 0.099, volume: float = 200.0) -> OrderRequest:
    return OrderRequest(client_id, BUY, price, volume)


def sell(client_id: str = "s1", price: float = 0.101, volume: float = 200.0) -> OrderRequest:
    return OrderRequest(client_id, SELL, price, volume)


def refusal(b: PaperBook, order: OrderRequest) -> str:
    with pytest.raises(OrderRejected) as info:
        b.add(order, T0)
    return info.value.reason


# matching -----------------------------------------------------------------------------


def test_a_buy_fills_when_a_later_candle_trades_below_its_price():
    b = book()
    b.add(buy(price=0.099), T0)
    (fill,) = b.match(candle(T0, 0.0989999, 0.1))
    assert fill == Fill("b1", "P1", BUY, 0.099, 200.0, pytest.approx(0.0495), T0 + 60)
    assert b.orders == {}


def test_a_sell_fills_when_a_later_candle_trades_above_its_price():
    b = book()
    b.add(sell(price=0.101), T0)
    (fill,) = b.match(candle(T0, 0.1, 0.1010001))
    assert (fill.side, fill.price, fill.volume, fill.ts) == (SELL, 0.101, 200.0, T0 + 60)
    assert fill.fee == pytest.approx(0.101 * 200 * 0.0025)


def test_touching_the_price_does_not_fill():
    b = book()
    b.add(buy(price=0.099), T0)
    b.add(sell(price=0.101), T0)
    assert b.match(candle(T0, 0.099, 0.101)) == []
    assert set(b.orders) == {"b1", "s1"}


def test_a_candle_that_opened_before_the_order_was_placed_does_not_fill_it():
    b = book()
    b.add(buy(price=0.099), T0 + 30)
    assert b.match(candle(T0, 0.09, 0.1)) == []  # its low may have come before the order existed
    assert len(b.match(candle(T0 + 60, 0.09, 0.1))) == 1


def test_a_candle_opening_as_the_order_is_placed_fills_it():
    b = book()
    b.add(buy(price=0.099), T0)
    assert len(b.match(candle(T0, 0.09, 0.1))) == 1


def test_matching_moves_the_last_price_to_the_close():
    b = book()
    b.match(candle(T0, 0.09, 0.11, close=0.1003))
    assert b.last_price == 0.1003


# balances -----------------------------------------------------------------------------


def test_a_buy_fill_pays_cost_and_maker_fee_in_quote():
    b = book(quote=1000.0, base=10_000.0)
    b.add(buy(price=0.099, volume=200.0), T0)
    b.match(candle(T0, 0.09, 0.1))
    # cost 19.8, fee 19.8 x 0.25% = 0.0495
    assert b.quote == pytest.approx(1000.0 - 19.8 - 0.0495, abs=1e-12)
    assert b.base == pytest.approx(10_200.0, abs=1e-12)


def test_a_sell_fill_receives_cost_less_the_maker_fee():
    b = book(quote=1000.0, base=10_000.0)
    b.add(sell(price=0.101, volume=200.0), T0)
    b.match(candle(T0, 0.1, 0.11))
    # proceeds 20.2, fee 0.0505
    assert b.quote == pytest.approx(1000.0 + 20.2 - 0.0505, abs=1e-12)
    assert b.base == pytest.approx(9800.0, abs=1e-12)


def test_open_orders_reserve_what_they_may_spend():
    b = book(quote=100.0, base=1000.0)
    b.add(buy("b1", 0.099, 200.0), T0)
    b.add(buy("b2", 0.098, 300.0), T0)
    b.add(sell("s1", 0.101, 250.0), T0)
    assert b.reserved() == Balances(pytest.approx((19.8 + 29.4) * 1.0025), 250.0)
    assert b.free() == Balances(pytest.approx(100.0 - 49.2 * 1.0025), 750.0)


def test_balances_cannot_be_negative_at_the_start():
    with pytest.raises(ValueError):
        PaperBook(RULES, quote=-1.0, base=0.0)


# refusals -----------------------------------------------------------------------------


def test_post_only_refuses_an_order_that_would_take_at_the_last_price():
    b = book()
    b.match(candle(T0, 0.0995, 0.1005, close=0.1))
    assert refusal(b, buy(price=0.1)) == "post_only"
    assert refusal(b, buy(price=0.1000001)) == "post_only"
    assert refusal(b, sell(price=0.1)) == "post_only"
    assert refusal(b, sell(price=0.0999999)) == "post_only"
    b.add(buy(price=0.0999999), T0)
    b.add(sell(price=0.1000001), T0)
    assert set(b.orders) == {"b1", "s1"}


def test_orders_below_the_minimums_are_refused():
    b = book()
    assert refusal(b, buy(volume=49.99999999)) == "minimum"  # ordermin 50 DOGE
    assert refusal(b, buy(price=0.0099, volume=50.0)) == "minimum"  # 0.495 USD < costmin 0.5
    b.add(buy(price=0.01, volume=50.0), T0)  # exactly both minimums


def test_orders_off_the_pairs_precision_are_refused():
    b = book()
    assert refusal(b, buy(price=0.09912345)) == "precision"  # 8 price decimals, 7 allowed
    assert refusal(b, buy(volume=200.000000001)) == "precision"  # 9 lot decimals, 8 allowed


def test_orders_the_free_balance_cannot_cover_are_refused():
    b = book(quote=20.0, base=300.0)
    assert refusal(b, buy(price=0.1, volume=200.0)) == "funds"  # 20 + 0.05 fee > 20
    b.add(buy("b1", 0.099, 200.0), T0)  # 19.8495 of 20
    assert refusal(b, buy("b2", 0.01, 50.0)) == "funds"  # 0.50125 > 0.1505 free
    b.add(sell("s1", 0.101, 200.0), T0)
    assert refusal(b, sell("s2", 0.101, 100.00000001)) == "funds"
    b.add(sell("s2", 0.101, 100.0), T0)  # the last of the base


def test_malformed_orders_are_refused():
    b = book()
    assert refusal(b, OrderRequest("x", "hold", 0.1, 100.0)) == "other"
    assert refusal(b, buy(price=0.0)) == "other"
    assert refusal(b, buy(volume=-5.0)) == "other"
    b.add(buy("b1"), T0)
    assert refusal(b, buy("b1", price=0.098)) == "other"  # the id is taken


# cancel and the exchange adapter ------------------------------------------------------


def test_cancel_removes_the_order_and_releases_its_reservation():
    ex = PaperExchange(RULES, quote=1000.0, base=10_000.0)
    assert ex.place(buy("b1"), T0) == "P1"
    assert ex.place(sell("s1"), T0) == "P2"
    assert ex.cancel("b1", T0 + 1) is None
    assert set(ex.open_orders()) == {"s1"}
    assert ex.book.reserved() == Balances(0.0, 200.0)
    assert ex.poll_fills(T0 + 120, candle(T0 + 60, 0.05, 0.099)) == []  # the cancelled buy is gone
    assert ex.balances() == Balances(1000.0, 10_000.0)
    assert ex.cancel("nothing", T0) is None


def test_the_exchange_fills_only_against_the_candle_it_is_shown():
    ex = PaperExchange(RULES, quote=1000.0, base=10_000.0)
    ex.place(buy("b1", 0.099), T0)
    assert ex.poll_fills(T0 + 60, None) == []
    (fill,) = ex.poll_fills(T0 + 60, candle(T0, 0.098, 0.1))
    assert fill.client_id == "b1" and fill.txid == "P1"
    assert ex.open_orders() == {}
    assert ex.lookup(["b1"]) == {"b1": None}


def test_open_orders_is_a_copy():
    ex = PaperExchange(RULES, quote=1000.0, base=10_000.0)
    ex.place(buy("b1"), T0)
    ex.open_orders().clear()
    assert set(ex.open_orders()) == {"b1"}


# persistence --------------------------------------------------------------------------


def test_to_dict_and_restore_round_trip():
    b = book()
    b.add(buy("b1", 0.099, 200.0), T0)
    b.add(sell("s1", 0.101, 300.0), T0 + 5)
    b.match(candle(T0 + 60, 0.0995, 0.1005, close=0.1001))
    data = json.loads(json.dumps(b.to_dict()))

    other = book(quote=1.0, base=1.0)
    other.restore(data)
    assert (other.quote, other.base, other.last_price) == (b.quote, b.base, 0.1001)
    assert other.orders == b.orders
    assert other.add(buy("b2", 0.098), T0).txid == b.add(buy("b2", 0.098), T0).txid == "P3"


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda d: d.pop("orders"), KeyError),
        (lambda d: d["orders"][0].update(colour="red"), TypeError),
        (lambda d: d.update(quote=-0.01), ValueError),
        (lambda d: d.update(base="lots"), ValueError),
    ],
)
def test_restore_refuses_a_bad_record_and_keeps_the_book(spoil, error):
    b = book()
    b.add(buy("b1"), T0)
    data = b.to_dict()
    spoil(data)
    other = book(quote=7.0, base=8.0)
    with pytest.raises(error):
        other.restore(data)
    assert (other.quote, other.base, other.orders) == (7.0, 8.0, {})


# the factory --------------------------------------------------------------------------


def test_the_factory_splits_the_start_funds_at_the_first_price():
    make = paper_exchange_factory(RULES, start_quote=1000.0, base_share=0.25)
    ex = make(0.12345)
    bal = ex.balances()
    assert bal.base == RULES.round_volume(250.0 / 0.12345) == 2025.11138112
    assert bal.quote == pytest.approx(1000.0 - 2025.11138112 * 0.12345, abs=1e-12)
    assert bal.quote + bal.base * 0.12345 == pytest.approx(1000.0, abs=1e-9)
    assert ex.open_orders() == {} and ex.rules is RULES


@pytest.mark.parametrize("share, quote, base", [(0.0, 1000.0, 0.0), (1.0, 0.0, 10_000.0)])
def test_the_factory_at_the_extreme_shares(share, quote, base):
    bal = paper_exchange_factory(RULES, start_quote=1000.0, base_share=share)(0.1).balances()
    assert bal == Balances(pytest.approx(quote, abs=1e-9), base)


def test_the_factory_never_starts_with_a_negative_balance():
    # 2919.40799077 DOGE x 0.3425352 comes out 1.1e-13 above 1000 in floating point
    bal = paper_exchange_factory(RULES, start_quote=1000.0, base_share=1.0)(0.3425352).balances()
    assert bal == Balances(0.0, 2919.40799077)
