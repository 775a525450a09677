"""Shared test fixtures: settings, a fully wired bot on the simulated clock,
and a real ``python bot.py`` subprocess."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bot_process import BotProcess
from fake_llm import FakeLLM
from threadpoolctl import threadpool_limits

from ai_advisor import Panel
from bot import build_bot
from clock import SimClock
from config import Settings, load_settings
from loop.cycle import Bot
from market.sim import SimulatedMarket
from store.sqlite import SQLiteStore

# One BLAS thread, as the bot runs (app.py): the models' small matrix products are slower on several
# threads, and far slower on a busy machine. After the imports, so every loaded BLAS is limited.
threadpool_limits(1)

# The dashboard browser tests' fixtures (one Chromium per module, test sites, a real status).
pytest_plugins = ["dashboard_page"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", ROOT.parent / "shared" / "data"))
DOGE_1M = SHARED_DATA / "DOGEUSDT_1m.csv"
SIM_START = 1_767_225_600


def make_settings(**overrides: Any) -> Settings:
    """Settings from defaults plus ``overrides`` only (no environment, no .env).

    The direction skill gate is off unless a test turns it on: a fresh bot has no record of
    direction calls, so with the gate every directional tier would wait for hours of calls, and
    most tests here are about what confidence, consensus, dwell, capacity and overrides do.
    """
    return load_settings({"REGIME_SKILL_GATE": False, **overrides}, environ={}, env_file=None)


def make_sim_bot(
    db_path: Path | str,
    *,
    seed: int = 7,
    start: int = SIM_START,
    make_panel: Callable[[Settings], Panel] | None = None,
    **overrides: Any,
) -> Bot:
    """A started bot on the simulator, a simulated clock and a SQLite store.

    ``make_panel`` builds the advisor's LLM panel from the settings (to give it a test clock).
    """
    settings = make_settings(SIM_SEED=seed, SIM_START=start, **overrides)
    clock = SimClock(start)
    market = SimulatedMarket(clock, seed=seed, start=start)
    store = SQLiteStore(db_path)
    panel = make_panel(settings) if make_panel else None
    bot = build_bot(
        settings, mode="sim", clock=clock, market=market, store=store, truth=market.current_truth, panel=panel
    )
    bot.start()
    return bot


def run_ticks(bot: Bot, n: int, interval_sec: float | None = None) -> None:
    """``n`` main-loop cycles, advancing the simulated clock between them."""
    step = interval_sec if interval_sec is not None else bot.settings.LOOP_INTERVAL_SEC
    for _ in range(n):
        bot.tick()
        bot.clock.advance(step)


class SleepRecorder:
    """The client's ``sleep``: records each delay and lets it pass on the simulated clock."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.sleep(seconds)


class StepClock:
    """Monotonic seconds that move only when told (panel cool-downs without sleeping)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    """A local OpenAI-compatible server answering a tier 1 long_bias opinion unless scripted."""
    with FakeLLM() as fake:
        yield fake


@pytest.fixture
def sim_bot(tmp_path: Path) -> Iterator[Bot]:
    bot = make_sim_bot(tmp_path / "bot.sqlite3")
    yield bot
    bot.store.close()


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
