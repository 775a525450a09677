"""Store contract tests. Every backend must pass them (the ``store`` fixture is parametrised)."""

import json
import math
import os
import re
import sqlite3
from pathlib import Path

import pytest
from fake_postgrest import FakePostgrest

from candles import Candle
from errors import BadData, ConfigError, RetryLater
from store.interface import SCHEMA
from store.mirrored import LocalMirror, MirroredStore
from store.sqlite import SQLiteStore, StoreLock
from store.supabase import SupabaseStore

PAIR = "XDGUSD"


def candles(start: int, n: int, step: int = 60, price: float = 0.08) -> list[Candle]:
    return [Candle(start + i * step, price, price * 1.01, price * 0.99, price, 1000.0 + i, i) for i in range(n)]


@pytest.fixture(scope="module")
def postgrest():
    """One local PostgREST-protocol server for the module (emptied before each test that uses it)."""
    with FakePostgrest() as fake:
        yield fake


WRITES = (
    "upsert_candles", "prune_candles", "save_state", "copy_state", "record_tier_transition", "record_ai_opinion",
    "record_ai_opinion_outcome", "record_fill",
)  # fmt: skip
TABLES = ("ohlcv_candles", "bot_state", "regime_tier_transitions", "ai_regime_opinions", "fills")


def send_every_write(store: MirroredStore) -> None:
    """Flush after each write, so the contract also runs through Supabase's side of the mirror."""

    def sending(write):
        def write_and_send(*args, **kwargs):
            result = write(*args, **kwargs)
            assert store.flush(), store.status()
            return result

        return write_and_send

    for name in WRITES:
        setattr(store, name, sending(getattr(store, name)))


def local_rows(path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


@pytest.fixture(
    params=["sqlite-file", "sqlite-memory", "supabase", "supabase-capped", "mirrored-pending", "mirrored-sent"]
)
def store(request, tmp_path):
    """Every backend. ``mirrored-pending``: Supabase with its local mirror and every write still in
    the outbox; ``mirrored-sent``: each write sent at once (and both sides compared at the end)."""
    fake = None
    if request.param.startswith(("supabase", "mirrored")):
        fake = request.getfixturevalue("postgrest")
        fake.reset()
        # "capped": the server answers at most 7 rows per request, so every multi-row read pages.
        fake.max_rows = 7 if request.param in ("supabase-capped", "mirrored-sent") else 1000
    if request.param.startswith("supabase"):
        s = SupabaseStore(fake.url, fake.key)
    elif request.param.startswith("mirrored"):
        s = MirroredStore(
            LocalMirror(tmp_path / "mirror.sqlite3"),
            SupabaseStore(fake.url, fake.key),
            SupabaseStore(fake.url, fake.key),
            now=lambda: 1_000_000.0,
        )
        if request.param == "mirrored-sent":
            send_every_write(s)
    else:
        s = SQLiteStore(tmp_path / "store.sqlite3" if request.param == "sqlite-file" else ":memory:")
    yield s
    if request.param == "mirrored-sent":
        assert s.status()["pending_writes"] == 0 and s.status()["state"] == "ok"
        for table in TABLES:  # Supabase holds exactly what the mirror holds
            assert len(fake.rows(table)) == local_rows(tmp_path / "mirror.sqlite3", table), table
    s.close()


def test_upsert_is_idempotent_and_updates_on_the_key(store):
    batch = candles(1_000_020, 50)
    store.upsert_candles(PAIR, 1, batch)
    store.upsert_candles(PAIR, 1, batch)
    assert store.count_candles(PAIR, 1) == 50
    changed = batch[10]._replace(close=0.09, high=0.095)
    store.upsert_candles(PAIR, 1, [changed])
    assert store.count_candles(PAIR, 1) == 50
    assert store.load_candles(PAIR, 1, 50)[10] == changed


def test_load_returns_the_newest_rows_oldest_first(store):
    store.upsert_candles(PAIR, 1, list(reversed(candles(1_000_020, 100))))
    rows = store.load_candles(PAIR, 1, 30)
    assert [c.time for c in rows] == [1_000_020 + 60 * i for i in range(70, 100)]
    assert len(store.load_candles(PAIR, 1, 1000)) == 100
    assert store.load_candles(PAIR, 1, 0) == []
    assert all(isinstance(c, Candle) for c in rows)


def test_pairs_and_intervals_are_separate(store):
    store.upsert_candles(PAIR, 1, candles(1_000_020, 10))
    store.upsert_candles(PAIR, 15, candles(1_000_800, 4, step=900))
    store.upsert_candles("XBTUSD", 1, candles(1_000_020, 3))
    assert store.count_candles(PAIR, 1) == 10
    assert store.count_candles(PAIR, 15) == 4
    assert store.count_candles("XBTUSD", 1) == 3
    assert store.count_candles("ETHUSD", 1) == 0


def test_prune_respects_retention_and_keeps_the_training_target(store):
    store.upsert_candles(PAIR, 1, candles(1_000_020, 100))
    cutoff = 1_000_020 + 60 * 80  # retention would leave only 20 rows
    removed = store.prune_candles(PAIR, 1, older_than=cutoff, keep_newest=50)
    assert removed == 50
    rows = store.load_candles(PAIR, 1, 1000)
    assert len(rows) == 50 and rows[0].time == 1_000_020 + 60 * 50
    removed = store.prune_candles(PAIR, 1, older_than=cutoff, keep_newest=10)
    assert removed == 30
    assert store.count_candles(PAIR, 1) == 20
    assert store.prune_candles(PAIR, 1, older_than=cutoff, keep_newest=1000) == 0
    assert store.prune_candles("NOPE", 1, older_than=cutoff, keep_newest=0) == 0


def test_state_round_trip_and_replace(store):
    assert store.load_state("snapshot:XDGUSD") is None
    store.save_state("snapshot:XDGUSD", {"tier": 2, "nested": {"a": [1, 2.5, None]}}, 100.0)
    assert store.load_state("snapshot:XDGUSD") == {"tier": 2, "nested": {"a": [1, 2.5, None]}}
    store.save_state("snapshot:XDGUSD", {"tier": 1}, 200.0)
    assert store.load_state("snapshot:XDGUSD") == {"tier": 1}


def test_a_state_that_is_not_json_safe_changes_nothing(store):
    store.save_state("k", {"ok": 1}, 1.0)
    with pytest.raises(ValueError):
        store.save_state("k", {"bad": math.nan}, 2.0)
    assert store.load_state("k") == {"ok": 1}


def test_a_save_keeps_the_document_it_replaces_and_a_move_loses_nothing(store):
    store.save_state("snapshot:X", {"n": 1}, 1.0, previous_key="snapshot:X:previous")
    assert store.load_state("snapshot:X:previous") is None  # nothing was replaced
    store.save_state("snapshot:X", {"n": 2}, 2.0, previous_key="snapshot:X:previous")
    store.save_state("snapshot:X", {"n": 3}, 3.0, previous_key="snapshot:X:previous")
    assert store.load_state("snapshot:X") == {"n": 3}
    assert store.load_state("snapshot:X:previous") == {"n": 2}
    assert store.copy_state("snapshot:X", "snapshot:X:rejected:t", remove=True) is True
    assert store.load_state("snapshot:X") is None
    assert store.load_state("snapshot:X:rejected:t") == {"n": 3}
    assert store.copy_state("snapshot:X", "elsewhere") is False  # nothing to copy
    assert store.copy_state("snapshot:X:previous", "snapshot:X") is True
    assert store.load_state("snapshot:X") == store.load_state("snapshot:X:previous") == {"n": 2}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"version": 1, "pair": "XD', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"grid": {"balances": {"quote": NaN}}}', "grid.balances.quote = nan, which is not a finite number"),
        ('{"tier": {"since": 1e999}}', "tier.since = inf, which is not a finite number"),
    ],
)
def test_a_stored_document_that_is_not_a_finite_json_object_is_refused_not_ignored(tmp_path, text, problem):
    store = SQLiteStore(tmp_path / "s.sqlite3")
    with sqlite3.connect(tmp_path / "s.sqlite3") as conn:  # written by something else than the store
        conn.execute("INSERT INTO bot_state VALUES ('snapshot:X', ?, 1.0)", (text,))
    with pytest.raises(BadData, match=re.escape(problem)):
        store.load_state("snapshot:X")
    assert store.copy_state("snapshot:X", "aside", remove=True)  # moved as it is, byte for byte
    with sqlite3.connect(tmp_path / "s.sqlite3") as conn:
        assert conn.execute("SELECT key, data FROM bot_state").fetchall() == [("aside", text)]
    store.close()


def test_one_bot_per_store_the_lock_names_its_holder_and_is_free_once_released(tmp_path):
    db = str(tmp_path / "bot.sqlite3")
    first = StoreLock.acquire(db, mode="paper", host="127.0.0.1", now=5.0)
    with pytest.raises(ConfigError, match=rf"another bot \(PID {os.getpid()}, dashboard port not bound yet\)"):
        StoreLock.acquire(db, mode="paper", host="127.0.0.1", now=6.0)
    first.update(port=8123)
    with pytest.raises(ConfigError) as refused:
        StoreLock.acquire(db, mode="paper", host="127.0.0.1", now=6.0)
    assert str(refused.value) == (
        f"another bot (PID {os.getpid()}, dashboard port 8123) is using {db}; stop it first or use another --db"
    )
    assert json.loads(Path(f"{db}.lock").read_text()) == {
        "pid": os.getpid(), "port": 8123, "host": "127.0.0.1", "started_at": 5.0, "mode": "paper",
    }  # fmt: skip
    first.release()
    second = StoreLock.acquire(db, mode="sim", host="127.0.0.1", now=7.0)
    assert json.loads(Path(f"{db}.lock").read_text())["mode"] == "sim"
    second.release()


def test_tier_transitions_are_recorded_newest_first(store):
    for i in range(3):
        store.record_tier_transition(
            {
                "ts": 100.0 + i,
                "pair": PAIR,
                "from_tier": i,
                "to_tier": i + 1,
                "from_direction": "symmetric",
                "to_direction": "long_bias",
                "reason": f"r{i}",
                "regime": "BULLISH",
                "raw_confidence": 0.5,
                "effective_confidence": 0.4,
                "bias_signal": 0.3,
                "shadow": 0,
            }
        )
    rows = store.tier_transitions(PAIR)
    assert [r["reason"] for r in rows] == ["r2", "r1", "r0"]
    assert rows[0]["to_tier"] == 3 and rows[0]["effective_confidence"] == 0.4
    assert store.tier_transitions("XBTUSD") == []


def test_a_tier_transition_written_twice_is_kept_once(store):
    row = {
        "ts": 100.0, "pair": PAIR, "from_tier": 0, "to_tier": 1, "from_direction": "symmetric",
        "to_direction": "long_bias", "reason": "r", "regime": "BULLISH", "raw_confidence": 0.5,
        "effective_confidence": 0.4, "bias_signal": 0.3, "shadow": 0,
    }  # fmt: skip
    store.record_tier_transition(row)
    store.record_tier_transition({**row, "reason": "again"})
    assert [r["reason"] for r in store.tier_transitions(PAIR)] == ["r"]


def test_an_older_file_with_repeated_transitions_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.replace(
        "CREATE UNIQUE INDEX IF NOT EXISTS regime_tier_transitions_pair_ts_key",
        "CREATE INDEX IF NOT EXISTS regime_tier_transitions_pair_ts",
    ))  # fmt: skip
    for reason in ("first", "repeat after a crash"):
        conn.execute(
            "INSERT INTO regime_tier_transitions (ts, pair, from_tier, to_tier, from_direction, to_direction, reason) "
            "VALUES (5.0, ?, 0, 1, 'symmetric', 'long_bias', ?)",
            (PAIR, reason),
        )
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    assert [r["reason"] for r in store.tier_transitions(PAIR)] == ["first"]
    store.record_tier_transition({"ts": 5.0, "pair": PAIR, "from_tier": 0, "to_tier": 1, "from_direction": "s",
                                  "to_direction": "l", "reason": "third", "shadow": 0})  # fmt: skip
    assert len(store.tier_transitions(PAIR)) == 1
    store.close()


def test_sqlite_file_is_wal_and_survives_reopening(tmp_path):
    path = tmp_path / "sub" / "bot.sqlite3"
    s = SQLiteStore(path)
    s.upsert_candles(PAIR, 1, candles(1_000_020, 5))
    s.save_state("k", {"v": 1}, 1.0)
    s.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SQLiteStore(path)
    assert again.count_candles(PAIR, 1) == 5
    assert again.load_state("k") == {"v": 1}
    again.close()


def test_unreadable_store_is_a_clear_config_error(tmp_path):
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match=r"cannot open the store at .*garbage\.sqlite3"):
        SQLiteStore(path)


def test_runtime_faults_are_retry_later_and_misuse_is_not_masked(tmp_path):
    path = tmp_path / "faulty.sqlite3"
    s = SQLiteStore(path)
    s.upsert_candles(PAIR, 1, candles(1_000_020, 5))
    other = sqlite3.connect(path)
    other.execute("DROP TABLE ohlcv_candles")
    other.commit()
    other.close()
    with pytest.raises(RetryLater, match="store: counting candles failed: no such table"):
        s.count_candles(PAIR, 1)
    with pytest.raises(RetryLater, match="store: writing candles failed"):
        s.upsert_candles(PAIR, 1, candles(1_000_020, 1))
    s.save_state("k", {"still": "works"}, 1.0)  # the other tables are fine
    assert s.load_state("k") == {"still": "works"}
    s.close()


def fill_row(order_id: str, ts: float, **overrides) -> dict:
    row = {
        "pair": "XDGUSD", "order_id": order_id, "ts": ts, "exchange": "paper", "slot": 0, "leg": "B",
        "role": "entry", "side": "buy", "price": 0.1, "volume": 200.0, "fee": 0.05,
        "regime_at_entry": "RANGING", "tier_at_entry": 0, "cycle_net": None,
    }  # fmt: skip
    return {**row, **overrides}


def test_fills_are_recorded_once_per_order_newest_first(store):
    store.record_fill(fill_row("g1-0B", 100.0))
    store.record_fill(fill_row("g2-0B", 200.0, role="exit", side="sell", price=0.101, cycle_net=0.1))
    store.record_fill(fill_row("g1-0B", 100.0, price=0.5))  # a retried write: no duplicate, no change
    store.record_fill(fill_row("g9-0A", 300.0, pair="XBTUSD"))
    rows = store.fills("XDGUSD")
    assert [r["order_id"] for r in rows] == ["g2-0B", "g1-0B"]
    assert rows[1]["price"] == 0.1 and rows[1]["cycle_net"] is None
    assert rows[0]["cycle_net"] == 0.1 and rows[0]["side"] == "sell"
    assert store.fills("XDGUSD", limit=1)[0]["order_id"] == "g2-0B"
