"""``store/supabase_schema.sql`` on a real PostgreSQL (Debian's ``postgresql`` package), not a lookalike.

A throwaway cluster on a Unix socket in a temporary directory: the schema applies twice, the
keys the store writes on (``ON CONFLICT``) exist, and a project set up with the older schema
(transitions without a unique key, a duplicate in them) is upgraded. Skipped without
PostgreSQL, unless ``REQUIRE_POSTGRES=1`` (CI installs it and makes it a failure).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = (ROOT / "store" / "supabase_schema.sql").read_text()


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@pytest.fixture(scope="module")
def psql() -> Iterator[Callable[[str], str]]:
    """Run SQL (given on stdin, so the cluster's user needs no access to the checkout); returns stdout."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason} (REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="bot-postgres-"))  # not under pytest's root-only directory
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        base.chmod(0o700)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if as_user:
        shutil.chown(sock, "postgres")

    def run(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run([*as_user, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{args[0]} failed: {done.stderr}")
        return done.stdout

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    server = ["-o", f"-k {sock} -c listen_addresses=''", "-l", str(base / "server.log")]  # the log keeps no pipe open
    run(str(bin_dir / "pg_ctl"), "-D", str(data), *server, "-w", "start")
    try:
        yield lambda sql: run(
            str(bin_dir / "psql"), "-h", str(sock), "-U", "postgres", "-d", "postgres", "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1", stdin=sql,
        )  # fmt: skip
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_the_schema_applies_twice_and_the_store_keys_exist(psql):
    psql(SCHEMA)
    psql(SCHEMA)
    tables = psql("select string_agg(tablename, ',' order by tablename) from pg_tables where schemaname = 'public'")
    assert tables.strip() == "ai_regime_opinions,bot_leases,bot_state,fills,ohlcv_candles,regime_tier_transitions"
    rls = psql("select count(*) from pg_tables where schemaname = 'public' and rowsecurity")
    assert rls.strip() == "6"
    out = psql(
        """
        insert into ohlcv_candles values ('XDGUSD', 1, 60, 1, 1, 1, 1, 5, 0)
            on conflict (pair, interval_min, time) do update set close = excluded.close;
        insert into ohlcv_candles values ('XDGUSD', 1, 60, 1, 1, 1, 2, 5, 0)
            on conflict (pair, interval_min, time) do update set close = excluded.close;
        insert into bot_state values ('snapshot:XDGUSD', '{"tier": 1}', 1.5)
            on conflict (key) do update set data = excluded.data;
        insert into regime_tier_transitions (ts, pair, from_tier, to_tier, from_direction, to_direction, reason)
            values (5, 'XDGUSD', 0, 1, 'symmetric', 'long_bias', 'first') on conflict (pair, ts) do nothing;
        insert into regime_tier_transitions (ts, pair, from_tier, to_tier, from_direction, to_direction, reason)
            values (5, 'XDGUSD', 0, 1, 'symmetric', 'long_bias', 'again') on conflict (pair, ts) do nothing;
        select (select close from ohlcv_candles), (select data->>'tier' from bot_state),
               (select string_agg(reason, ',') from regime_tier_transitions);
        """
    )
    assert out.strip() == "2|1|first"


def test_a_project_on_the_older_schema_is_upgraded(psql):
    psql(SCHEMA)
    psql(
        """
        truncate regime_tier_transitions;
        drop index regime_tier_transitions_pair_ts_key;
        create index regime_tier_transitions_pair_ts on regime_tier_transitions (pair, ts);
        insert into regime_tier_transitions (ts, pair, from_tier, to_tier, from_direction, to_direction, reason)
            values (7, 'XDGUSD', 0, 2, 'symmetric', 'short_bias', 'kept'),
                   (7, 'XDGUSD', 0, 2, 'symmetric', 'short_bias', 'repeat after a crash'),
                   (8, 'XDGUSD', 2, 0, 'short_bias', 'symmetric', 'later');
        """
    )
    psql(SCHEMA)
    out = psql("select string_agg(reason, ',' order by ts) from regime_tier_transitions")
    assert out.strip() == "kept,later"
    indexes = psql(
        "select string_agg(indexname, ',' order by indexname) from pg_indexes "
        "where tablename = 'regime_tier_transitions'"
    )
    assert indexes.strip() == "regime_tier_transitions_pair_ts_key,regime_tier_transitions_pkey"
