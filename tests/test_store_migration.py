"""The SQLite -> Supabase migration: a real SQLite file written by ``SQLiteStore``, the real
``supabase`` client against the local PostgREST-protocol server, and one real ``python bot.py``.

No test sleeps: the migration's ``sleep`` is a list's ``append``, so the back-off is asserted, not waited.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from fake_postgrest import FakePostgrest

from candles import Candle
from errors import ConfigError, RetryLater
from store.interface import SCHEMA
from store.migration import MigrationReport, backoff_delay, migrate, progress_due, progress_line, run
from store.sqlite import SQLiteStore
from store.supabase import TABLES, SupabaseStore

T0 = 1_700_000_040
SERIES = {("XBTUSD", 1): 450, ("XDGUSD", 1): 2600, ("XDGUSD", 15): 180}
STATE_AT = {"snapshot:XDGUSD": 1_700_100_000.5, "snapshot:XBTUSD": 1_700_100_001.0}
PAIRS = ("XDGUSD", "XBTUSD")
RERUN_SAFE = "running the migration again is safe"


# Seeded data ------------------------------------------------------------------------


def candles(n: int, *, step: int = 60, base: float = 0.1) -> list[Candle]:
    return [
        Candle(T0 + i * step, base + i * 1e-6, base * 1.1, base * 0.9, base + i * 2e-6, 1000.0 + i, i % 50)
        for i in range(n)
    ]


def fill_row(i: int) -> dict[str, Any]:
    return {
        "pair": PAIRS[i % 2], "order_id": f"G{i:03d}", "ts": T0 + 37.25 * i, "exchange": "paper", "slot": i % 3,
        "leg": "AB"[i % 2], "role": ("entry", "exit")[i % 2], "side": ("buy", "sell")[i % 2], "price": 0.1 + i / 1000,
        "volume": 200.0, "fee": 0.052, "regime_at_entry": "RANGING", "tier_at_entry": i % 3,
        "cycle_net": None if i % 2 == 0 else 0.013 * i,
    }  # fmt: skip


def opinion_row(i: int, **changes: Any) -> dict[str, Any]:
    row = {
        "pair": PAIRS[i % 2], "ts": T0 + 300.5 * i, "panelist": "groq", "model": None if i == 3 else "llama",
        "mechanical_tier": 1, "mechanical_direction": "long_bias", "ai_tier": i % 3, "ai_direction": "long_bias",
        "conviction": 40 + i, "agreement": "agree", "rationale": f"trend {i} ünï", "watch_for": "volume",
        "latency_sec": 1.25, "price": 0.1 + i / 100,
    }  # fmt: skip
    return {**row, **changes}


def transition_row(i: int) -> dict[str, Any]:
    return {
        "ts": T0 + 611.0 * i, "pair": PAIRS[i % 2], "from_tier": i % 3, "to_tier": (i + 1) % 3,
        "from_direction": "symmetric", "to_direction": "long_bias", "reason": f"consensus {i}",
        "regime": None if i == 2 else "BULLISH", "raw_confidence": 0.61, "effective_confidence": 0.55,
        "bias_signal": 0.2, "shadow": i % 2,
    }  # fmt: skip


def seed(path: Path, series: dict[tuple[str, int], int] = SERIES, *, events: bool = True) -> Path:
    """A store file as a bot leaves it: every table filled through :class:`SQLiteStore`, then closed."""
    store = SQLiteStore(path)
    try:
        for (pair, interval_min), n in series.items():
            store.upsert_candles(pair, interval_min, candles(n, step=60 * interval_min))
        if events:
            for key, updated_at in STATE_AT.items():
                doc = {"tier": {"tier": 1, "direction": "long_bias"}, "grid": [{"price": 0.1, "side": "buy"}]}
                store.save_state(key, {**doc, "key": key, "note": "ünïcode", "saved_at": updated_at}, updated_at)
            for i in range(12):
                store.record_fill(fill_row(i))
            for i in range(8):
                row = opinion_row(i)
                store.record_ai_opinion(row)
                if i < 5:
                    store.record_ai_opinion_outcome(row["pair"], row["ts"], price_after=0.2 + i / 100, hit=i % 2 == 0)
            for i in range(6):
                store.record_tier_transition(transition_row(i))
    finally:
        store.close()
    return path


def source_tables(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every table of the source file, in the fake's primary-key order (transitions without the local id)."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:

        def rows(sql: str) -> list[dict[str, Any]]:
            return [dict(r) for r in conn.execute(sql)]

        return {
            "ohlcv_candles": rows("SELECT * FROM ohlcv_candles ORDER BY pair, interval_min, time"),
            "bot_state": [{**r, "data": json.loads(r["data"])} for r in rows("SELECT * FROM bot_state ORDER BY key")],
            "regime_tier_transitions": [
                {k: v for k, v in r.items() if k != "id"}
                for r in rows("SELECT * FROM regime_tier_transitions ORDER BY id")
            ],
            "ai_regime_opinions": rows("SELECT * FROM ai_regime_opinions ORDER BY pair, ts"),
            "fills": rows("SELECT * FROM fills ORDER BY pair, order_id"),
        }
    finally:
        conn.close()


def remote_tables(fake: FakePostgrest) -> dict[str, list[dict[str, Any]]]:
    tables = {t: fake.rows(t) for t in TABLES}
    tables["regime_tier_transitions"] = [
        {k: v for k, v in r.items() if k != "id"} for r in tables["regime_tier_transitions"]
    ]
    return tables


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Fixtures -----------------------------------------------------------------------------


@pytest.fixture
def fake():
    with FakePostgrest(max_rows=100) as server:  # a small cap: every series is longer than one answer
        yield server


@pytest.fixture
def remote(fake):
    store = SupabaseStore(fake.url, fake.key, timeout=2.0)
    yield store
    store.close()


@pytest.fixture
def source(tmp_path) -> Path:
    return seed(tmp_path / "bot.sqlite3")


def settings_for(fake: FakePostgrest, **overrides: Any):
    return make_settings(SUPABASE_URL=fake.url, SUPABASE_KEY=fake.key, **overrides)


def migrate_quietly(source: Path, remote: SupabaseStore, **kwargs: Any) -> tuple[MigrationReport, list[str]]:
    out = io.StringIO()
    report = migrate(source, remote, out=out, sleep=kwargs.pop("sleep", _no_sleep), **kwargs)
    return report, out.getvalue().splitlines()


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"unexpected retry sleep of {seconds} s")


# Copying everything -------------------------------------------------------------------


def test_every_table_arrives_exactly_and_reads_back_past_the_row_cap(fake, source):
    out = io.StringIO()
    assert run(settings_for(fake), str(source), out, sleep=_no_sleep) == 0
    assert remote_tables(fake) == source_tables(source)
    assert sum(SERIES.values()) == len(fake.rows("ohlcv_candles")) and len(fake.rows("fills")) == 12
    text = out.getvalue()
    assert f"migrating {source} into Supabase at {fake.url}" in text
    for line in (
        f"ohlcv_candles: {sum(SERIES.values())} candles copied in 3 series, 0 rejected",
        "bot_state: 2 copied, 0 skipped (Supabase's is as new or newer), 0 rejected",
        "fills: 12 copied, 0 rejected",
        "ai_regime_opinions: 8 copied (5 scored), 0 rejected",
        "regime_tier_transitions: 6 copied, 0 rejected",
        "migration complete",
    ):
        assert line in text.splitlines()
    # What the bot reads through the store API is what it had locally (paged: 100 rows per answer).
    reader, local = SupabaseStore(fake.url, fake.key), SQLiteStore(source)
    try:
        for (pair, interval_min), n in SERIES.items():
            assert reader.load_candles(pair, interval_min, 10_000) == candles(n, step=60 * interval_min)
        for pair in PAIRS:
            assert reader.fills(pair, 100) == local.fills(pair, 100)
            assert reader.tier_transitions(pair, 100) == local.tier_transitions(pair, 100)
            assert reader.ai_opinions(pair, 100) == local.ai_opinions(pair, 100)
        assert reader.load_state_entry("snapshot:XDGUSD") == local.load_state_entry("snapshot:XDGUSD")
    finally:
        reader.close()
        local.close()


def test_scored_opinions_keep_price_after_and_hit(fake, remote, source):
    migrate_quietly(source, remote)
    rows = {(r["pair"], r["ts"]): r for r in fake.rows("ai_regime_opinions")}
    for i in range(8):
        row = rows[(opinion_row(i)["pair"], opinion_row(i)["ts"])]
        if i < 5:
            assert (row["price_after"], row["hit"]) == (pytest.approx(0.2 + i / 100), int(i % 2 == 0))
        else:
            assert (row["price_after"], row["hit"]) == (None, None)
    scored = fake.requests_to("ai_regime_opinions", "PATCH")
    assert len(scored) == 5 and all(r["body"]["hit"] in (0, 1) for r in scored)


def test_running_it_twice_changes_nothing_and_duplicates_nothing(fake, remote, source):
    first, _ = migrate_quietly(source, remote, batch_size=400)
    after_first = {t: fake.rows(t) for t in TABLES}  # with Supabase's own transition ids
    second, lines = migrate_quietly(source, remote, batch_size=400)
    assert {t: fake.rows(t) for t in TABLES} == after_first
    assert remote_tables(fake) == source_tables(source)
    assert (first.state.copied, first.state.skipped) == (2, 0)
    assert (second.state.copied, second.state.skipped) == (0, 2)
    assert second.candles.copied == first.candles.copied == sum(SERIES.values())
    assert "bot_state snapshot:XDGUSD: skipped, Supabase's (updated_at 1700100000.500) is as new or newer" in lines


def test_a_newer_remote_document_is_kept_and_an_older_one_replaced(fake, remote, source):
    remote.save_state("snapshot:XDGUSD", {"from": "a bot already on Supabase"}, STATE_AT["snapshot:XDGUSD"] + 60)
    remote.save_state("snapshot:XBTUSD", {"from": "an older run"}, STATE_AT["snapshot:XBTUSD"] - 60)
    report, lines = migrate_quietly(source, remote)
    state = {r["key"]: r for r in fake.rows("bot_state")}
    assert state["snapshot:XDGUSD"]["data"] == {"from": "a bot already on Supabase"}
    assert state["snapshot:XDGUSD"]["updated_at"] == STATE_AT["snapshot:XDGUSD"] + 60
    local = {r["key"]: r for r in source_tables(source)["bot_state"]}
    assert state["snapshot:XBTUSD"] == local["snapshot:XBTUSD"]
    assert (report.state.copied, report.state.skipped, report.state.rejected) == (1, 1, 0)
    assert "bot_state snapshot:XBTUSD: copied (updated_at 1700100001.000)" in lines


def test_rows_still_in_the_wal_of_a_running_bot_are_copied(fake, remote, tmp_path):
    path = tmp_path / "running.sqlite3"
    bot = SQLiteStore(path)  # stays open, as a bot still running on the file would
    try:
        bot.upsert_candles("XDGUSD", 1, candles(300))
        bot.record_fill(fill_row(0))
        assert Path(f"{path}-wal").stat().st_size > 0
        report, _ = migrate_quietly(path, remote)
    finally:
        bot.close()
    assert (report.candles.copied, report.fills.copied) == (300, 1)
    assert remote_tables(fake) == source_tables(path)


# Faults -------------------------------------------------------------------------------


def test_transient_faults_are_retried_with_backoff_honouring_retry_after(fake, remote, source):
    sleeps: list[float] = []
    fake.fail_next(2, "http_503")
    fake.fail_next(1, "http_429", retry_after=7)
    fake.fail_next(1, "drop")
    report, lines = migrate_quietly(source, remote, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 7.0, 8.0]  # doubling, the server's Retry-After, doubling on
    assert [r["status"] for r in fake.requests[:5]] == [503, 503, 429, None, 201]
    assert remote_tables(fake) == source_tables(source)
    assert report.candles.copied == sum(SERIES.values())
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 4 and "retrying in 7 s (attempt 4 of 5)" in retries[2]
    assert retries[0].startswith("ohlcv_candles XBTUSD 1m from time ")


def test_a_lasting_outage_exits_1_and_a_second_run_completes_exactly(fake, source):
    class StopsSupabaseAtFirstProgress(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("ohlcv_candles") and fake.running:
                fake.stop()  # Supabase goes away after the first page landed
            return super().write(text)

    sleeps: list[float] = []
    out = StopsSupabaseAtFirstProgress()
    assert run(settings_for(fake), str(source), out, sleep=sleeps.append) == 1
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    text = out.getvalue()
    assert "ohlcv_candles XBTUSD 1m: 450/450 (100.0%)" in text  # the first series landed, then Supabase went away
    assert f"migration failed: ohlcv_candles XDGUSD 1m from time {T0}: " in text
    assert "gave up after 5 attempts" in text and RERUN_SAFE in text and "migration complete" not in text
    assert len(fake.rows("ohlcv_candles")) == SERIES[("XBTUSD", 1)]

    fake.start()
    again = io.StringIO()
    assert run(settings_for(fake), str(source), again, sleep=_no_sleep) == 0
    assert remote_tables(fake) == source_tables(source)
    assert "migration complete" in again.getvalue()


def test_a_refused_row_is_reported_and_the_rest_still_copied(tmp_path):
    stricter = SCHEMA.replace("    model TEXT,\n", "    model TEXT NOT NULL,\n")  # opinion 3 has no model
    assert stricter != SCHEMA
    path = seed(tmp_path / "bot.sqlite3", {("XDGUSD", 1): 60})
    bad = Candle(T0 + 60 * 25, 0.1, 0.1, 0.1, 0.1, math.inf, 1)  # JSON cannot carry it
    store = SQLiteStore(path)
    store.upsert_candles("XDGUSD", 1, [bad])
    store.close()
    with FakePostgrest(schema=stricter) as fake:
        remote = SupabaseStore(fake.url, fake.key)
        report, lines = migrate_quietly(path, remote, batch_size=20)
        remote.close()
        expected = source_tables(path)
        expected["ohlcv_candles"] = [r for r in expected["ohlcv_candles"] if r["time"] != bad.time]
        expected["ai_regime_opinions"] = [r for r in expected["ai_regime_opinions"] if r["model"] is not None]
        assert remote_tables(fake) == expected
    assert (report.candles.copied, report.candles.rejected) == (59, 1)
    assert (report.opinions.copied, report.opinions.rejected, report.scored) == (7, 1, 4)
    assert report.rejected == 2
    rejected = [line for line in lines if "rejected, not copied" in line]
    assert len(rejected) == 2
    assert rejected[0].startswith(f"ohlcv_candles XDGUSD 1m candle at time {bad.time}: rejected, not copied:")
    assert rejected[1].startswith(f"ai_regime_opinions XBTUSD {opinion_row(3)['ts']}: rejected, not copied:")
    assert "not-null" in rejected[1]


def test_a_config_error_part_way_stops_at_once(source):
    without_fills = SCHEMA.split("CREATE TABLE IF NOT EXISTS fills")[0]
    with FakePostgrest(schema=without_fills) as fake:
        remote = SupabaseStore(fake.url, fake.key)
        with pytest.raises(ConfigError, match=r"fills.*apply store/supabase_schema\.sql"):
            migrate_quietly(source, remote)  # no sleep: a refusal is not retried
        remote.close()
        assert len(fake.rows("ohlcv_candles")) == sum(SERIES.values()) and len(fake.rows("bot_state")) == 2
        assert len(fake.requests_to("fills", "POST")) == 1


def test_a_fault_reaching_max_attempts_raises_retry_later(fake, remote, source):
    sleeps: list[float] = []
    fake.fail_next(3, "http_500")
    with pytest.raises(RetryLater, match=r"ohlcv_candles XBTUSD 1m from time \d+: .*500.*gave up after 3 attempts"):
        migrate_quietly(source, remote, sleep=sleeps.append, max_attempts=3)
    assert sleeps == [1.0, 2.0] and fake.rows("ohlcv_candles") == []


# Refusing to start --------------------------------------------------------------------


def test_a_missing_source_file_is_exit_2_and_is_not_created(fake, remote, tmp_path):
    missing = tmp_path / "data" / "bot.sqlite3"
    out = io.StringIO()
    assert run(settings_for(fake), str(missing), out) == 2
    assert out.getvalue().startswith(f"migration not started: no SQLite store at {missing}: nothing to migrate")
    with pytest.raises(ConfigError, match="no SQLite store at"):
        migrate(missing, remote, out=io.StringIO())
    assert not missing.exists() and not missing.parent.exists()
    assert fake.requests == []


def test_a_file_that_is_not_the_bots_store_is_exit_2(fake, tmp_path):
    garbage = tmp_path / "notes.sqlite3"
    garbage.write_bytes(b"not a database, just text " * 200)
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.close()
    for path, message in (
        (garbage, f"migration not started: cannot read {garbage} as a SQLite store: file is not a database"),
        (empty, f"migration not started: {empty} is not the bot's SQLite store"),
    ):
        out = io.StringIO()
        assert run(settings_for(fake), str(path), out) == 2
        assert out.getvalue().startswith(message)
    assert fake.requests == []  # refused before Supabase is asked anything


def test_unset_supabase_settings_are_exit_2(source):
    out = io.StringIO()
    assert run(make_settings(), str(source), out) == 2
    assert "migration not started: SUPABASE_URL and SUPABASE_KEY must both be set" in out.getvalue()


def test_a_wrong_key_is_exit_2_naming_supabase_key(fake, source):
    out, sleeps = io.StringIO(), []
    settings = make_settings(SUPABASE_URL=fake.url, SUPABASE_KEY="not-the-key")
    assert run(settings, str(source), out, sleep=sleeps.append) == 2
    assert (
        "migration not started: store: checking table ohlcv_candles failed: Supabase answered 401" in out.getvalue()
        and "SUPABASE_KEY" in out.getvalue()
    )
    assert sleeps == [] and all(fake.rows(t) == [] for t in TABLES)


def test_supabase_down_from_the_start_is_exit_1_and_nothing_copied(fake, source):
    fake.stop()
    out, sleeps = io.StringIO(), []
    assert run(settings_for(fake), str(source), out, sleep=sleeps.append) == 1
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    assert "migration not started: checking Supabase" in out.getvalue() and "Nothing was copied" in out.getvalue()


# The source stays untouched; progress -------------------------------------------------


def test_the_source_file_is_byte_identical_afterwards(fake, remote, source):
    before = digest(source)
    migrate_quietly(source, remote)
    assert digest(source) == before
    # SQLite's read-only WAL reader may leave its (empty) side files, nothing else.
    assert {p.name for p in source.parent.iterdir()} <= {source.name, f"{source.name}-wal", f"{source.name}-shm"}
    wal = Path(f"{source}-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_progress_is_throttled_and_ends_at_100_percent(remote, tmp_path):
    path = seed(tmp_path / "bot.sqlite3", {("XDGUSD", 1): 2000, ("XDGUSD", 15): 30}, events=False)
    _, lines = migrate_quietly(path, remote, batch_size=25)  # 80 pages of the 1m series
    long = [line for line in lines if line.startswith("ohlcv_candles XDGUSD 1m:")]
    assert len(long) == 20
    assert long[0] == "ohlcv_candles XDGUSD 1m: 100/2000 (5.0%)"
    assert long[-1] == "ohlcv_candles XDGUSD 1m: 2000/2000 (100.0%)"
    assert [line for line in lines if line.startswith("ohlcv_candles XDGUSD 15m:")] == [
        "ohlcv_candles XDGUSD 15m: 25/30 (83.3%)",
        "ohlcv_candles XDGUSD 15m: 30/30 (100.0%)",
    ]


def test_backoff_and_progress_rules():
    assert [backoff_delay(a, None) for a in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(2, 12.5) == 12.5
    assert progress_due(0, 500, 40320) is False and progress_due(1500, 2500, 40320) is True
    assert progress_due(39900, 40320, 40320) is True and progress_due(40320, 40400, 40320) is False
    assert progress_line("ohlcv_candles XDGUSD 1m", 12000, 40320) == "ohlcv_candles XDGUSD 1m: 12000/40320 (29.8%)"
    assert progress_line("fills", 12, 10) == "fills: 12/12 (100.0%)"  # rows written during the copy


# The command line ---------------------------------------------------------------------


def test_bot_py_migrate_to_supabase_copies_the_store(fake, source, tmp_path, bot_process):
    env = {"SUPABASE_URL": fake.url, "SUPABASE_KEY": fake.key}
    args = ["--migrate-to-supabase", "--db", str(source)]  # the working folder (tmp_path) has no .env
    p = bot_process(args, env=env)
    assert p.proc.wait(60) == 0
    p.wait_for_log(r"^migration complete$", timeout=10)
    assert "ohlcv_candles XDGUSD 1m: 2600/2600 (100.0%)" in p.lines
    assert "fills: 12 copied, 0 rejected" in p.lines
    assert remote_tables(fake) == source_tables(source)
