"""Which order rules a pair trades under when Kraken is not asked (pure: no I/O, no network).

Paper and live mode read a pair's rules from Kraken's public ``AssetPairs``
(:mod:`kraken_client`). Everywhere Kraken cannot be asked, the rules come from
here:

- :data:`KNOWN_PAIRS`, a built-in table of Kraken's rules for common USD pairs
  (a replay, ``--market sim``, and paper mode while Kraken is unreachable);
- :func:`derived_rules`, for a replayed file whose pair is not in the table:
  rules made from the file's price scale by one rule (below).

:func:`replay_pair` is the whole decision for one replayed file; its rules must
be able to trade the file (:func:`rules_problem`), else the replay stops with a
message naming the file rather than running a grid that places no order.

The derivation, for a file whose typical (median) close is ``P`` and whose
highest price is ``H``:

- price decimals ``5 - floor(log10 P)`` (at least 0): the price keeps six
  significant digits, so the tick is 0.0001 % to 0.001 % of ``P``;
- lot decimals 8;
- ``ordermin``: the largest 1, 2 or 5 times a power of ten (in the base asset)
  that is worth at most 5 USD at ``H``, so the minimum never exceeds 5 USD
  anywhere in the file;
- ``costmin`` 0.5 USD, as on every Kraken USD pair in the table;
- maker fee: the ``GRID_MAKER_FEE_PCT`` setting.

Against the table's 14 sourced pairs, at each pair's typical price, the
derived price decimals equal Kraken's for 5 (XBT, ETH, XDG, ADA, XRP), are one
finer for 6, two finer for 2 (LTC, UNI) and one coarser for 1 (LINK); the
derived minimum is 1 to 3.9 times smaller than Kraken's (XRP's 1.2 times
larger). ``tests/test_pair_rules.py`` keeps that comparison honest.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from candles import Candle
from config import Settings
from errors import BadData, ConfigError
from grid.exchange import PairRules

KRAKEN_MAKER_FEE_PCT = 0.25  # Kraken spot, first maker tier (30-day volume under 10,000 USD)
DERIVED_LOT_DECIMALS = 8
DERIVED_COSTMIN = 0.5
DERIVED_MIN_ORDER_USD = 5.0
MAX_TICK_SHARE = 0.001  # a tick above 0.1 % of the price leaves the grid no room to space its orders
FILE_QUOTES = ("USDT", "USDC", "USD")  # in a file name, USDT and USDC count as USD
_SEPARATORS = ("", "-", "_", "/", " ")
_LEADING_NAME = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class KnownPair:
    """One row of the table: Kraken's names and rules for a USD pair."""

    altname: str  # Kraken's altname, the PAIR setting (XBTUSD)
    name: str  # the key of Kraken's AssetPairs entry (XXBTZUSD)
    base: str  # display name of the base asset (BTC)
    price_decimals: int  # AssetPairs pair_decimals
    lot_decimals: int
    ordermin: float  # in the base asset
    costmin: float  # in USD
    typical_price: float  # USD; where the row was checked, and the simulator's start for this pair
    symbols: tuple[str, ...] = ()  # other names of the base asset in file names (BTC for XBT)
    listed: bool = True  # still traded on Kraken
    maker_fee_pct: float = KRAKEN_MAKER_FEE_PCT
    quote: str = "USD"

    def rules(self, pair: str | None = None) -> PairRules:
        return PairRules(
            pair=pair or self.altname,
            base_asset=self.base,
            quote_asset=self.quote,
            price_decimals=self.price_decimals,
            lot_decimals=self.lot_decimals,
            ordermin=self.ordermin,
            costmin=self.costmin,
            maker_fee_pct=self.maker_fee_pct,
        )

    @property
    def base_symbols(self) -> tuple[str, ...]:
        kraken_base = self.altname[: -len(self.quote)]
        return tuple(dict.fromkeys((kraken_base, self.base, *self.symbols)))


# Kraken's rules for common USD pairs. Where each value comes from (no live call was
# possible while writing this; the sources are public captures of AssetPairs answers):
#   [A] Kraken's own example answer, krakenfx/api-specs
#       spot-rest/examples/responses/public/assets/pairs.yaml (XXBTZUSD: pair_decimals 1,
#       lot_decimals 8, costmin 0.5; its ordermin 0.0001 and 0.16 % maker fee are older).
#   [B] Test fixtures holding recorded AssetPairs entries, 2025-2026: samuel-fonseca/driftwatch
#       (XXBTZUSD 1/8/0.00005/0.5 and XETHZUSD 2/8/0.002/0.5, fees_maker [[0, 0.25]]); a C#
#       fixture "recorded from the live venue" on 2026-09-25 (XXBTZUSD 1/8/0.00005/0.5,
#       XDGUSD 7/8/50/0.5, SOLUSD 2/8/0.06/0.5); a C++ capture of 2026-09-16 (XBTUSD
#       ordermin 0.00005, ETHUSD 2/8/0.002/0.5).
#   [C] A bot's pair list with ordermin and costmin "live-verified 2026-07-03": XRP 1.65,
#       LTC 0.1, LINK 0.55, ADA 20, AVAX 0.5, DOT 3.9, BCH 0.01, UNI 1.5, AAVE 0.05, ALGO 41;
#       costmin 0.5 on all of them.
#   [D] A Kraken security list "last updated 2021-02-07" (Weeeeeezy/alg,
#       UHFTCore/Venues/KrakenSpot/SecDefs.cpp): price ticks of ADA/USD 1e-6, XRP/USD 1e-5,
#       LTC/USD 1e-2, LINK/USD 1e-5, DOT/USD 1e-4, ATOM/USD 1e-4, BCH/USD 1e-2, UNI/USD 1e-3,
#       AAVE/USD 1e-2, ALGO/USD 1e-5, and ATOM's minimum of 1 (the only source for ATOM).
#   [E] Fee schedules captured from AssetPairs in 2025-2026: fees_maker starts
#       [[0, 0.25], [10000, 0.2], ...] (Kraken's fees since late 2023; older captures show 0.16).
#   [F] A recorded catalog showing MATICUSD "delisted" and POLUSD "online": Polygon's MATIC
#       became POL 1:1 in September 2024.
# Not found in any source, chosen by this module's derivation (marked "derived" below):
# AVAXUSD's price decimals, and POLUSD's (and so MATICUSD's) decimals and minimum.
# lot_decimals 8 is sourced for XBT, ETH, XDG and SOL [B] and taken for the others (Kraken's
# USDT pairs of ADA, LTC and XRP use 8 too). The typical prices are round figures within
# each pair's 2023-2025 range; XDG's is the simulator's default start, 0.08.
KNOWN_PAIRS: tuple[KnownPair, ...] = (
    KnownPair("XBTUSD", "XXBTZUSD", "BTC", 1, 8, 0.00005, 0.5, 60_000.0, symbols=("BTC",)),  # [A][B]
    KnownPair("ETHUSD", "XETHZUSD", "ETH", 2, 8, 0.002, 0.5, 3_000.0),  # [B]
    KnownPair("SOLUSD", "SOLUSD", "SOL", 2, 8, 0.06, 0.5, 150.0),  # [B][C]
    KnownPair("XDGUSD", "XDGUSD", "DOGE", 7, 8, 50.0, 0.5, 0.08, symbols=("DOGE",)),  # [B][C][D]
    KnownPair("ADAUSD", "ADAUSD", "ADA", 6, 8, 20.0, 0.5, 0.5),  # [C][D]
    KnownPair("XRPUSD", "XXRPZUSD", "XRP", 5, 8, 1.65, 0.5, 2.0),  # [C][D]
    KnownPair("LTCUSD", "XLTCZUSD", "LTC", 2, 8, 0.1, 0.5, 90.0),  # [C][D]
    KnownPair("LINKUSD", "LINKUSD", "LINK", 5, 8, 0.55, 0.5, 15.0),  # [C][D]
    KnownPair("DOTUSD", "DOTUSD", "DOT", 4, 8, 3.9, 0.5, 4.0),  # [C][D]
    KnownPair("ATOMUSD", "ATOMUSD", "ATOM", 4, 8, 1.0, 0.5, 5.0),  # [D] (minimum as of 2021)
    KnownPair("AVAXUSD", "AVAXUSD", "AVAX", 4, 8, 0.5, 0.5, 25.0),  # [C]; decimals derived
    KnownPair("POLUSD", "POLUSD", "POL", 6, 8, 10.0, 0.5, 0.4),  # [F]; decimals and minimum derived
    # MATIC (delisted on Kraken) is POL before the 1:1 swap: its files trade under POL's rules.
    KnownPair("MATICUSD", "MATICUSD", "MATIC", 6, 8, 10.0, 0.5, 0.4, listed=False),  # [F]; derived
    KnownPair("BCHUSD", "BCHUSD", "BCH", 2, 8, 0.01, 0.5, 400.0),  # [C][D]
    KnownPair("UNIUSD", "UNIUSD", "UNI", 3, 8, 1.5, 0.5, 8.0),  # [C][D]
    KnownPair("AAVEUSD", "AAVEUSD", "AAVE", 2, 8, 0.05, 0.5, 200.0),  # [C][D]
    KnownPair("ALGOUSD", "ALGOUSD", "ALGO", 5, 8, 41.0, 0.5, 0.2),  # [C][D]
)
_BY_NAME = {n: kp for kp in KNOWN_PAIRS for n in (kp.altname, kp.name)}


def lookup(pair: str) -> KnownPair | None:
    """The table's row for ``pair``: Kraken's altname or entry name, or a base and a USD quote.

    Case and separators do not matter, BTC is XBT and DOGE is XDG, and USDT and
    USDC count as USD: ``XBTUSD``, ``XXBTZUSD``, ``btc/usdt`` and ``DOGE-USD`` all match.
    """
    key = re.sub(r"[-_/ ]", "", pair.strip()).upper()
    if key in _BY_NAME:
        return _BY_NAME[key]
    for kp in KNOWN_PAIRS:
        if any(key == base + quote for base in kp.base_symbols for quote in FILE_QUOTES):
            return kp
    return None


def kraken_table_rules(pair: str) -> PairRules | None:
    """The table's rules for ``pair`` when it is the name Kraken trades the pair under, else ``None``.

    Stricter than :func:`lookup`: this stands in for Kraken's own answer, so
    ``XBTUSDT`` (a different Kraken pair) or a delisted pair get nothing.
    """
    kp = _BY_NAME.get(pair.strip().upper())
    return kp.rules(pair) if kp is not None and kp.listed else None


def pair_from_filename(path: str | Path) -> str | None:
    """The table's altname when the file name starts with a known pair, else ``None``.

    The name (case-insensitive) must start with a base name and a USD quote,
    with or without one separator (``BTCUSDT_1m.csv``, ``XBTUSD-2023.csv``,
    ``ETH-USD_1m.csv``, ``dogeusdt_1m.csv``), or with Kraken's entry name
    (``XXBTZUSD…``); the quote must not run on into more letters (``BTCUSDX``
    is not BTC/USD).
    """
    name = Path(path).name.upper()
    candidates = [
        (base + sep + quote, kp)
        for kp in KNOWN_PAIRS
        for base in kp.base_symbols
        for quote in FILE_QUOTES
        for sep in _SEPARATORS
    ]
    candidates += [(kp.name, kp) for kp in KNOWN_PAIRS]
    for prefix, kp in sorted(candidates, key=lambda c: len(c[0]), reverse=True):
        if name.startswith(prefix) and not name[len(prefix) : len(prefix) + 1].isalpha():
            return kp.altname
    return None


def derived_rules(pair: str, typical_price: float, max_price: float, maker_fee_pct: float) -> PairRules:
    """Rules for a pair the table does not know, from its price scale (the rule in the module docstring)."""
    if not (typical_price > 0 and max_price > 0 and math.isfinite(typical_price) and math.isfinite(max_price)):
        raise ValueError(f"prices must be finite and positive, got {typical_price!r} and {max_price!r}")
    base, quote = split_usd(pair)
    return PairRules(
        pair=pair,
        base_asset=base,
        quote_asset=quote,
        price_decimals=max(0, 5 - math.floor(math.log10(typical_price))),
        lot_decimals=DERIVED_LOT_DECIMALS,
        ordermin=round_number_below(DERIVED_MIN_ORDER_USD / max_price),
        costmin=DERIVED_COSTMIN,
        maker_fee_pct=maker_fee_pct,
    )


def round_number_below(value: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``value`` (> 0)."""
    exponent = math.floor(math.log10(value))
    best = 10.0 ** (exponent - 1) * 5
    for digit in (1, 2, 5):
        candidate = float(f"{digit}e{exponent}")  # exact decimal text: 2e-05, not 1.9999999999999998e-05
        if candidate <= value * (1 + 1e-12):
            best = candidate
    return best


def split_usd(pair: str) -> tuple[str, str]:
    """``SHIBUSDT`` -> (``SHIB``, ``USD``); a name without a USD quote is all base."""
    upper = pair.upper()
    for quote in ("ZUSD", *FILE_QUOTES):
        if upper.endswith(quote) and len(upper) > len(quote):
            return upper[: -len(quote)], "USD"
    return upper, "USD"


def rules_problem(
    rules: PairRules, max_price: float, order_usd: float, *, min_price: float | None = None
) -> str | None:
    """Why ``rules`` cannot trade entries of ``order_usd`` at these prices, else ``None``.

    An entry buys ``order_usd`` worth of the base asset, so its volume is
    smallest at the highest price: there it must still meet the pair's
    minimums. At the lowest price (when given) the tick must leave the grid
    room to space its orders.
    """
    volume = rules.round_volume(order_usd / max_price)
    smallest = max(rules.ordermin * max_price, rules.costmin)
    if rules.size_problem(max_price, volume) is not None:
        return (
            f"the smallest order {rules.pair} accepts is {rules.ordermin:g} {rules.base_asset} "
            f"(and {rules.costmin:g} {rules.quote_asset}), worth {smallest:.2f} {rules.quote_asset} at the "
            f"highest price {max_price:g}: more than GRID_ORDER_USD={order_usd:g} (raise it to at least "
            f"{math.ceil(smallest * 1.01 * 100) / 100:g})"
        )
    tick = 10.0**-rules.price_decimals
    if min_price is not None and tick > min_price * MAX_TICK_SHARE:
        return (
            f"{rules.pair}'s price tick {tick:g} is more than {MAX_TICK_SHARE * 100:g} % of the lowest "
            f"price {min_price:g}: the grid cannot space its orders at this price scale"
        )
    return None


def derived_pair_name(path: str | Path) -> str:
    """A pair name for a file the table does not know: its name's leading letters and digits, upper-cased."""
    m = _LEADING_NAME.match(Path(path).name)
    return m.group(0).upper() if m else "REPLAY"


class ResolvedPair(NamedTuple):
    pair: str  # the PAIR the run uses (status, snapshot key, store)
    rules: PairRules
    source: str  # "--pair", "file name" or "price scale"


def replay_table_pair(explicit_pair: str) -> KnownPair:
    """The table's entry for a replay's ``--pair``; :class:`ConfigError` when the table does not have it."""
    kp = lookup(explicit_pair)
    if kp is None:
        known = ", ".join(k.altname for k in KNOWN_PAIRS)
        raise ConfigError(
            f"--pair {explicit_pair} is not in the built-in table of Kraken pairs, and a replay cannot ask "
            f"Kraken: use one of {known}, or leave --pair out to derive the rules from each file's prices"
        )
    return kp


def replay_pair(
    path: str | Path, candles: Sequence[Candle], explicit_pair: str | None, settings: Settings
) -> ResolvedPair:
    """The pair and rules of one replayed file.

    ``--pair`` (``explicit_pair``) when given, which must be in the table (a
    replay has no network to ask Kraken); else the pair its name starts with;
    else rules derived from its prices, under a name made from the file name.
    Raises :class:`ConfigError` for an unknown ``--pair`` and :class:`BadData`
    naming the file when the rules cannot trade its prices.
    """
    if not candles:
        raise BadData(f"{path}: no candles")
    highest = max(c.high for c in candles)
    if explicit_pair:
        kp = replay_table_pair(explicit_pair)
        resolved = ResolvedPair(kp.altname, kp.rules(), "--pair")
    elif (altname := pair_from_filename(path)) is not None:
        resolved = ResolvedPair(altname, _BY_NAME[altname].rules(), "file name")
    else:
        name = derived_pair_name(path)
        typical = statistics.median(c.close for c in candles)
        rules = derived_rules(name, typical, highest, settings.GRID_MAKER_FEE_PCT)
        resolved = ResolvedPair(name, rules, "price scale")
    problem = rules_problem(resolved.rules, highest, settings.GRID_ORDER_USD, min_price=min(c.low for c in candles))
    if problem:
        raise BadData(f"{path}: {resolved.pair} ({resolved.source}) cannot trade this file: {problem}")
    return resolved


def sim_pair(pair: str, default_start_price: float, maker_fee_pct: float) -> tuple[PairRules, float]:
    """The rules of ``--market sim`` for ``pair``, and the price the simulator should start at.

    A pair in the table trades under its rules at its typical price (so a BTC
    simulation moves at BTC's scale); any other pair under rules derived from
    the simulator's default start price.
    """
    kp = lookup(pair)
    if kp is not None:
        return kp.rules(pair), kp.typical_price
    return derived_rules(pair, default_start_price, default_start_price, maker_fee_pct), default_start_price


def describe_rules(rules: PairRules) -> str:
    """One line for the log: tick, minimums and fee."""
    return (
        f"tick {10.0**-rules.price_decimals:g} {rules.quote_asset}, lot {10.0**-rules.lot_decimals:g}, "
        f"minimum {rules.ordermin:g} {rules.base_asset} and {rules.costmin:g} {rules.quote_asset}, "
        f"maker fee {rules.maker_fee_pct:g} %"
    )


__all__ = [
    "KNOWN_PAIRS",
    "KnownPair",
    "ResolvedPair",
    "derived_pair_name",
    "derived_rules",
    "describe_rules",
    "kraken_table_rules",
    "lookup",
    "pair_from_filename",
    "replay_pair",
    "round_number_below",
    "rules_problem",
    "sim_pair",
    "split_usd",
]
