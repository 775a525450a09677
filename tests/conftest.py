"""Shared test fixtures: settings, a fully wired bot on the simulated clock,
and a real ``python bot.py`` subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot import Bot
from clock import SimClock
from config import Settings, load_settings
from market_sim import SimulatedMarket
from store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
DOGE_1M = SHARED_DATA / "DOGEUSDT_1m.csv"
SIM_START = 1_767_225_600


def make_settings(**overrides: Any) -> Settings:
    """Settings from defaults plus ``overrides`` only (no environment, no .env)."""
    return load_settings(overrides, environ={}, env_file=None)


def make_sim_bot(db_path: Path | str, *, seed: int = 7, start: int = SIM_START, **overrides: Any) -> Bot:
    """A started bot on the simulator, a simulated clock and a SQLite store."""
    settings = make_settings(SIM_SEED=seed, SIM_START=start, **overrides)
    clock = SimClock(start)
    market = SimulatedMarket(clock, seed=seed, start=start)
    store = SQLiteStore(db_path)
    bot = Bot(settings, mode="sim", clock=clock, market=market, store=store, truth=market.current_truth)
    bot.start()
    return bot


def run_ticks(bot: Bot, n: int, interval_sec: float | None = None) -> None:
    """``n`` main-loop cycles, advancing the simulated clock between them."""
    step = interval_sec if interval_sec is not None else bot.settings.LOOP_INTERVAL_SEC
    for _ in range(n):
        bot.tick()
        bot.clock.advance(step)


@pytest.fixture
def sim_bot(tmp_path: Path) -> Iterator[Bot]:
    bot = make_sim_bot(tmp_path / "bot.sqlite3")
    yield bot
    bot.store.close()


class BotProcess:
    """A real ``python bot.py`` subprocess on a free port, with its log captured."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> None:
        full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bot.py"), *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; output:\n{self.output}")

    def wait_ready(self, timeout: float = 30.0) -> int:
        m = self.wait_for_log(r"dashboard on http://[^:]+:(\d+)/", timeout)
        self.port = int(m.group(1))
        return self.port

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, _, body = self.request("GET", path, headers=headers)
        return status, json.loads(body)

    def wait_status(self, predicate, timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict:
        """Poll /api/status until ``predicate(status)`` holds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            code, last = self.get_json("/api/status", headers)
            if code == 200 and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"status never satisfied the condition; last: {json.dumps(last)[:2000]}")

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def bot_process(tmp_path: Path):
    started: list[BotProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> BotProcess:
        p = BotProcess(args, cwd=cwd or tmp_path, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()
