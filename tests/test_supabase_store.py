"""SupabaseStore through the real ``supabase`` client against the local PostgREST-protocol server.

The store contract itself (the same suite as SQLite's) runs in ``test_store.py``;
here: paging past the row cap, idempotent retries, auth, faults and outages,
the schema file, and the fake's own protocol details.
"""

import re
import time
from pathlib import Path

import httpx
import pytest
from fake_postgrest import FakePostgrest, content_range, range_status, requested_range

from candles import Candle
from errors import BadData, ConfigError, RetryLater
from store.interface import SCHEMA
from store.supabase import LEASE_SCHEMA, SCHEMA_FILE, StoreLease, SupabaseStore, classify_api_error, parse_tables

ROOT = Path(__file__).resolve().parents[1]
PAIR = "XDGUSD"
T0 = 1_700_000_040


def candles(n: int, start: int = T0, step: int = 60) -> list[Candle]:
    return [Candle(start + i * step, 0.1 + i * 1e-6, 0.11, 0.09, 0.1, 1000.0 + i, i % 50) for i in range(n)]


def fill_row(order_id: str, ts: float) -> dict:
    return {
        "pair": PAIR, "order_id": order_id, "ts": ts, "exchange": "paper", "slot": 0, "leg": "B", "role": "entry",
        "side": "buy", "price": 0.1, "volume": 200.0, "fee": 0.05, "regime_at_entry": "RANGING",
        "tier_at_entry": 0, "cycle_net": None,
    }  # fmt: skip


@pytest.fixture
def fake():
    with FakePostgrest() as server:
        yield server


@pytest.fixture
def store(fake):
    s = SupabaseStore(fake.url, fake.key, timeout=2.0)
    yield s
    s.close()


def candle_gets(fake: FakePostgrest) -> list[dict]:
    return fake.requests_to("ohlcv_candles", "GET")


# paging -------------------------------------------------------------------------


def test_deep_load_pages_past_the_1000_row_cap_and_returns_the_newest_oldest_first(fake, store):
    everything = candles(5000)
    store.upsert_candles(PAIR, 1, everything)
    store.upsert_candles(PAIR, 15, candles(50, step=900))  # another interval must not leak in
    fake.requests.clear()
    rows = store.load_candles(PAIR, 1, 4000)
    assert rows == everything[-4000:]
    gets = candle_gets(fake)
    assert len(gets) == 4 and all(r["status"] == 200 for r in gets)
    assert all(dict(r["params"])["order"] == "time.desc" for r in gets)
    # Each page continues below the oldest time seen so far (keyset paging, not offsets).
    bounds = [dict(r["params"]).get("time") for r in gets]
    assert bounds == [None, *(f"lt.{everything[-1000 * k].time}" for k in (1, 2, 3))]


def test_a_page_size_above_the_cap_learns_the_cap_and_still_gets_everything(fake):
    s = SupabaseStore(fake.url, fake.key, page_size=2500)
    s.upsert_candles(PAIR, 1, candles(4000))
    fake.requests.clear()
    rows = s.load_candles(PAIR, 1, 4000)
    assert [c.time for c in rows] == [c.time for c in candles(4000)]
    assert [dict(r["params"])["limit"] for r in candle_gets(fake)] == ["2500", "2500", "2000", "1000"]
    s.close()


def test_a_table_shorter_than_the_target_is_read_to_its_end(fake, store):
    store.upsert_candles(PAIR, 1, candles(2500))
    fake.requests.clear()
    assert store.load_candles(PAIR, 1, 4000) == candles(2500)
    assert len(candle_gets(fake)) == 3  # 1000 + 1000 + 500: a short page ends it
    fake.requests.clear()
    assert store.load_candles(PAIR, 1, 4000)[0].time == T0
    store.upsert_candles("XBTUSD", 1, candles(700))
    fake.requests.clear()
    assert len(store.load_candles("XBTUSD", 1, 4000)) == 700
    assert len(candle_gets(fake)) == 2  # the first short page might have been the cap: one more look


def test_event_reads_page_past_the_cap_too(fake):
    fake.max_rows = 3
    s = SupabaseStore(fake.url, fake.key)
    for i in range(10):
        s.record_fill(fill_row(f"g{i}", 100.0 + i))
    assert [r["order_id"] for r in s.fills(PAIR, limit=8)] == [f"g{i}" for i in range(9, 1, -1)]
    assert len(s.fills(PAIR, limit=50)) == 10
    s.close()


# idempotent writes --------------------------------------------------------------


def test_upserts_use_the_candle_key_in_batches(fake):
    s = SupabaseStore(fake.url, fake.key, batch_size=500)
    s.upsert_candles(PAIR, 1, candles(1200))
    posts = fake.requests_to("ohlcv_candles", "POST")
    assert [len(r["body"]) for r in posts] == [500, 500, 200]
    for r in posts:
        assert dict(r["params"])["on_conflict"] == "pair,interval_min,time"
        assert "resolution=merge-duplicates" in r["headers"]["prefer"]
        assert "return=minimal" in r["headers"]["prefer"]
    s.close()


def test_a_retried_batch_whose_answer_was_lost_never_duplicates(fake):
    s = SupabaseStore(fake.url, fake.key, batch_size=400, timeout=0.3)
    batch = candles(1000)
    fake.fail_next(1, "slow", delay=0.6)  # the first batch lands after the client gave up
    with pytest.raises(RetryLater, match=r"did not answer within 0\.3 s"):
        s.upsert_candles(PAIR, 1, batch)
    deadline = time.monotonic() + 3
    while len(fake.rows("ohlcv_candles")) < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fake.rows("ohlcv_candles")) == 400
    fake.fail_next(1, "drop")  # and a retry that loses its connection
    with pytest.raises(RetryLater):
        s.upsert_candles(PAIR, 1, batch)
    s.upsert_candles(PAIR, 1, batch)
    s.upsert_candles(PAIR, 1, batch)
    assert s.count_candles(PAIR, 1) == 1000
    assert s.load_candles(PAIR, 1, 5000) == batch
    s.close()


def test_one_call_with_the_same_candle_twice_keeps_the_last(store):
    first, again = Candle(T0, 0.1, 0.11, 0.09, 0.1, 5.0, 1), Candle(T0, 0.1, 0.12, 0.09, 0.11, 6.0, 2)
    store.upsert_candles(PAIR, 1, [first, again])  # Postgres refuses one command touching a key twice
    assert store.load_candles(PAIR, 1, 10) == [again]


def test_opinions_and_fills_ignore_duplicates_and_the_outcome_lands_on_its_row(fake, store):
    opinion = {
        "pair": PAIR, "ts": 1_700_000_123.25, "panelist": "p", "model": "m", "mechanical_tier": 1,
        "mechanical_direction": "long_bias", "ai_tier": 1, "ai_direction": "long_bias", "conviction": 70,
        "agreement": "agree", "rationale": "r", "watch_for": "w", "latency_sec": 1.5, "price": 0.1,
    }  # fmt: skip
    store.record_ai_opinion(opinion)
    store.record_ai_opinion({**opinion, "rationale": "changed"})
    store.record_ai_opinion_outcome(PAIR, 1_700_000_123.25, price_after=0.11, hit=True)
    rows = store.ai_opinions(PAIR)
    assert len(rows) == 1 and rows[0]["rationale"] == "r"
    assert rows[0]["hit"] is True and rows[0]["price_after"] == 0.11
    post = fake.requests_to("ai_regime_opinions", "POST")[-1]
    assert dict(post["params"])["on_conflict"] == "pair,ts"
    assert "resolution=ignore-duplicates" in post["headers"]["prefer"]


def test_numbers_come_back_as_sqlite_returns_them(store):
    store.upsert_candles(PAIR, 1, [Candle(T0, 1.0, 2.0, 1.0, 2.0, 100.0, 3)])  # Postgres sends 1, 2, 100
    c = store.load_candles(PAIR, 1, 1)[0]
    assert all(isinstance(v, float) for v in c[1:6]) and isinstance(c.time, int) and isinstance(c.trade_count, int)
    store.record_fill(fill_row("x", 100.0))
    row = store.fills(PAIR)[0]
    assert isinstance(row["ts"], float) and isinstance(row["slot"], int)


# auth ---------------------------------------------------------------------------


def test_every_request_carries_the_key_as_apikey_and_bearer_token(fake, store):
    store.save_state("k", {"v": 1}, 1.0)
    store.load_state("k")
    store.count_candles(PAIR, 1)
    assert fake.requests
    for r in fake.requests:
        assert r["headers"]["apikey"] == fake.key
        assert r["headers"]["authorization"] == f"Bearer {fake.key}"


def test_a_wrong_key_is_a_clear_config_error(fake):
    s = SupabaseStore(fake.url, "not-the-key")
    for call in (
        lambda: s.load_candles(PAIR, 1, 10),
        lambda: s.upsert_candles(PAIR, 1, candles(3)),
        lambda: s.save_state("k", {}, 1.0),
        lambda: s.count_candles(PAIR, 1),
        s.check,
    ):
        with pytest.raises(ConfigError, match=r"answered 401.*check SUPABASE_KEY"):
            call()
    with pytest.raises(ConfigError, match=r"answered 401: Invalid API key"):
        s.load_state("k")
    assert fake.rows("ohlcv_candles") == [] and fake.rows("bot_state") == []
    s.close()


def test_the_fake_refuses_a_missing_apikey_or_a_wrong_bearer(fake):
    url = f"{fake.url}/rest/v1/bot_state"
    answer = httpx.get(url, headers={"Authorization": f"Bearer {fake.key}"})
    assert answer.status_code == 401 and answer.json()["message"] == "No API key found in request"
    answer = httpx.get(url, headers={"apikey": fake.key, "Authorization": "Bearer nope"})
    assert answer.status_code == 401 and answer.json()["code"] == "PGRST301"
    assert httpx.get(url, headers={"apikey": fake.key, "Authorization": f"Bearer {fake.key}"}).json() == []


def test_a_missing_table_is_a_config_error_naming_the_schema_file():
    without_fills = SCHEMA.split("CREATE TABLE IF NOT EXISTS fills")[0]
    with FakePostgrest(schema=without_fills) as fake:
        s = SupabaseStore(fake.url, fake.key)
        with pytest.raises(ConfigError, match=r"404 PGRST205.*fills.*apply store/supabase_schema\.sql"):
            s.record_fill(fill_row("a", 1.0))
        with pytest.raises(ConfigError, match="fills"):
            s.check()
        s.save_state("k", {"v": 1}, 1.0)  # the other tables still work
        s.close()


def test_a_row_the_database_rejects_is_bad_data(store):
    with pytest.raises(BadData, match=r"400 23502.*not-null"):
        store.record_fill({**fill_row("a", 1.0), "price": None})
    assert store.fills(PAIR) == []


def test_construction_checks_its_arguments_and_stays_offline():
    with pytest.raises(ConfigError, match="not an http"):
        SupabaseStore("ftp://x", "k")
    with pytest.raises(ConfigError, match="SUPABASE_KEY is empty"):
        SupabaseStore("http://127.0.0.1:9", " ")
    s = SupabaseStore("http://127.0.0.1:9", "k", timeout=1.0)  # nothing listens there: no error until used
    with pytest.raises(RetryLater, match="ConnectError"):
        s.load_state("k")
    s.close()


# faults -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http_500", "http_502", "http_503", "http_429", "drop"])
def test_server_faults_are_retry_later_and_change_nothing(fake, store, kind):
    store.upsert_candles(PAIR, 1, candles(10))
    store.save_state("k", {"v": 1}, 1.0)
    before = (fake.rows("ohlcv_candles"), fake.rows("bot_state"))
    calls = [
        lambda: store.upsert_candles(PAIR, 1, candles(5, start=T0 + 6000)),
        lambda: store.save_state("k", {"v": 2}, 2.0),
        lambda: store.prune_candles(PAIR, 1, older_than=T0 + 600, keep_newest=1),
        lambda: store.load_candles(PAIR, 1, 10),
        lambda: store.count_candles(PAIR, 1),
        lambda: store.record_fill(fill_row("a", 1.0)),
    ]
    for call in calls:
        fake.fail_next(1, kind)
        started = time.monotonic()
        with pytest.raises(RetryLater, match=r"store: .* failed"):
            call()
        assert time.monotonic() - started < 1.0  # no hidden retries with sleeps
    assert (fake.rows("ohlcv_candles"), fake.rows("bot_state")) == before
    assert fake.rows("fills") == []
    assert len(store.load_candles(PAIR, 1, 100)) == 10  # and the next call works


def test_rate_limit_passes_retry_after_on(fake, store):
    fake.fail_next(1, "http_429", retry_after=7)
    with pytest.raises(RetryLater) as caught:
        store.load_state("k")
    assert caught.value.retry_after_sec == 7.0


def test_a_slow_server_times_out_as_retry_later(fake):
    s = SupabaseStore(fake.url, fake.key, timeout=0.25)
    s.upsert_candles(PAIR, 1, candles(3))
    fake.fail_next(1, "slow", delay=1.0)
    started = time.monotonic()
    with pytest.raises(RetryLater, match=r"did not answer within 0\.25 s"):
        s.load_candles(PAIR, 1, 10)
    assert time.monotonic() - started < 0.9
    assert s.load_candles(PAIR, 1, 10) == candles(3)
    s.close()


def test_an_outage_is_retry_later_and_the_same_port_serves_again_after_it(fake, store):
    store.upsert_candles(PAIR, 1, candles(20))
    url = fake.url
    fake.stop()
    for call in (
        lambda: store.load_candles(PAIR, 1, 10),
        lambda: store.upsert_candles(PAIR, 1, candles(5, start=T0 + 6000)),
        lambda: store.save_state("k", {"v": 1}, 1.0),
    ):
        started = time.monotonic()
        with pytest.raises(RetryLater, match="ConnectError"):
            call()
        assert time.monotonic() - started < 1.0
    assert fake.start() == url
    store.upsert_candles(PAIR, 1, candles(5, start=T0 + 6000))  # the write that failed, sent again
    store.upsert_candles(PAIR, 1, candles(5, start=T0 + 6000))
    assert store.count_candles(PAIR, 1) == 25
    assert len(store.load_candles(PAIR, 1, 100)) == 25


# the bot lease -------------------------------------------------------------------


class WallClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_one_bot_per_pair_a_second_is_refused_an_expired_lease_is_taken_over_and_release_frees_it(fake, store):
    clock = WallClock()
    first = StoreLease(store, PAIR, store="/srv/a/bot.sqlite3", now=clock)
    second = StoreLease(store, PAIR, store="/srv/b/bot.sqlite3", now=clock)
    lost: list[str] = []
    first.on_lost = lost.append
    first.acquire()
    first.port = 8080
    clock.t += 30
    assert first.renew() is True
    assert [(r["holder"], r["port"], r["expires_at"]) for r in fake.rows("bot_leases")] == [
        (first.holder, 8080, clock.t + 90)
    ]
    clock.t += 89  # one second before it runs out: still the first's
    with pytest.raises(ConfigError) as refused:
        second.acquire()
    assert str(refused.value) == (
        f"another bot (PID {first.pid} on {first.host}, dashboard port 8080, store /srv/a/bot.sqlite3) holds "
        f"{PAIR} in Supabase for 1 s more; stop it first, or wait 90 s if it crashed"
    )
    other_pair = StoreLease(store, "ETHUSD", store="/srv/b/bot.sqlite3", now=clock)
    other_pair.acquire()  # leases are per pair

    clock.t += 2  # the first stopped renewing (crashed, or cut off): its lease ran out
    second.acquire()
    assert [r["holder"] for r in fake.rows("bot_leases") if r["pair"] == PAIR] == [second.holder]
    first.tick()  # the first's renewal finds the lease gone to another bot
    assert lost == [f"the bot lease on {PAIR} in Supabase was taken over by another bot"] and not first.held
    first.release()  # not ours any more: the second's row stays
    assert [r["holder"] for r in fake.rows("bot_leases") if r["pair"] == PAIR] == [second.holder]

    second.release()  # a clean shutdown frees the pair at once
    assert [r["pair"] for r in fake.rows("bot_leases")] == ["ETHUSD"]
    third = StoreLease(store, PAIR, store="/srv/a/bot.sqlite3", now=clock)
    third.acquire()
    assert third.held


def test_a_lease_left_by_this_host_and_store_is_taken_over_at_once_and_an_outage_defers_the_lease(fake, store):
    clock = WallClock()
    crashed = StoreLease(store, PAIR, store="/srv/a/bot.sqlite3", now=clock)
    crashed.acquire()
    # The same machine and store file: this process holds the file's lock, so that holder is gone.
    restarted = StoreLease(store, PAIR, store="/srv/a/bot.sqlite3", now=clock)
    restarted.acquire()
    assert [r["holder"] for r in fake.rows("bot_leases")] == [restarted.holder]

    fake.stop()
    late = StoreLease(store, PAIR, store="/srv/c/bot.sqlite3", now=clock)
    with pytest.raises(RetryLater):
        late.acquire()
    lost: list[str] = []
    late.on_lost = lost.append
    late.tick()  # still unreachable: it keeps trying, the bot keeps running
    assert lost == [] and not late.held
    fake.start()
    late.tick()  # reachable, and another bot holds the pair: the bot is told to stop
    assert len(lost) == 1 and lost[0].startswith(f"another bot (PID {restarted.pid} on {restarted.host}")


# the schema file ----------------------------------------------------------------


def test_the_schema_file_matches_the_sqlite_tables_and_the_fake_serves_the_same_columns():
    sql = (ROOT / SCHEMA_FILE).read_text()
    postgres, sqlite = parse_tables(sql), parse_tables(SCHEMA + LEASE_SCHEMA)
    assert set(postgres) == set(sqlite) == {
        "ohlcv_candles", "bot_state", "regime_tier_transitions", "ai_regime_opinions", "fills", "bot_leases",
    }  # fmt: skip
    same_kind = {"text": ("text", "jsonb"), "integer": ("integer", "bigint"), "real": ("double precision",)}
    for table, spec in sqlite.items():
        assert list(postgres[table]["columns"]) == list(spec["columns"]), table
        assert postgres[table]["primary_key"] == spec["primary_key"], table
        for column, kind in spec["columns"].items():
            assert postgres[table]["columns"][column] in same_kind[kind], (table, column)
    assert postgres["bot_state"]["columns"]["data"] == "jsonb"
    with FakePostgrest() as fake:
        assert {t: list(spec["columns"]) for t, spec in postgres.items()} == fake.db.columns

    def indexes(text: str) -> list[tuple[str, str]]:
        return sorted(
            (k.lower(), n) for k, n in re.findall(r"create (unique index|index) if not exists (\w+)", text, re.I)
        )

    assert indexes(sql) == indexes(SCHEMA)


def test_the_schema_file_can_run_twice():
    sql = re.sub(r"--[^\n]*", "", (ROOT / SCHEMA_FILE).read_text())
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert len(statements) == 16
    for statement in statements:
        if re.match(r"create\s", statement, re.I):
            assert re.match(r"create (table|index|unique index) if not exists ", statement, re.I), statement
        elif re.match(r"(delete|drop)\s", statement, re.I):  # the upgrade of older projects, a no-op after
            assert re.match(
                r"(delete from public\.\w+ a\s+using .* a\.id > b\.id|drop index if exists )", statement, re.I | re.S
            ), statement
        else:  # enabling row-level security again is a no-op
            assert re.fullmatch(r"alter table public\.\w+ enable row level security", statement, re.I), statement


# classification (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "PGRST000", RetryLater),
        (504, "PGRST003", RetryLater),
        (502, "502", RetryLater),
        (None, "503", RetryLater),  # HEAD: no body, the status as the code
        (None, "401", ConfigError),
        (None, "404", ConfigError),
        (500, "XX000", RetryLater),
        (429, None, RetryLater),
        (None, "57014", RetryLater),  # statement timeout
        (None, "40001", RetryLater),  # serialization failure
        (401, None, ConfigError),
        (401, "PGRST301", ConfigError),
        (403, "42501", ConfigError),  # row-level security: the anon key
        (404, "PGRST205", ConfigError),
        (400, "PGRST204", ConfigError),
        (400, "42703", ConfigError),
        (400, "42P10", ConfigError),
        (409, "23505", BadData),
        (400, "23502", BadData),
        (400, "22P02", BadData),
    ],
)
def test_error_answers_map_to_what_the_loop_does(status, code, expected):
    err = classify_api_error(status, code, "m", retry_after=None, what="x")
    assert type(err) is expected
    assert str(err).startswith("store: x failed: Supabase answered")


# the fake's protocol --------------------------------------------------------------


def test_ranges_and_counts_follow_postgrest():
    assert requested_range({}, {}, 1000) == (0, 999)
    assert requested_range({"range": "0-4999"}, {}, 1000) == (0, 999)
    assert requested_range({}, {"offset": "10", "limit": "5"}, 1000) == (10, 14)
    assert requested_range({"range": "20-"}, {"limit": "3"}, None) == (20, 2)  # offset from the header
    assert content_range(0, 1000, None) == "0-999/*"
    assert content_range(0, 1000, 4000) == "0-999/4000"
    assert content_range(0, 0, 0) == "*/0"
    assert (range_status(0, 1000, 4000), range_status(0, 4, 4), range_status(9, 0, 4)) == (206, 200, 416)
    assert range_status(0, 1000, None) == 200


def test_the_fake_caps_rows_counts_and_refuses_duplicate_inserts(fake, store):
    store.upsert_candles(PAIR, 1, candles(1500))
    headers = {"apikey": fake.key, "Authorization": f"Bearer {fake.key}"}
    url = f"{fake.url}/rest/v1/ohlcv_candles"
    answer = httpx.get(url, params={"select": "time", "limit": "5000"}, headers={**headers, "Prefer": "count=exact"})
    assert answer.status_code == 206 and answer.headers["content-range"] == "0-999/1500"
    assert len(answer.json()) == 1000
    answer = httpx.get(url, params={"select": "time", "order": "time.asc"}, headers={**headers, "Range": "1490-1499"})
    assert answer.status_code == 200 and answer.headers["content-range"] == "1490-1499/*"
    assert [r["time"] for r in answer.json()] == [c.time for c in candles(1500)[1490:]]
    row = {"pair": PAIR, "interval_min": 1, "time": T0, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}
    answer = httpx.post(url, json=row, headers=headers)
    assert answer.status_code == 409 and answer.json()["code"] == "23505"
    answer = httpx.delete(url, headers=headers)
    assert answer.status_code == 400 and answer.json()["code"] == "21000"  # safeupdate: a filter is required
    assert store.count_candles(PAIR, 1) == 1500
