"""The runner of the main loop: pacing, the heartbeat, publishing the status, stopping.

:class:`Runner` calls :meth:`Bot.tick` on the loop's cadence; a cycle that
raises is counted and shown, and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from health import HealthFacts, verdict
from http_api import StatusBoard
from loop.cycle import Bot

log = logging.getLogger("bot")


class Runner:
    """Paces :meth:`Bot.tick`, publishes the status and the health facts, beats the heartbeat, stops on request.

    The heartbeat beats only when a cycle completes: a loop whose every cycle
    raises is not alive in any sense an operator cares about.
    """

    def __init__(
        self,
        bot: Bot,
        board: StatusBoard,
        *,
        interval_sec: float,
        stop_event: threading.Event,
        publish_every_wall_sec: float = 0.2,
    ) -> None:
        self.bot, self.board, self.interval = bot, board, interval_sec
        self.stop_event = stop_event
        self.publish_every = publish_every_wall_sec
        self._last_publish: float | None = None
        self._publish_lock = threading.Lock()
        self.health_facts: HealthFacts | None = None  # the latest, for /healthz (read by HTTP threads)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        clock = self.bot.clock
        next_due = clock.now()
        while not self.stop_event.is_set():
            self.cycle()
            if until is not None and until():
                break
            next_due = max(next_due + self.interval, clock.now())
            clock.sleep(next_due - clock.now())
        self.publish()

    def cycle(self) -> None:
        try:
            self.bot.tick()
        except Exception as exc:  # one bad cycle must not end the bot
            log.exception("cycle failed")
            self.bot.cycle_failed(exc)
        else:
            self.board.beat()
        self.health_facts = self.bot.health_facts()
        wall = time.monotonic()
        if self._last_publish is None or wall - self._last_publish >= self.publish_every:
            self.publish()

    def health(self) -> dict[str, Any]:
        """``/healthz``: the verdict of the last cycle's facts at the time of the request."""
        return verdict(self.health_facts, now=self.bot.clock.now(), loop_age_sec=self.board.last_cycle_age())

    def publish(self) -> None:
        """Publish the status; a bug in building it is logged and shown, and the loop goes on."""
        try:
            with self._publish_lock:
                self.board.publish(self.bot.status())
        except Exception as exc:
            log.exception("publishing the status failed")
            self.bot.record_error("status", f"the status could not be published: {type(exc).__name__}: {exc}",
                                  self.bot.clock.now())  # fmt: skip
        self._last_publish = time.monotonic()

    def action(self, handler: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Callable[[Mapping], dict]:
        """``handler`` for the action router: the published status shows its effect when it returns.

        The lock keeps a status built before the action from being published after it.
        """

        def run(payload: Mapping[str, Any]) -> dict[str, Any]:
            with self._publish_lock:
                result = handler(payload)
                current = self.board.status()
                if current is not None:
                    self.board.publish(self.bot.advisor_view(current))
            return result

        return run
