"""Is the bot healthy? One verdict for ``/healthz``, the header pill and the Errors card.

The main loop captures :class:`HealthFacts` at the end of every cycle (cheap,
immutable); :func:`verdict` turns facts and the current time into
``{"ok": bool, "reasons": [...]}``. The loop calls it when it builds the
status, and the HTTP thread calls it again for each ``/healthz`` request with
the time of the request, so a loop that has stopped turns ``/healthz`` red
even though nothing is published any more.

Unhealthy means an operator should look: the loop is stuck, its cycles keep
failing, the candles are staler than SPEC section 2's freshness limit, or the
state has not been saved for longer than the snapshot interval allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAILING_CYCLES_LIMIT = 3  # this many failed cycles in a row is not a blip


@dataclass(frozen=True)
class FeedFacts:
    """One candle feed: when its newest closed candle ended, and how old it may get."""

    label: str  # "1m"
    newest_end: float | None  # close time of the newest stored candle
    limit_sec: float  # SPEC section 2: max(180 s, 3 intervals)
    last_error: str | None


@dataclass(frozen=True)
class HealthFacts:
    started_at: float
    loop_limit_sec: float  # a cycle must complete at least this often (three intervals)
    failing_cycles: int  # failed cycles in a row
    last_failure: str | None
    feeds: tuple[FeedFacts, ...]
    persist_limit_sec: float | None  # None when the state is not saved as it goes (a replay)
    last_saved_at: float | None
    save_error: str | None


def verdict(facts: HealthFacts | None, *, now: float, loop_age_sec: float | None) -> dict[str, Any]:
    """``{"ok": ..., "reasons": [...]}``; ``loop_age_sec`` is the time since the last cycle that completed."""
    if facts is None:
        return {"ok": False, "reasons": ["starting: no cycle has completed yet"]}
    reasons = [
        *_loop_reasons(facts, loop_age_sec),
        *_feed_reasons(facts, now),
        *_store_reasons(facts, now),
    ]
    return {"ok": not reasons, "reasons": reasons}


def _loop_reasons(facts: HealthFacts, loop_age_sec: float | None) -> list[str]:
    out = []
    if loop_age_sec is None:
        out.append("starting: no cycle has completed yet")
    elif loop_age_sec > facts.loop_limit_sec:
        out.append(
            f"the main loop has not completed a cycle for {_duration(loop_age_sec)} "
            f"(limit {_duration(facts.loop_limit_sec)})"
        )
    if facts.failing_cycles >= FAILING_CYCLES_LIMIT:
        out.append(f"the last {facts.failing_cycles} cycles failed: {facts.last_failure}")
    return out


def _feed_reasons(facts: HealthFacts, now: float) -> list[str]:
    out = []
    for feed in facts.feeds:
        cause = f" (last error: {feed.last_error})" if feed.last_error else ""
        if feed.newest_end is None:
            if now - facts.started_at > feed.limit_sec:  # a feed may take a sync or two to fill
                out.append(f"no {feed.label} candles yet{cause}")
            continue
        age = now - feed.newest_end
        if age > feed.limit_sec:
            out.append(f"{feed.label} candles are {_duration(age)} old (limit {_duration(feed.limit_sec)}){cause}")
    return out


def _store_reasons(facts: HealthFacts, now: float) -> list[str]:
    if facts.persist_limit_sec is None:
        return []
    since = facts.last_saved_at if facts.last_saved_at is not None else facts.started_at
    age = now - since
    if age <= facts.persist_limit_sec:
        return []
    what = "nothing saved" if facts.last_saved_at is None else "the state has not been saved"
    cause = f": {facts.save_error}" if facts.save_error else ""
    return [f"{what} for {_duration(age)} (limit {_duration(facts.persist_limit_sec)}){cause}"]


def _duration(sec: float) -> str:
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"
