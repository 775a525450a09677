"""The built-in table of Kraken pair rules, file-name pairs, derived rules and the replay's choice (pure)."""

import math
from dataclasses import replace

import pytest
from conftest import make_settings

from candles import Candle
from errors import BadData, ConfigError
from grid.exchange import PairRules
from kraken import pair_rules
from kraken.pair_rules import (
    KNOWN_PAIRS,
    derived_pair_name,
    derived_rules,
    kraken_table_rules,
    lookup,
    pair_from_filename,
    replay_pair,
    round_number_below,
    rules_problem,
    sim_pair,
    split_usd,
)
from market.sim import SimParams
from vocabulary import BUY, SELL

ORDER_USD = 20.0  # the default GRID_ORDER_USD
ENTRY_PCT = 0.35  # the default GRID_ENTRY_PCT: the grid's nearest entry, percent from the price


def candles_at(prices: list[float]) -> list[Candle]:
    return [Candle(60 * i, p, p * 1.001, p * 0.999, p, 10.0) for i, p in enumerate(prices)]


def grid_can_trade(rules: PairRules, price: float) -> None:
    """An entry of ORDER_USD one grid step away is a valid order, on a tick distinct from the price."""
    for side, step in ((BUY, -1), (SELL, 1)):
        entry = rules.round_price(price * (1 + step * ENTRY_PCT / 100), side)
        assert entry != rules.round_price(price, side)
        volume = rules.round_volume(ORDER_USD / entry)
        assert rules.size_problem(entry, volume) is None, (rules.pair, price)


# The table --------------------------------------------------------------------------------


def test_the_table_is_well_formed_and_every_entry_trades_at_its_typical_price() -> None:
    names = [n for kp in KNOWN_PAIRS for n in {kp.altname, kp.name}]
    assert len(names) == len(set(names))
    for kp in KNOWN_PAIRS:
        assert kp.altname.isalnum() and kp.altname.endswith("USD") and kp.quote == "USD"
        assert kp.price_decimals >= 0 and kp.lot_decimals == 8
        assert kp.ordermin > 0 and kp.costmin == 0.5 and kp.maker_fee_pct == 0.25
        rules = kp.rules()
        assert (rules.pair, rules.base_asset, rules.quote_asset) == (kp.altname, kp.base, "USD")
        p = kp.typical_price
        assert rules_problem(rules, p, ORDER_USD, min_price=p) is None, kp.altname
        assert kp.ordermin * p <= 0.8 * ORDER_USD, f"{kp.altname}: a minimum near GRID_ORDER_USD leaves no room"
        grid_can_trade(rules, p)


def test_the_table_holds_krakens_values_for_the_pairs_in_the_issue() -> None:
    expected = {  # altname: (entry name, base, price decimals, ordermin)
        "XBTUSD": ("XXBTZUSD", "BTC", 1, 0.00005),
        "ETHUSD": ("XETHZUSD", "ETH", 2, 0.002),
        "SOLUSD": ("SOLUSD", "SOL", 2, 0.06),
        "XDGUSD": ("XDGUSD", "DOGE", 7, 50.0),
        "XRPUSD": ("XXRPZUSD", "XRP", 5, 1.65),
        "LTCUSD": ("XLTCZUSD", "LTC", 2, 0.1),
        "LINKUSD": ("LINKUSD", "LINK", 5, 0.55),
        "DOTUSD": ("DOTUSD", "DOT", 4, 3.9),
        "ATOMUSD": ("ATOMUSD", "ATOM", 4, 1.0),
        "ADAUSD": ("ADAUSD", "ADA", 6, 20.0),
        "AVAXUSD": ("AVAXUSD", "AVAX", 4, 0.5),
        "POLUSD": ("POLUSD", "POL", 6, 10.0),
        "MATICUSD": ("MATICUSD", "MATIC", 6, 10.0),
    }
    for altname, (name, base, decimals, ordermin) in expected.items():
        kp = lookup(altname)
        assert kp is not None and (kp.name, kp.base, kp.price_decimals, kp.ordermin) == (
            name, base, decimals, ordermin,
        ), altname  # fmt: skip
    # The default pair's rules are exactly the paper exchange's historical defaults.
    assert lookup("XDGUSD").rules() == PairRules()
    # MATIC became POL 1:1: its (historical) files trade under POL's rules, but Kraken no longer lists it.
    matic, pol = lookup("MATICUSD"), lookup("POLUSD")
    assert replace(matic.rules(), pair="POLUSD", base_asset="POL") == pol.rules()
    assert not matic.listed and pol.listed


def test_lookup_takes_krakens_names_and_everyday_ones() -> None:
    for name in ("XBTUSD", "xxbtzusd", "BTCUSD", "btc/usdt", "XBT-USDC", "BTC_USD"):
        assert lookup(name).altname == "XBTUSD", name
    assert lookup("DOGEUSDT").altname == "XDGUSD"
    assert lookup("XRPUSD").altname == lookup("XXRPZUSD").altname == "XRPUSD"
    for name in ("XBTEUR", "SHIBUSD", "BTC", "", "ETHXBT"):
        assert lookup(name) is None, name


def test_paper_fallback_takes_only_the_name_kraken_trades_under() -> None:
    assert kraken_table_rules("XBTUSD") == lookup("XBTUSD").rules()
    assert kraken_table_rules("XXBTZUSD") == lookup("XBTUSD").rules("XXBTZUSD")
    assert kraken_table_rules("XBTUSDT") is None  # another Kraken pair, with its own rules
    assert kraken_table_rules("MATICUSD") is None  # delisted
    assert kraken_table_rules("NOPEUSD") is None


# File names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pair"),
    [
        ("BTCUSDT_1m.csv", "XBTUSD"),
        ("XBTUSD-2023.csv", "XBTUSD"),
        ("DOGEUSD_2023_04.csv", "XDGUSD"),
        ("dogeusdt_1m.csv", "XDGUSD"),
        ("ETH-USD_1m.csv", "ETHUSD"),
        ("ETH_USDT_1m.csv", "ETHUSD"),
        ("eth usdc.csv", "ETHUSD"),
        ("ADAUSDT_1m.csv", "ADAUSD"),
        ("MATICUSDT_1m.csv", "MATICUSD"),
        ("LINKUSDT_15m.csv", "LINKUSD"),
        ("XXBTZUSD.csv", "XBTUSD"),
        ("/some/dir/SOLUSD1m.csv", "SOLUSD"),
        ("BTCUSD", "XBTUSD"),
    ],
)
def test_pair_from_filename(name: str, pair: str) -> None:
    assert pair_from_filename(name) == pair


@pytest.mark.parametrize(
    "name",
    [
        "SHIBUSDT_1m.csv",  # not in the table
        "BTC_1m.csv",  # no quote
        "BTCEUR_1m.csv",  # not USD
        "BTCUSDX.csv",  # the quote runs on into letters
        "ETHBTC.csv",
        "my_btcusdt.csv",  # does not start with the pair
        "USDTBTC.csv",
        "ADA.csv",
        "DOTUSDTT.csv",
        "candles.csv",
        "",
    ],
)
def test_pair_from_filename_negatives(name: str) -> None:
    assert pair_from_filename(name) is None


def test_derived_pair_names_are_the_file_names_leading_letters_and_digits() -> None:
    assert derived_pair_name("/data/shibusdt_1m.csv") == "SHIBUSDT"
    assert derived_pair_name("2023 candles.csv") == "2023"
    assert derived_pair_name("my-data.csv") == "MY"
    assert derived_pair_name("_odd.csv") == "REPLAY"
    assert derived_pair_name("éé.csv") == "REPLAY"  # PAIR must stay ASCII letters and digits
    assert split_usd("SHIBUSDT") == ("SHIB", "USD") and split_usd("MY") == ("MY", "USD")


# Derived rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "decimals", "ordermin"),
    [
        (20_000.0, 1, 0.0002),  # BTC
        (1_800.0, 2, 0.002),  # ETH
        (0.08, 7, 50.0),  # DOGE
        (0.00001, 10, 500_000.0),  # SHIB-like
        (100_000.0, 0, 0.00005),
        (3.0, 5, 1.0),
    ],
)
def test_derived_rules_on_price_scales_trade_a_20_usd_order(price: float, decimals: int, ordermin: float) -> None:
    rules = derived_rules("TESTUSD", price, price, 0.26)
    assert (rules.price_decimals, rules.lot_decimals, rules.ordermin, rules.costmin) == (decimals, 8, ordermin, 0.5)
    assert (rules.base_asset, rules.quote_asset, rules.maker_fee_pct) == ("TEST", "USD", 0.26)
    assert rules.ordermin * price <= 5.0
    assert rules_problem(rules, price, ORDER_USD, min_price=price) is None
    grid_can_trade(rules, price)
    tick_share = 10.0**-decimals / price
    assert tick_share <= 1e-5 or decimals == 0


def test_the_derived_minimum_holds_at_the_files_highest_price() -> None:
    rules = derived_rules("MOONUSD", 1.0, 10.0, 0.25)  # a tenfold rally in the file
    assert rules.price_decimals == 5 and rules.ordermin == 0.5
    assert rules_problem(rules, 10.0, ORDER_USD, min_price=0.5) is None
    with pytest.raises(ValueError):
        derived_rules("X", 0.0, 1.0, 0.25)


def test_round_numbers_below() -> None:
    assert [round_number_below(v) for v in (62.5, 2.5e-4, 1.0, 0.99, 9.9, 4.5e-5)] == [50, 2e-4, 1, 0.5, 5, 2e-5]


def test_the_derived_rule_lands_near_krakens_values_for_every_sourced_pair() -> None:
    """How close :func:`derived_rules` comes to the table, at each pair's typical price (see the README)."""
    unsourced = {"AVAXUSD", "POLUSD", "MATICUSD"}  # their missing values were derived in the first place
    decimal_gaps, ratios = {}, {}
    for kp in KNOWN_PAIRS:
        if kp.altname in unsourced:
            continue
        derived = derived_rules(kp.altname, kp.typical_price, kp.typical_price, 0.25)
        decimal_gaps[kp.altname] = derived.price_decimals - kp.price_decimals
        ratios[kp.altname] = kp.ordermin / derived.ordermin
    assert all(-1 <= gap <= 2 for gap in decimal_gaps.values()), decimal_gaps
    assert sum(abs(gap) <= 1 for gap in decimal_gaps.values()) >= 12, decimal_gaps
    assert sum(gap < 0 for gap in decimal_gaps.values()) <= 1, decimal_gaps  # coarser than Kraken: rarely
    assert all(0.8 <= r <= 4.0 for r in ratios.values()), ratios
    assert decimal_gaps["XBTUSD"] == decimal_gaps["XDGUSD"] == decimal_gaps["ETHUSD"] == 0


# Rules that cannot trade ------------------------------------------------------------------------


def test_rules_problem_catches_a_minimum_above_the_order_size() -> None:
    doge = lookup("XDGUSD").rules()
    assert rules_problem(doge, 0.1, 20.0) is None
    problem = rules_problem(doge, 0.5, 20.0)  # 50 DOGE at 0.5 USD is 25 USD
    assert problem is not None
    assert "50 DOGE" in problem and "25.00 USD" in problem and "GRID_ORDER_USD=20" in problem
    assert "at least 25.25" in problem
    assert rules_problem(doge, 0.1, 4.0) is not None  # 5 USD at 0.1
    assert rules_problem(replace(doge, ordermin=0.0), 0.1, 0.4) is not None  # costmin 0.5 USD


def test_rules_problem_catches_a_tick_too_coarse_for_the_price() -> None:
    btc = lookup("XBTUSD").rules()
    problem = rules_problem(btc, 0.1, 20.0, min_price=0.07)
    assert problem is not None and "tick 0.1" in problem and "lowest price 0.07" in problem
    assert rules_problem(btc, 21_000.0, 20.0, min_price=19_000.0) is None


# The replay's choice ------------------------------------------------------------------------------

SETTINGS = make_settings()


def test_replay_pair_from_the_file_name() -> None:
    resolved = replay_pair("data/BTCUSDT_1m.csv", candles_at([20_000.0, 21_000.0]), None, SETTINGS)
    assert resolved == ("XBTUSD", lookup("XBTUSD").rules(), "file name")


def test_replay_pair_derives_rules_for_an_unknown_file() -> None:
    resolved = replay_pair("shib.csv", candles_at([0.00001, 0.000012, 0.000011]), None, SETTINGS)
    assert resolved.pair == "SHIB" and resolved.source == "price scale"
    assert resolved.rules == derived_rules("SHIB", 0.000011, 0.000012 * 1.001, SETTINGS.GRID_MAKER_FEE_PCT)
    fee = replay_pair("shib.csv", candles_at([0.00001]), None, make_settings(GRID_MAKER_FEE_PCT=0.1)).rules
    assert fee.maker_fee_pct == 0.1  # the setting applies to derived rules only ...
    known = replay_pair("XBTUSD.csv", candles_at([20_000.0]), None, make_settings(GRID_MAKER_FEE_PCT=0.1)).rules
    assert known.maker_fee_pct == 0.25  # ... a known pair pays Kraken's


def test_an_explicit_pair_wins_over_the_file_name() -> None:
    resolved = replay_pair("BTCUSDT_1m.csv", candles_at([0.08, 0.09]), "dogeusdt", SETTINGS)
    assert resolved == ("XDGUSD", lookup("XDGUSD").rules(), "--pair")
    with pytest.raises(ConfigError, match="--pair NOPEUSD is not in the built-in table"):
        replay_pair("BTCUSDT_1m.csv", candles_at([20_000.0]), "NOPEUSD", SETTINGS)


def test_rules_that_cannot_trade_the_file_are_an_error_naming_it() -> None:
    with pytest.raises(BadData, match=r"^data/DOTUSDT_1m.csv: DOTUSD \(file name\) cannot trade this file"):
        replay_pair("data/DOTUSDT_1m.csv", candles_at([6.0, 8.0]), None, SETTINGS)  # 3.9 DOT is 31 USD at 8
    with pytest.raises(BadData, match=r"^BTCUSDT_1m.csv: XDGUSD \(--pair\) cannot trade this file: .*tick"):
        replay_pair("BTCUSDT_1m.csv", candles_at([0.5e-5, 0.6e-5]), "XDGUSD", SETTINGS)
    with pytest.raises(BadData, match="GRID_ORDER_USD=2"):
        replay_pair("x.csv", candles_at([0.08]), None, make_settings(GRID_ORDER_USD=2))
    with pytest.raises(BadData, match="no candles"):
        replay_pair("x.csv", [], None, SETTINGS)


# The simulator ------------------------------------------------------------------------------------


def test_the_simulator_runs_a_known_pair_at_its_scale_and_the_default_unchanged() -> None:
    default = SimParams()
    rules, start = sim_pair("XDGUSD", default.start_price, 0.25)
    assert (rules, start) == (PairRules(), default.start_price)
    assert rules.price_decimals == default.price_decimals  # so `--market sim` is what it always was
    rules, start = sim_pair("XBTUSD", default.start_price, 0.25)
    assert rules == lookup("XBTUSD").rules() and start == lookup("XBTUSD").typical_price
    rules, start = sim_pair("FOOUSD", default.start_price, 0.3)
    assert rules == derived_rules("FOOUSD", default.start_price, default.start_price, 0.3)
    assert (rules.price_decimals, rules.ordermin, rules.maker_fee_pct, start) == (7, 50.0, 0.3, 0.08)


def test_typical_prices_are_positive_and_finite() -> None:
    assert all(math.isfinite(kp.typical_price) and kp.typical_price > 0 for kp in pair_rules.KNOWN_PAIRS)
