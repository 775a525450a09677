"""KrakenPublicClient against a real local HTTP fake of Kraken, plus the pure parser.

The client's ``sleep`` records every back-off and advances a simulated clock,
so no test waits on the wall clock except the timeout tests, which need a
real (short) client timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from conftest import SleepRecorder
from fake_kraken import BAD_PRICE, BAD_ROW_INDEX, AssetPair, FakeKraken

from candles import Candle, aggregate
from clock import SimClock
from errors import BadData, RetryLater
from grid.exchange import PairRules
from kraken.public_client import (
    USER_AGENT,
    KrakenPublicClient,
    UnknownPair,
    classify_errors,
    display_asset,
    parse_asset_pair,
    parse_ohlc,
)
from market.pipeline import CandlePipeline, FeedSpec
from market.sim import generate
from store.sqlite import SQLiteStore

PAIR = "XDGUSD"
START = 1_767_225_600
CANDLES, _ = generate(1500, seed=11)
FORMING = 1000  # index of the 1-minute candle forming at NOW
NOW = START + FORMING * 60 + 30
WINDOW = 720


@pytest.fixture
def clock() -> SimClock:
    return SimClock(NOW)


@pytest.fixture
def fake(clock: SimClock) -> Iterator[FakeKraken]:
    with FakeKraken(CANDLES, now=clock.now, pair=PAIR) as server:
        yield server


@pytest.fixture
def sleeps(clock: SimClock) -> SleepRecorder:
    return SleepRecorder(clock)


@pytest.fixture
def make_client(fake: FakeKraken, clock: SimClock, sleeps: SleepRecorder):
    sessions: list[requests.Session] = []

    def make(
        *, base_url: str | None = None, pair: str = PAIR, now=None, timeout: float = 5.0, max_retries: int = 3
    ) -> KrakenPublicClient:
        session = requests.Session()
        sessions.append(session)
        return KrakenPublicClient(
            base_url or fake.url,
            pair,
            now=now or clock.now,
            sleep=sleeps,
            timeout=timeout,
            max_retries=max_retries,
            session=session,
        )

    yield make
    for session in sessions:
        session.close()


@pytest.fixture
def client(make_client) -> KrakenPublicClient:
    return make_client()


def ohlc_requests(fake: FakeKraken) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/0/public/OHLC"]


# Parsing what Kraken serves ---------------------------------------------------------


def test_fake_speaks_kraken_wire_format(fake: FakeKraken) -> None:
    answer = requests.get(f"{fake.url}/0/public/OHLC", params={"pair": PAIR, "interval": 1}, timeout=5).json()
    assert answer["error"] == []
    assert set(answer["result"]) == {PAIR, "last"}
    rows = answer["result"][PAIR]
    assert len(rows) == WINDOW
    for row in rows:
        assert len(row) == 8
        assert isinstance(row[0], int) and isinstance(row[7], int)
        assert all(isinstance(v, str) for v in row[1:7])
    assert [r[0] for r in rows] == [c.time for c in CANDLES[FORMING - WINDOW + 1 : FORMING + 1]]
    # `last` is the since-cursor for new committed data: the newest closed candle, not the forming one.
    assert answer["result"]["last"] == rows[-2][0] == CANDLES[FORMING - 1].time


def test_fetch_parses_string_fields_into_candles_oldest_first(client: KrakenPublicClient) -> None:
    page = client.fetch_ohlc(1)
    assert page.closed == CANDLES[FORMING - WINDOW + 1 : FORMING]
    times = [c.time for c in page.closed]
    assert times == sorted(set(times))
    for c in page.closed:
        assert type(c.time) is int and type(c.trade_count) is int
        assert all(type(v) is float for v in (c.open, c.high, c.low, c.close, c.volume))
    assert page.last == CANDLES[FORMING - 1].time


def test_pair_interval_and_since_are_query_parameters(client: KrakenPublicClient, fake: FakeKraken) -> None:
    client.fetch_ohlc(1)
    client.fetch_ohlc(15, since=CANDLES[900].time)
    first, second = ohlc_requests(fake)
    assert first["params"] == {"pair": PAIR, "interval": "1"}
    assert second["params"] == {"pair": PAIR, "interval": "15", "since": str(CANDLES[900].time)}
    assert first["headers"]["User-Agent"] == USER_AGENT


def test_last_polls_for_new_committed_candles_only(client: KrakenPublicClient, clock: SimClock) -> None:
    page = client.fetch_ohlc(1)
    again = client.fetch_ohlc(1, since=page.last)
    assert again.closed == []
    assert again.forming == CANDLES[FORMING]
    clock.advance(120)  # two more minutes close
    later = client.fetch_ohlc(1, since=page.last)
    assert later.closed == CANDLES[FORMING : FORMING + 2]
    assert later.last == CANDLES[FORMING + 1].time


def test_forming_candle_is_returned_as_forming_never_closed(make_client, clock: SimClock) -> None:
    page = make_client().fetch_ohlc(1)
    assert page.forming == CANDLES[FORMING]
    assert CANDLES[FORMING].time not in {c.time for c in page.closed}
    clock.advance(30)  # exactly on the minute: FORMING has just closed, FORMING + 1 has just opened
    assert clock.now() == CANDLES[FORMING + 1].time
    page = make_client().fetch_ohlc(1)
    assert page.forming == CANDLES[FORMING + 1]
    assert page.closed[-1] == CANDLES[FORMING]


def test_candle_not_ended_by_client_now_is_never_closed(make_client, clock: SimClock) -> None:
    # The client's clock lags the exchange by 90 s: the newest committed row has not ended for it yet.
    lagging = make_client(now=lambda: clock.now() - 90)
    page = lagging.fetch_ohlc(1)
    assert page.closed[-1] == CANDLES[FORMING - 2]
    assert all(c.time + 60 <= clock.now() - 90 for c in page.closed)
    assert page.forming == CANDLES[FORMING]


def test_fifteen_minute_interval_is_served_and_parsed(client: KrakenPublicClient, fake: FakeKraken) -> None:
    page = client.fetch_ohlc(15)
    bucket_start = FORMING - FORMING % 15  # minute 990 opens the bucket still forming
    assert page.closed == aggregate(CANDLES[:bucket_start], 15, closed_before=NOW)
    assert len(page.closed) == bucket_start // 15
    assert all(c.time % 900 == 0 and c.time + 900 <= NOW for c in page.closed)
    assert page.forming is not None
    assert page.forming.time == START + bucket_start * 60
    assert page.forming.volume == pytest.approx(sum(c.volume for c in CANDLES[bucket_start : FORMING + 1]))
    assert page.last == page.closed[-1].time
    assert ohlc_requests(fake)[-1]["params"]["interval"] == "15"


def test_since_returns_only_newer_candles(client: KrakenPublicClient) -> None:
    page = client.fetch_ohlc(1, since=CANDLES[990].time)
    assert page.closed == CANDLES[991:FORMING]
    assert page.forming == CANDLES[FORMING]


def test_at_most_720_rows_whatever_since(client: KrakenPublicClient) -> None:
    for since in (None, 0, START):
        page = client.fetch_ohlc(1, since=since)
        assert len(page.closed) + 1 == WINDOW
        assert page.closed[0] == CANDLES[FORMING - WINDOW + 1]


# Failures and retries ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("rate_limit", "EAPI:Rate limit exceeded"),
        ("too_many", "EGeneral:Too many requests"),
        ("unavailable", "EService:Unavailable"),
    ],
)
def test_error_arrays_back_off_1_2_4_and_recover(
    kind: str,
    message: str,
    client: KrakenPublicClient,
    fake: FakeKraken,
    sleeps: SleepRecorder,
    clock: SimClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail_next(3, kind)
    page = client.fetch_ohlc(1)
    assert sleeps.calls == [1.0, 2.0, 4.0]
    assert sum(message in r.getMessage() for r in caplog.records) == 3  # each retry says why
    assert clock.now() == NOW + 7.0
    assert len(ohlc_requests(fake)) == 4
    assert page.forming == CANDLES[FORMING]
    assert len(page.closed) == WINDOW - 1


def test_exhausted_retries_raise_retry_later(
    client: KrakenPublicClient, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    fake.fail_next(4, "unavailable")
    with pytest.raises(RetryLater, match="EService:Unavailable"):
        client.fetch_ohlc(1)
    assert sleeps.calls == [1.0, 2.0, 4.0]
    assert len(ohlc_requests(fake)) == 4


def test_unknown_asset_pair_is_bad_data_without_retry(
    client: KrakenPublicClient, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    fake.fail_next(1, "unknown_pair")
    with pytest.raises(BadData, match="EQuery:Unknown asset pair"):
        client.fetch_ohlc(1)
    assert len(ohlc_requests(fake)) == 1
    assert sleeps.calls == []


def test_a_pair_kraken_does_not_list_is_bad_data(make_client, fake: FakeKraken, sleeps: SleepRecorder) -> None:
    with pytest.raises(BadData, match="EQuery:Unknown asset pair"):
        make_client(pair="NOPEUSD").fetch_ohlc(1)
    assert len(ohlc_requests(fake)) == 1
    assert sleeps.calls == []


def test_http_429_waits_for_retry_after(
    client: KrakenPublicClient, fake: FakeKraken, sleeps: SleepRecorder, clock: SimClock
) -> None:
    fake.fail_next(1, "http_429", retry_after=5)
    page = client.fetch_ohlc(1)
    assert len(sleeps.calls) == 1 and 5.0 <= sleeps.calls[0] <= 30.0
    assert clock.now() == NOW + sleeps.calls[0]
    assert len(ohlc_requests(fake)) == 2
    assert page.forming == CANDLES[FORMING]


def test_http_429_without_retry_after_uses_the_backoff(
    client: KrakenPublicClient, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    fake.fail_next(1, "http_429")
    client.fetch_ohlc(1)
    assert sleeps.calls == [1.0]


@pytest.mark.parametrize("kind", ["http_502", "http_503"])
def test_http_502_503_are_retried(kind: str, client: KrakenPublicClient, fake: FakeKraken, sleeps) -> None:
    fake.fail_next(2, kind)
    page = client.fetch_ohlc(1)
    assert sleeps.calls == [1.0, 2.0]
    assert len(ohlc_requests(fake)) == 3
    assert page.closed[-1] == CANDLES[FORMING - 1]


def test_malformed_json_is_bad_data_without_retry(client: KrakenPublicClient, fake: FakeKraken, sleeps) -> None:
    fake.fail_next(1, "malformed")
    with pytest.raises(BadData, match="not valid JSON"):
        client.fetch_ohlc(1)
    assert len(ohlc_requests(fake)) == 1
    assert sleeps.calls == []


def test_bad_row_is_bad_data_naming_the_row(client: KrakenPublicClient, fake: FakeKraken, sleeps) -> None:
    fake.fail_next(1, "bad_row")
    with pytest.raises(BadData, match=f"row {BAD_ROW_INDEX} .*{BAD_PRICE}") as info:
        client.fetch_ohlc(1)
    assert str(CANDLES[FORMING - WINDOW + 1 + BAD_ROW_INDEX].time) in str(info.value)
    assert len(ohlc_requests(fake)) == 1
    assert sleeps.calls == []


def test_unknown_path_is_404_and_bad_data(make_client, fake: FakeKraken, sleeps: SleepRecorder) -> None:
    raw = requests.get(f"{fake.url}/0/public/Nope", timeout=5)
    assert raw.status_code == 404
    assert raw.json() == {"error": ["EGeneral:Unknown method"]}
    with pytest.raises(BadData, match="HTTP 404"):
        make_client(base_url=fake.url + "/v9").fetch_ohlc(1)
    assert sleeps.calls == []


def test_timeout_is_retried_and_recovers(make_client, fake: FakeKraken, sleeps: SleepRecorder) -> None:
    fake.fail_next(1, "slow", delay=2.0)
    started = time.monotonic()
    page = make_client(timeout=0.3, max_retries=1).fetch_ohlc(1)
    assert time.monotonic() - started < 1.5
    assert sleeps.calls == [1.0]
    assert len(ohlc_requests(fake)) == 2
    assert page.forming == CANDLES[FORMING]


def test_timeout_exhausted_raises_retry_later_saying_it_timed_out(
    make_client, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    fake.fail_next(2, "slow", delay=2.0)
    started = time.monotonic()
    with pytest.raises(RetryLater, match=r"127\.0\.0\.1 did not answer within 0\.3 s"):
        make_client(timeout=0.3, max_retries=1).fetch_ohlc(1)
    assert time.monotonic() - started < 1.5
    assert sleeps.calls == [1.0]
    assert len(ohlc_requests(fake)) == 2


def test_unreachable_server_is_retry_later(make_client, fake: FakeKraken, sleeps: SleepRecorder) -> None:
    client = make_client()
    fake.stop()
    with pytest.raises(RetryLater):
        client.fetch_ohlc(1)
    assert sleeps.calls == [1.0, 2.0, 4.0]


def test_fake_stop_does_not_wait_for_a_slow_answer(clock: SimClock) -> None:
    fake = FakeKraken(CANDLES, now=clock.now)
    url = fake.start()
    fake.fail_next(1, "slow", delay=30.0)
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(requests.get(f"{url}/0/public/OHLC", params={"pair": PAIR}, timeout=10).status_code)
        except requests.RequestException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 5
    while not fake.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    caller.join(timeout=5)
    assert outcome and isinstance(outcome[0], requests.ConnectionError)  # dropped, never answered


# The pure parser ---------------------------------------------------------------------


def _row(t: int, o="0.1000000", h="0.1100000", lo="0.0900000", c="0.1050000", v="12.50000000", n=3) -> list:
    return [t, o, h, lo, c, "0.1000000", v, n]


def _payload(rows: list, last=None) -> dict:
    return {"error": [], "result": {PAIR: rows, "last": rows[-2][0] if last is None else last}}


T0 = START + 600


def test_parse_splits_closed_and_forming() -> None:
    rows = [_row(T0), _row(T0 + 60), _row(T0 + 120)]
    page = parse_ohlc(_payload(rows), 1, now=T0 + 150)
    assert page.closed == [
        Candle(T0, 0.1, 0.11, 0.09, 0.105, 12.5, 3),
        Candle(T0 + 60, 0.1, 0.11, 0.09, 0.105, 12.5, 3),
    ]
    assert page.forming == Candle(T0 + 120, 0.1, 0.11, 0.09, 0.105, 12.5, 3)
    assert page.last == T0 + 60
    # The last row is the forming one even when `now` is past its end (Kraken has not committed it).
    late = parse_ohlc(_payload(rows), 1, now=T0 + 3600)
    assert late.closed == page.closed and late.forming == page.forming
    # A row whose interval has not ended by `now` is not closed, even if it is not the last row.
    assert parse_ohlc(_payload(rows), 1, now=T0 + 100).closed == page.closed[:1]
    empty = parse_ohlc({"error": [], "result": {PAIR: [], "last": T0}}, 1, now=T0)
    assert empty.closed == [] and empty.forming is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "not a JSON object"),
        ("EService:Unavailable", "not a JSON object"),
        ({"error": []}, "no 'result'"),
        ({"error": [], "result": []}, "no 'result'"),
        ({"error": "EService:Unavailable", "result": {}}, "'error' is not a list"),
        ({"error": [], "result": {PAIR: [_row(T0)], "XXBTZUSD": [_row(T0)], "last": T0}}, "exactly one pair"),
        ({"error": [], "result": {"last": T0}}, "exactly one pair"),
        ({"error": [], "result": {PAIR: [_row(T0)], "last": "soon"}}, "'last' is not an integer"),
        ({"error": [], "result": {PAIR: [_row(T0)], "last": T0 + 0.5}}, "'last' is not an integer"),
        ({"error": [], "result": {PAIR: [_row(T0)], "last": True}}, "'last' is not an integer"),
    ],
)
def test_parse_rejects_malformed_answers(payload, message: str) -> None:
    with pytest.raises(BadData, match=message):
        parse_ohlc(payload, 1, now=T0 + 600)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_row(T0 + 60)[:7], "row 1 is not an 8-field list"),
        ("1767226260,0.1,0.11", "row 1 is not an 8-field list"),
        (_row(T0 + 60, o="-0.1000000"), r"row 1 \(1767226260\): prices must be finite and positive"),
        (_row(T0 + 60, lo="0"), r"row 1 \(1767226260\): prices must be finite and positive"),
        (_row(T0 + 60, h="0.0800000", lo="0.1200000"), r"row 1 \(1767226260\): high/low do not bracket"),
        (_row(T0 + 60, v="-1"), r"row 1 \(1767226260\): volume must be finite"),
        (_row(T0 + 60, c="NaN"), r"row 1 \(1767226260\): prices must be finite"),
        (_row(T0 + 60, c="0,105"), "row 1 has a non-numeric field"),
        (_row(T0 + 60, n=None), "row 1 has a non-numeric field"),
        ([T0 + 60.5, *_row(T0)[1:]], "row 1 has a non-integer time"),
        (_row(T0), "row 1 .*not newer than row 0"),
    ],
)
def test_parse_rejects_a_bad_row_naming_it(bad, message: str) -> None:
    rows = [_row(T0), bad, _row(T0 + 120)]
    with pytest.raises(BadData, match=message):
        parse_ohlc({"error": [], "result": {PAIR: rows, "last": T0 + 60}}, 1, now=T0 + 600)


def test_parse_raises_for_error_arrays() -> None:
    with pytest.raises(RetryLater, match="EAPI:Rate limit exceeded"):
        parse_ohlc({"error": ["EAPI:Rate limit exceeded"]}, 1, now=T0)
    with pytest.raises(BadData, match="EGeneral:Invalid arguments"):
        parse_ohlc({"error": ["EGeneral:Invalid arguments"], "result": {}}, 1, now=T0)


def test_classify_errors() -> None:
    transient_errors = (
        "EAPI:Rate limit exceeded",
        "EGeneral:Too many requests",
        "EService:Unavailable",
        "EService:Busy",
    )
    for transient in transient_errors:
        assert isinstance(classify_errors([transient]), RetryLater)
    bad = classify_errors(["EQuery:Unknown asset pair", "EGeneral:Invalid arguments"])
    assert type(bad) is BadData
    assert "EQuery:Unknown asset pair; EGeneral:Invalid arguments" in str(bad)
    # One transient error among others still means "try again later".
    assert isinstance(classify_errors(["EGeneral:Invalid arguments", "EService:Unavailable"]), RetryLater)


# AssetPairs ---------------------------------------------------------------------------

XBT_ENTRY = {
    "altname": "XBTUSD",
    "base": "XXBT",
    "quote": "ZUSD",
    "pair_decimals": 1,
    "lot_decimals": 8,
    "ordermin": "0.00005",
    "costmin": "0.5",
    "fees": [[0, 0.4], [10000, 0.35]],
    "fees_maker": [[0, 0.25], [10000, 0.2]],
    "status": "online",
}
XBT_RULES = PairRules("XBTUSD", "BTC", "USD", 1, 8, 0.00005, 0.5, 0.25)


def test_fetch_asset_pair_reads_the_pairs_rules(make_client, fake: FakeKraken) -> None:
    fake.set_asset_pairs([AssetPair(PairRules()), AssetPair(XBT_RULES, name="XXBTZUSD", base_id="XXBT")])
    info = make_client(pair="XBTUSD").fetch_asset_pair()
    assert info.rules == PairRules("XXBTZUSD", "BTC", "USD", 1, 8, 0.00005, 0.5, 0.25)
    assert (info.name, info.altname, info.base_id, info.quote_id, info.status) == (
        "XXBTZUSD", "XBTUSD", "XXBT", "ZUSD", "online",
    )  # fmt: skip
    assert info.fee_published
    asked = [r for r in fake.requests if r["path"] == "/0/public/AssetPairs"]
    assert [r["params"] for r in asked] == [{"pair": "XBTUSD"}]
    assert make_client().fetch_asset_pair().rules == PairRules()  # the default entry: XDGUSD


def test_a_pair_kraken_does_not_list_is_unknown_pair_without_retry(
    make_client, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    with pytest.raises(UnknownPair, match=r"EQuery:Unknown asset pair \(NOPEUSD\)"):
        make_client(pair="NOPEUSD").fetch_asset_pair()
    assert sleeps.calls == []


def test_asset_pairs_are_retried_like_every_public_call(
    client: KrakenPublicClient, fake: FakeKraken, sleeps: SleepRecorder
) -> None:
    fake.fail_next(2, "rate_limit")
    assert client.fetch_asset_pair().rules == PairRules()
    assert sleeps.calls == [1.0, 2.0]
    fake.fail_next(4, "unavailable")
    with pytest.raises(RetryLater, match="EService:Unavailable"):
        client.fetch_asset_pair()


def test_unreachable_kraken_is_retry_later_for_asset_pairs(make_client, fake: FakeKraken) -> None:
    fake.stop()
    with pytest.raises(RetryLater, match="AssetPairs"):
        make_client(max_retries=0).fetch_asset_pair()


@pytest.mark.parametrize(
    "payload",
    [
        {"error": ["EQuery:Unknown asset pair"]},
        {"error": ["EQuery:Unknown asset pair"], "result": {}},
        {"error": [], "result": {"XXBTZUSD": XBT_ENTRY, "XETHZUSD": {**XBT_ENTRY, "altname": "ETHUSD"}}},
    ],
)
def test_parse_asset_pair_unknown_pair_shapes(payload) -> None:
    with pytest.raises(UnknownPair, match="DOTUSD"):
        parse_asset_pair(payload, "DOTUSD")


def test_parse_asset_pair_takes_the_first_maker_tier_and_matches_the_altname() -> None:
    payload = {"error": [], "result": {"XXBTZUSD": XBT_ENTRY, "XETHZUSD": {**XBT_ENTRY, "altname": "ETHUSD"}}}
    info = parse_asset_pair(payload, "xbtusd")
    assert info.rules == replace(XBT_RULES, pair="XXBTZUSD")
    assert (info.name, info.base_id) == ("XXBTZUSD", "XXBT")
    # Asked by an alias, Kraken answers with its one entry under its own names.
    assert parse_asset_pair({"error": [], "result": {"XXBTZUSD": XBT_ENTRY}}, "BTCUSD").altname == "XBTUSD"
    broken = {"error": [], "result": {"XXBTZUSD": {**XBT_ENTRY, "pair_decimals": "x"}}}
    with pytest.raises(BadData, match="malformed entry for XXBTZUSD"):
        parse_asset_pair(broken, "XBTUSD")
    with pytest.raises(RetryLater):
        parse_asset_pair({"error": ["EService:Unavailable"]}, "XBTUSD")
    assert [display_asset(a) for a in ("XXDG", "ZUSD", "XETH", "USDT", "ZEUR")] == ["DOGE", "USD", "ETH", "USDT", "EUR"]


def test_an_entry_without_a_fee_schedule_takes_the_default_fee_when_given() -> None:
    payload = {"error": [], "result": {"XXBTZUSD": {**XBT_ENTRY, "fees": [], "fees_maker": [], "status": "post_only"}}}
    with pytest.raises(BadData, match="malformed"):
        parse_asset_pair(payload, "XBTUSD")
    info = parse_asset_pair(payload, "XBTUSD", default_maker_fee_pct=0.3)
    assert info.rules.maker_fee_pct == 0.3 and not info.fee_published and info.status == "post_only"


# Pipeline over HTTP ------------------------------------------------------------------


@pytest.fixture
def pipeline_setup(tmp_path: Path, client: KrakenPublicClient):
    store = SQLiteStore(tmp_path / "candles.sqlite3")
    pipeline = CandlePipeline(store, client, PAIR, [FeedSpec(1, 60, 4000, 300)], retention_days=14)
    yield pipeline, store
    store.close()


def test_sync_stores_exactly_the_closed_candles(pipeline_setup, clock: SimClock) -> None:
    pipeline, store = pipeline_setup
    added = pipeline.sync(1, clock.now())
    assert added == WINDOW - 1
    assert store.count_candles(PAIR, 1) == WINDOW - 1
    assert store.load_candles(PAIR, 1, 5000) == CANDLES[FORMING - WINDOW + 1 : FORMING]
    assert store.load_candles(PAIR, 1, 1)[0].time == CANDLES[FORMING - 1].time  # never the forming one


def test_second_sync_fetches_since_the_newest_stored(pipeline_setup, clock: SimClock, fake: FakeKraken) -> None:
    pipeline, store = pipeline_setup
    pipeline.sync(1, clock.now())
    clock.advance(180)
    added = pipeline.sync(1, clock.now())
    assert ohlc_requests(fake)[-1]["params"]["since"] == str(CANDLES[FORMING - 1].time)
    assert added == 3
    assert store.count_candles(PAIR, 1) == WINDOW - 1 + 3
    assert store.load_candles(PAIR, 1, 4) == CANDLES[FORMING - 1 : FORMING + 3]


def test_failing_sync_records_the_error_and_changes_nothing(
    pipeline_setup, clock: SimClock, fake: FakeKraken, client: KrakenPublicClient
) -> None:
    pipeline, store = pipeline_setup
    pipeline.sync(1, clock.now())
    before = store.load_candles(PAIR, 1, 5000)
    clock.advance(180)
    fake.fail_next(client.max_retries + 1, "unavailable")
    assert pipeline.sync(1, clock.now()) == 0
    health = pipeline.health(clock.now())["1m"]
    assert health["last_error"] == "Kraken: EService:Unavailable"  # our own words, no exception class
    assert health["newest_candle_time"] == CANDLES[FORMING - 1].time
    assert store.load_candles(PAIR, 1, 5000) == before
    # The fake has recovered: the next cadence catches up on everything that closed meanwhile
    # (180 s advanced plus 7 s of back-off: minutes FORMING .. FORMING + 2).
    assert pipeline.sync(1, clock.now()) == 3
    assert store.load_candles(PAIR, 1, 3) == CANDLES[FORMING : FORMING + 3]


def test_training_loader_merges_the_store_with_krakens_window(pipeline_setup) -> None:
    pipeline, store = pipeline_setup
    stored = CANDLES[200:300]  # overlaps the served window (281..999) by 19 candles
    store.upsert_candles(PAIR, 1, stored)
    assert store.count_candles(PAIR, 1) == 100
    rows = pipeline.load_recent_ohlcv_rows(1, 4000)
    times = [c.time for c in rows]
    assert times == sorted(set(times))
    assert rows == CANDLES[200:FORMING]
    assert CANDLES[FORMING].time not in times
    assert pipeline.load_recent_ohlcv_rows(1, 500) == CANDLES[FORMING - 500 : FORMING]


def test_transport_failures_are_described_in_plain_words() -> None:
    """What the pipeline card and the Errors card show, instead of the library's nested repr."""
    import socket as socket_module

    from kraken.public_client import transport_problem

    url = "https://api.kraken.com/0/public/OHLC"

    def wrapped(inner: BaseException) -> requests.ConnectionError:
        # requests' shape: ConnectionError(MaxRetryError(...)) whose reason holds the cause.
        outer = Exception("HTTPSConnectionPool(host='api.kraken.com', port=443): Max retries exceeded")
        outer.reason = inner  # type: ignore[attr-defined]
        return requests.ConnectionError(outer)

    dns = wrapped(socket_module.gaierror(-3, "Temporary failure in name resolution"))
    assert transport_problem(dns, url, 10) == "cannot resolve api.kraken.com: no network, or no DNS?"
    refused = wrapped(ConnectionRefusedError(111, "Connection refused"))
    assert transport_problem(refused, url, 10) == "api.kraken.com refused the connection"
    timeout = requests.ReadTimeout("read timed out")
    assert transport_problem(timeout, url, 10) == "api.kraken.com did not answer within 10 s"
    assert transport_problem(requests.exceptions.SSLError("bad cert"), url, 10).startswith(
        "the TLS handshake with api.kraken.com failed"
    )
    unreachable = wrapped(OSError(101, "Network is unreachable"))
    assert transport_problem(unreachable, url, 10) == "cannot reach api.kraken.com: Network is unreachable"
    other = requests.RequestException("?")
    assert transport_problem(other, url, 10) == "cannot reach api.kraken.com (RequestException)"
