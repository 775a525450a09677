from collections import Counter
from itertools import pairwise

from candles import aggregate, candle_problem
from clock import SimClock
from market.sim import SimulatedMarket, generate
from vocabulary import REGIMES

START = 1_767_225_600


def test_generation_is_seeded_and_valid():
    a, la = generate(3000, seed=5)
    b, lb = generate(3000, seed=5)
    c, _ = generate(3000, seed=6)
    assert a == b and la == lb
    assert a != c
    assert all(candle_problem(x) is None for x in a)
    assert [x.time for x in a] == [START + 60 * i for i in range(3000)]
    assert set(la) <= set(REGIMES)


def test_every_regime_appears_and_regimes_persist():
    _, labels = generate(20_000, seed=3)
    counts = Counter(labels)
    assert set(counts) == set(REGIMES)
    switches = sum(1 for x, y in pairwise(labels) if x != y)
    assert 20_000 / switches > 100  # regimes last hours, not minutes


def test_market_serves_a_kraken_like_window_at_start():
    clock = SimClock(START)
    market = SimulatedMarket(clock, seed=1, start=START)
    one = market.fetch_ohlc(1)
    fifteen = market.fetch_ohlc(15)
    assert len(one.closed) == 720 and len(fifteen.closed) == 720
    assert one.closed[-1].time + 60 <= START and fifteen.closed[-1].time + 900 <= START
    assert one.forming.time == START
    assert one.last == one.closed[-1].time == START - 60


def test_only_closed_candles_are_served_and_since_filters():
    clock = SimClock(START)
    market = SimulatedMarket(clock, seed=1, start=START)
    newest = market.fetch_ohlc(1).closed[-1].time
    clock.advance(150)  # two more minutes closed, the third forming
    page = market.fetch_ohlc(1, since=newest)
    assert [c.time for c in page.closed] == [START, START + 60]
    assert page.forming.time == START + 120
    assert page.forming.open <= page.forming.high and page.forming.low <= page.forming.close


def test_candles_do_not_depend_on_how_the_clock_moves():
    fast_clock, slow_clock = SimClock(START), SimClock(START)
    fast = SimulatedMarket(fast_clock, seed=9, start=START)
    slow = SimulatedMarket(slow_clock, seed=9, start=START)
    fast_clock.advance(6 * 3600)
    for _ in range(6 * 3600 // 15):
        slow_clock.advance(15)
        slow.fetch_ohlc(1)
    assert fast.fetch_ohlc(1).closed == slow.fetch_ohlc(1).closed
    assert fast.fetch_ohlc(15).closed == slow.fetch_ohlc(15).closed


def test_fifteen_minute_candles_aggregate_the_one_minute_ones():
    clock = SimClock(START)
    market = SimulatedMarket(clock, seed=2, start=START)
    clock.advance(3 * 3600)
    one = market.fetch_ohlc(1).closed
    fifteen = market.fetch_ohlc(15).closed
    expected = aggregate(one, 15, closed_before=clock.now())
    assert fifteen[-len(expected) + 1 :] == expected[1:]  # the first bucket of the window may be partial


def test_ground_truth_is_exposed_per_candle():
    clock = SimClock(START)
    market = SimulatedMarket(clock, seed=4, start=START)
    clock.advance(600)
    page = market.fetch_ohlc(1)
    assert market.truth(page.closed[-1].time) in REGIMES
    assert market.current_truth() == market.truth(page.closed[-1].time)
    assert market.truth(START + 10**6) is None
    _, labels = generate(720 * 15 + 10, seed=4, start=START - 720 * 15 * 60)
    assert market.truth(START) == labels[720 * 15]
