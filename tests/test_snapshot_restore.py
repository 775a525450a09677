"""A real ``python bot.py`` on a store holding a snapshot it must not trust, and one bot per store.

Each snapshot is written straight into the SQLite file, as a crash, a disk fault or a hand edit
would leave it; the bot must refuse it at start (exit 2) saying what is wrong and how to recover.
"""

import json
import sqlite3

from conftest import SIM_START

from store.interface import SCHEMA

SAVED_AT = SIM_START + 7200.0  # the sim clock resumes here: no value below lies in the future
PAIR = "XDGUSD"
KEY = f"snapshot:{PAIR}"


def good_snapshot(**changes) -> dict:
    """A small snapshot the bot accepts: a tier, and a grid with balances and no orders."""
    snap = {
        "version": 1,
        "pair": PAIR,
        "mode": "sim",
        "saved_at": SAVED_AT,
        "tier": {"tier": 1, "direction": "long_bias", "since": SAVED_AT - 600},
        "pinned_since": SAVED_AT - 3600,
        "models": {},
        "regime_history": [],
        "grid": {
            "engine": {
                "posture": {"tier": 0, "direction": "symmetric", "since": SAVED_AT - 600},
                "price": 0.1,
                "balances": {"quote": 500.0, "base": 5000.0},
                "orders": [],
                "legs": {},
                "seq": 0,
                "realized_quote": 0.0,
                "fees_quote": 0.0,
                "cycles": 0,
            }
        },
    }
    snap.update(changes)
    return snap


def write_rows(db, rows: dict[str, str]) -> None:
    """``bot_state`` rows as raw text, the way the store keeps them."""
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        for key, text in rows.items():
            conn.execute("INSERT OR REPLACE INTO bot_state VALUES (?, ?, ?)", (key, text, SAVED_AT))


def state_rows(db) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT key, data FROM bot_state WHERE key LIKE 'snapshot:%'").fetchall())


def sim_args(db, *extra: str) -> list[str]:
    return ["--market", "sim", "--speed", "1", "--port", "0", "--db", str(db), *extra]


def engine(**changes) -> str:
    snap = good_snapshot()
    snap["grid"]["engine"]["balances"].update(changes)
    return json.dumps(snap)


CORRUPT = {
    "truncated JSON": (json.dumps(good_snapshot())[:60], "is not valid JSON"),
    "not an object": ("[1, 2, 3]", "holds a JSON list, not an object"),
    "NaN balance": (engine(quote=float("nan")), "grid.engine.balances.quote = nan, which is not a finite number"),
    "Infinity time": (
        json.dumps(good_snapshot(tier={"tier": 0, "direction": "symmetric", "since": float("inf")})),
        "tier.since = inf, which is not a finite number",
    ),
    "balance 1e300": (engine(quote=1e300), "grid.engine.balances.quote = 1e+300: must lie in [0, 1e+12]"),
    "wrong version": (json.dumps(good_snapshot(version=2)), "version = 2: this bot reads version 1 only"),
}


def test_an_untrustworthy_snapshot_stops_the_start_saying_what_and_how_to_recover(tmp_path, bot_process):
    started = {}
    for i, (case, (text, problem)) in enumerate(CORRUPT.items()):  # one process per case, all at once
        db = tmp_path / f"sim{i}.sqlite3"
        write_rows(db, {KEY: text})
        started[case] = (db, text, problem, bot_process(sim_args(db)))
    for case, (db, text, problem, p) in started.items():
        assert p.proc.wait(60) == 2, (case, p.output)
        message = p.output.splitlines()[-1]
        assert message.startswith(f"bot.py: the snapshot {KEY} in {db} cannot be trusted: "), (case, p.output)
        assert problem in message, case
        assert "--restore-previous" in message and "--discard-snapshot" in message, case
        assert state_rows(db) == {KEY: text}, case  # nothing was changed


def test_restore_previous_starts_from_the_kept_copy_and_discard_starts_afresh_losing_nothing(tmp_path, bot_process):
    db = tmp_path / "sim.sqlite3"
    bad = engine(quote=1e300)
    write_rows(db, {KEY: bad})
    p = bot_process(sim_args(db, "--restore-previous"))  # nothing kept yet: the message says what else to do
    assert p.proc.wait(30) == 2
    assert p.output.splitlines()[-1] == (
        f"bot.py: the previous snapshot {KEY}:previous in {db} cannot be used either: no previous snapshot is "
        f"kept under '{KEY}:previous'. Start from scratch with --discard-snapshot (the current snapshot is moved "
        f"aside to {KEY}:rejected:<time>, not deleted)"
    )

    previous = json.dumps(good_snapshot())
    write_rows(db, {f"{KEY}:previous": previous})
    p = bot_process(sim_args(db, "--restore-previous"))
    p.wait_ready()
    p.wait_for_log("tier state restored: tier 1 long_bias")
    p.wait_for_log(f"started from the previous snapshot {KEY}:previous")
    assert p.terminate() == 0
    rows = state_rows(db)
    rejected = [k for k in rows if k.startswith(f"{KEY}:rejected:")]
    assert len(rejected) == 1 and rows[rejected[0]] == bad  # moved aside as it was
    assert json.loads(rows[KEY])["saved_at"] >= SAVED_AT  # the bot's own save since

    write_rows(db, {KEY: "[]"})
    p = bot_process(sim_args(db, "--discard-snapshot"))
    p.wait_ready()
    p.wait_for_log(f"the snapshot {KEY} was moved aside to {KEY}:rejected:")
    assert "tier state restored" not in p.output
    assert p.terminate() == 0
    assert "[]" in state_rows(db).values()  # the discarded one is kept aside too


def test_an_override_restored_never_outlives_its_max_ttl(tmp_path, bot_process, llm):
    applied = SAVED_AT - 60
    override = {
        "tier": 1, "direction": "long_bias", "applied_at": applied, "expires_at": applied + 1e9,
        "source_conviction": 80, "opinion_ts": applied,
    }  # fmt: skip
    db = tmp_path / "sim.sqlite3"
    write_rows(db, {KEY: json.dumps(good_snapshot(advisor={"override": override, "scorecard": {}}))})
    env = {"AI_REGIME_ADVISOR_ENABLED": "true", "AI_BASE_URL": llm.url, "AI_MODEL": "local-model"}
    p = bot_process(sim_args(db), env=env)
    p.wait_ready()
    st = p.wait_status(lambda s: s["ai_regime_advisor"] is not None)
    block = st["ai_regime_advisor"]["override"]
    assert block["active"] is True and block["expires_at"] == applied + 3600  # AI_OVERRIDE_MAX_TTL_SEC
    assert "cut to" in p.output
    assert any(e["source"] == "snapshot" and "AI_OVERRIDE_MAX_TTL_SEC" in e["message"] for e in st["health"]["errors"])


def test_a_second_bot_on_the_same_store_is_refused_naming_the_first_until_it_dies(tmp_path, bot_process):
    db = tmp_path / "sim.sqlite3"
    first = bot_process(sim_args(db))
    port = first.wait_ready()
    second = bot_process(sim_args(db))
    assert second.proc.wait(30) == 2
    assert second.output.splitlines()[-1] == (
        f"bot.py: another bot (PID {first.proc.pid}, dashboard port {port}) is using {db}; "
        "stop it first or use another --db"
    )
    first.kill()  # kill -9: the OS drops the lock
    third = bot_process(sim_args(db))
    third.wait_ready()
    assert third.terminate() == 0
