"""What a restored state snapshot must satisfy before the bot trades on it, and the keys it lives under.

A snapshot read at start is untrusted input: a file edited by hand, a disk
fault, an older or buggy writer. :func:`check_snapshot` is a pure function of
the document and ``now``: every value the bot would act on is type- and
range-checked (finite numbers, tiers 0..2, the three directions, times not
after ``now`` + :data:`CLOCK_SKEW_SEC`, balances in ``[0, MAX_AMOUNT]``,
positive order prices and volumes). The first problem raises
:class:`SnapshotInvalid` naming its key path and value; the bot then refuses
to start (fail closed) and says how to recover (README "Persistence and restart").

Keys in ``bot_state``: the snapshot under :func:`current_key`; the one it
replaced, kept in the same transaction, under :func:`previous_key`; one moved
aside by ``--discard-snapshot`` or ``--restore-previous`` under
:func:`rejected_key`. Nothing is ever deleted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from clock import iso_utc
from store.interface import first_non_finite
from vocabulary import BUY, DIRECTIONS, SELL, SYMMETRIC, TIERS

SNAPSHOT_VERSION = 1
CLOCK_SKEW_SEC = 300.0  # another machine's clock (Supabase) may run this far ahead
MAX_AMOUNT = 1e12  # no balance, in the quote asset (the base asset at the snapshot's price), is sane beyond


def current_key(pair: str) -> str:
    return f"snapshot:{pair}"


def previous_key(pair: str) -> str:
    return f"snapshot:{pair}:previous"


def rejected_key(pair: str, now: float) -> str:
    return f"snapshot:{pair}:rejected:{iso_utc(now)}"


def distrust_message(key: str, current: str, where: str, problem: Exception) -> str:
    """Why the start stops on the snapshot under ``key`` (``current`` is the pair's current key), and what to do."""
    aside = f"{current}:rejected:<time>"
    if key != current:
        return (
            f"the previous snapshot {key} in {where} cannot be used either: {problem}. Start from scratch with "
            f"--discard-snapshot (the current snapshot is moved aside to {aside}, not deleted)"
        )
    return (
        f"the snapshot {key} in {where} cannot be trusted: {problem}. Nothing was changed. Start from the "
        f"previous snapshot the bot kept with --restore-previous, or from scratch with --discard-snapshot "
        f"(either moves this one aside to {aside}, not deleted)"
    )


class SnapshotInvalid(ValueError):
    """A value of the snapshot that cannot be trusted; ``path`` is its key path (``grid.engine.orders[2].price``)."""

    def __init__(self, path: str, value: Any, reason: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{path or 'the document'} = {shown}: {reason}")
        self.path, self.value, self.reason = path, value, reason


class _Checker:
    def __init__(self, now: float) -> None:
        self.latest = now + CLOCK_SKEW_SEC

    @staticmethod
    def obj(value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise SnapshotInvalid(path, value, "must be an object")
        return value

    @staticmethod
    def seq(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise SnapshotInvalid(path, value, "must be a list")
        return value

    @staticmethod
    def number(value: Any, path: str, lo: float = -MAX_AMOUNT, hi: float = MAX_AMOUNT) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SnapshotInvalid(path, value, "must be a number")
        if not math.isfinite(value):
            raise SnapshotInvalid(path, value, "must be finite")
        if not lo <= value <= hi:
            raise SnapshotInvalid(path, value, f"must lie in [{lo:g}, {hi:g}]")
        return float(value)

    def positive(self, value: Any, path: str) -> float:
        x = self.number(value, path, 0.0)
        if x <= 0:
            raise SnapshotInvalid(path, value, "must be positive")
        return x

    @staticmethod
    def integer(value: Any, path: str, lo: int = 0, hi: int = 2**53) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SnapshotInvalid(path, value, "must be an integer")
        if not lo <= value <= hi:
            raise SnapshotInvalid(path, value, f"must lie in [{lo}, {hi}]")
        return value

    @staticmethod
    def choice(value: Any, path: str, allowed: tuple[Any, ...]) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise SnapshotInvalid(path, value, f"must be one of {', '.join(map(repr, allowed))}")
        return value

    def time(self, value: Any, path: str, *, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        t = self.number(value, path, 0.0, math.inf)
        if t > self.latest:
            raise SnapshotInvalid(path, value, f"lies in the future (now is {iso_utc(self.latest - CLOCK_SKEW_SEC)})")
        return t

    def tier_and_direction(self, d: Mapping[str, Any], path: str, *, paired: bool = False) -> tuple[int, str]:
        """``paired``: tier 0 goes with symmetric and only with it (an override)."""
        tier = self.choice(d.get("tier"), f"{path}.tier", TIERS)
        direction = self.choice(d.get("direction"), f"{path}.direction", DIRECTIONS)
        if paired and (tier == 0) != (direction == SYMMETRIC):
            raise SnapshotInvalid(f"{path}.direction", direction, f"does not go with tier {tier}")
        return tier, direction


def check_snapshot(snap: Any, *, pair: str, now: float) -> None:
    """Raise :class:`SnapshotInvalid` at the first value of ``snap`` that the bot must not act on."""
    c = _Checker(now)
    d = c.obj(snap, "")
    bad = first_non_finite(d)
    if bad is not None:
        raise SnapshotInvalid(bad[0], bad[1], "must be finite")
    version = d.get("version")
    if isinstance(version, bool) or version != SNAPSHOT_VERSION:
        raise SnapshotInvalid("version", version, f"this bot reads version {SNAPSHOT_VERSION} only")
    if d.get("pair") != pair:
        raise SnapshotInvalid("pair", d.get("pair"), f"the bot runs {pair}")
    c.time(d.get("saved_at"), "saved_at")
    c.tier_and_direction(c.obj(d.get("tier"), "tier"), "tier")
    c.time(d["tier"].get("since"), "tier.since")
    c.time(d.get("pinned_since"), "pinned_since")
    for i, entry in enumerate(c.seq(d.get("regime_history", []), "regime_history")):
        p = f"regime_history[{i}]"
        c.time(c.obj(entry, p).get("ts"), f"{p}.ts")
        c.number(entry.get("conf"), f"{p}.conf", 0.0, 1.0)
        if not isinstance(entry.get("regime"), str):
            raise SnapshotInvalid(f"{p}.regime", entry.get("regime"), "must be a string")
    if d.get("direction_skill") is not None:
        _check_skill(c, c.obj(d["direction_skill"], "direction_skill"))
    if d.get("advisor") is not None:
        _check_advisor(c, c.obj(d["advisor"], "advisor"))
    for name, model in c.obj(d.get("models") or {}, "models").items():
        if model is not None:
            c.time(c.obj(model, f"models.{name}").get("trained_at"), f"models.{name}.trained_at")
            c.obj(model.get("model"), f"models.{name}.model")
    if d.get("grid") is not None:
        _check_grid(c, c.obj(d["grid"], "grid"))


def _check_skill(c: _Checker, d: Mapping[str, Any]) -> None:
    c.number(d.get("hits"), "direction_skill.hits", 0.0)
    c.number(d.get("misses"), "direction_skill.misses", 0.0)
    c.integer(d.get("scored"), "direction_skill.scored")
    c.time(d.get("last_call_at"), "direction_skill.last_call_at", optional=True)
    if d.get("pending") is not None:
        p = c.obj(d["pending"], "direction_skill.pending")
        c.time(p.get("ts"), "direction_skill.pending.ts")
        c.choice(p.get("sign"), "direction_skill.pending.sign", (-1, 1))
        c.positive(p.get("price"), "direction_skill.pending.price")


def _check_advisor(c: _Checker, d: Mapping[str, Any]) -> None:
    if d.get("override") is not None:
        o = c.obj(d["override"], "advisor.override")
        c.tier_and_direction(o, "advisor.override", paired=True)
        applied = c.time(o.get("applied_at"), "advisor.override.applied_at")
        expires = c.number(o.get("expires_at"), "advisor.override.expires_at", 0.0, math.inf)
        if applied is not None and expires < applied:
            raise SnapshotInvalid("advisor.override.expires_at", expires, "lies before applied_at")
        c.integer(o.get("source_conviction"), "advisor.override.source_conviction", 0, 100)
        c.time(o.get("opinion_ts", applied), "advisor.override.opinion_ts")
    card = c.obj(d.get("scorecard") or {}, "advisor.scorecard")
    for i, entry in enumerate(c.seq(card.get("pending", []), "advisor.scorecard.pending")):
        p = f"advisor.scorecard.pending[{i}]"
        c.time(c.obj(entry, p).get("ts"), f"{p}.ts")
        c.positive(entry.get("price"), f"{p}.price")


def _check_grid(c: _Checker, d: Mapping[str, Any]) -> None:
    engine = c.obj(d.get("engine"), "grid.engine")
    price = engine.get("price")
    if price is not None:
        price = c.positive(price, "grid.engine.price")
    posture = c.obj(engine.get("posture"), "grid.engine.posture")
    c.tier_and_direction(posture, "grid.engine.posture")
    c.time(posture.get("since"), "grid.engine.posture.since")
    _check_balances(c, c.obj(engine.get("balances"), "grid.engine.balances"), "grid.engine.balances", price)
    for i, order in enumerate(c.seq(engine.get("orders"), "grid.engine.orders")):
        p = f"grid.engine.orders[{i}]"
        c.positive(c.obj(order, p).get("price"), f"{p}.price")
        c.positive(order.get("volume"), f"{p}.volume")
        c.time(order.get("placed_at"), f"{p}.placed_at")
        c.choice(order.get("side"), f"{p}.side", (BUY, SELL))
        c.choice(order.get("role"), f"{p}.role", ("entry", "exit"))
        c.choice(order.get("tier_at_entry"), f"{p}.tier_at_entry", TIERS)
    c.integer(engine.get("seq"), "grid.engine.seq")
    c.integer(engine.get("cycles"), "grid.engine.cycles")
    c.number(engine.get("realized_quote"), "grid.engine.realized_quote")
    c.number(engine.get("fees_quote"), "grid.engine.fees_quote", 0.0)
    book = d.get("paper_book")
    if book is not None:
        book = c.obj(book, "grid.paper_book")
        _check_balances(c, book, "grid.paper_book", book.get("last_price") or price)
        for i, order in enumerate(c.seq(book.get("orders"), "grid.paper_book.orders")):
            p = f"grid.paper_book.orders[{i}]"
            c.positive(c.obj(order, p).get("price"), f"{p}.price")
            c.positive(order.get("volume"), f"{p}.volume")
    for key, value in c.obj(d.get("equity") or {}, "grid.equity").items():
        if value is not None:
            c.number(value, f"grid.equity.{key}")
    if d.get("last_candle_time") is not None:
        c.time(d["last_candle_time"], "grid.last_candle_time")


def _check_balances(c: _Checker, d: Mapping[str, Any], path: str, price: Any) -> None:
    c.number(d.get("quote"), f"{path}.quote", 0.0)
    base = c.number(d.get("base"), f"{path}.base", 0.0, math.inf)
    if isinstance(price, (int, float)) and price > 0 and base * price > MAX_AMOUNT:
        raise SnapshotInvalid(f"{path}.base", base, f"is worth more than {MAX_AMOUNT:g} in the quote asset")
