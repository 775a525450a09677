"""The grid engine as a pure reducer (SPEC section 8).

``reduce(state, event, config) -> (state, actions)``: the state is never
changed in place, and no clock, exchange or store is touched. The caller
(:mod:`grid_runner`) carries the actions out on an exchange and feeds the
outcome back as events.

The grid has ``slots`` slots of two legs each:

- leg **A** sells an entry above the market; once it fills, a buy exit
  ``exit_pct`` lower closes the cycle;
- leg **B** buys an entry below the market; once it fills, a sell exit
  ``exit_pct`` higher closes the cycle.

A filled exit books the cycle's net profit (after both maker fees) and the
leg enters again. Slot ``k`` enters ``entry_pct + k * slot_step_pct`` percent
from the market.

The posture (the effective tier) shapes the entries only. Tier 1 moves the
with-trend entry closer and the against-trend one farther, by an amount that
grows with |bias|; tier 2 cancels against-trend entries once the posture is
``grace_sec`` old and enters on the favoured side only. Exits are never
cancelled by the regime. When the tier drops, the suppressed legs enter again.

Distances scale with recent volatility: every entry, step and exit distance
is multiplied by ``max(1, vol / vol_ref_pct)`` (the hourly volatility the
runner measures, against the volatility the base distances are set for).
Exits never come closer than the base ``exit_pct``, which config validation
keeps above both fees.

The posture's ``size`` scales new entries (a regime that expects larger moves
trades smaller on both sides); resting entries are re-placed at the new size
when it changes.

The grid bounds its risk by inventory. A leg holds its exit until it fills:
a stranded exit never frees its leg to buy again lower (averaging down, and
releasing stranded positions at a loss, both cost more than they saved on the
shared real candles; see README). So a side never holds more than one
position per slot, and an entry is also refused when the position its side
could reach (open positions plus resting entries of that side, plus this one)
would cost more than ``max_inventory_quote``. An exit that has rested
``recovery_after_sec`` is flagged a *recovery order*, a signal of a stranded
position for the operator and the advisor.

The capacity band measures what is at risk: the fuller side's positions
against the inventory cap, the exposure against its cap and the open orders
against ``max_open_orders`` (see :func:`capacity`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from grid.exchange import Balances, Fill, PairRules
from vocabulary import BUY, CAUTION, LONG_BIAS, NORMAL, RANGING, SELL, SHORT_BIAS, STOP, SYMMETRIC

ENTRY, EXIT = "entry", "exit"
LEGS = ("A", "B")
ENTRY_SIDE = {"A": SELL, "B": BUY}
FAVOURED_LEG = {LONG_BIAS: "B", SHORT_BIAS: "A"}  # long: buy the dips; short: sell the rips
NOTES_KEPT = 10
FILLS_KEPT = 20
CYCLES_KEPT = 10
HOUR = 3600.0
MIN_WITH_TREND_SHARE = 0.25  # tier 1 never moves the with-trend entry closer than this share of its distance


@dataclass(frozen=True)
class GridConfig:
    rules: PairRules = field(default_factory=PairRules)
    slots: int = 3
    entry_pct: float = 0.35
    slot_step_pct: float = 0.35
    exit_pct: float = 2.0
    order_quote: float = 20.0  # size of one entry, in the quote asset
    skew: float = 0.75  # tier 1: with-trend distance x (1 - skew*|bias|), against x (1 + skew*|bias|)
    refresh_pct: float = 0.5  # reprice a resting entry when its target moved this far (percent)
    grace_sec: float = 60.0
    recovery_after_sec: float = 7200.0
    max_open_orders: int = 20
    caution_share: float = 0.7
    stop_share: float = 0.9
    max_exposure_quote: float = 1000.0
    max_inventory_quote: float = math.inf  # cap on what one side may hold (positions at cost plus resting entries)
    vol_ref_pct: float = 0.0  # hourly volatility (percent) the base distances are set for; 0: no scaling
    id_prefix: str = "g"


@dataclass(frozen=True)
class Posture:
    """The effective tier the grid trades to."""

    tier: int = 0
    direction: str = SYMMETRIC
    strength: float = 0.0  # |bias| behind the skew, 0..1
    since: float = 0.0
    source: str = "mechanical"
    size: float = 1.0  # share of ``order_quote`` each new entry trades (a regime expecting larger moves trades less)

    @property
    def favoured_leg(self) -> str | None:
        return FAVOURED_LEG.get(self.direction) if self.tier >= 1 else None

    @property
    def against_leg(self) -> str | None:
        fav = self.favoured_leg
        return None if fav is None else ("A" if fav == "B" else "B")


@dataclass(frozen=True)
class Order:
    id: str
    slot: int
    leg: str
    role: str  # entry | exit
    side: str
    price: float
    volume: float
    placed_at: float
    regime_at_entry: str
    tier_at_entry: int
    open: bool = False  # the exchange confirmed it; False: to be (re)placed
    recovery: bool = False
    cancelling: bool = False  # a Cancel was sent; it leaves the state when the exchange confirms (Gone)
    entry_price: float | None = None  # exits: the entry's fill
    entry_fee: float = 0.0
    entry_at: float | None = None


@dataclass(frozen=True)
class Cycle:
    slot: int
    leg: str
    entry_side: str
    entry_price: float
    exit_price: float
    volume: float
    gross_quote: float
    fees_quote: float
    net_quote: float
    regime_at_entry: str
    opened_at: float
    closed_at: float


@dataclass(frozen=True)
class RegimeEdge:
    """Completed cycles of one regime, for the Kelly estimate: returns as fractions of the entry notional."""

    wins: int = 0
    losses: int = 0
    win_sum: float = 0.0
    loss_sum: float = 0.0  # positive magnitudes


@dataclass(frozen=True)
class GridState:
    posture: Posture = field(default_factory=Posture)
    price: float | None = None
    regime: str = RANGING
    vol_pct: float | None = None  # hourly volatility of the last tick, percent
    balances: Balances = field(default_factory=lambda: Balances(0.0, 0.0))
    orders: Mapping[str, Order] = field(default_factory=dict)
    legs: Mapping[str, str | None] = field(default_factory=dict)  # "0A" -> id of the order holding the leg
    seq: int = 0
    realized_quote: float = 0.0
    fees_quote: float = 0.0
    cycles: int = 0
    edges: Mapping[str, RegimeEdge] = field(default_factory=dict)
    fill_times: tuple[float, ...] = ()  # the last hour's
    recent_fills: tuple[dict, ...] = ()
    recent_cycles: tuple[Cycle, ...] = ()
    notes: tuple[dict, ...] = ()
    skipped: Mapping[str, int] = field(default_factory=dict)  # entries not placed, by reason
    blocked: Mapping[str, str] = field(default_factory=dict)  # leg -> why its entry is not placed (noted once)


# events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """A cycle's market view: place, refresh, suppress. ``balances`` are the exchange's."""

    now: float
    price: float
    regime: str
    posture: Posture
    balances: Balances
    vol_pct: float | None = None  # recent hourly volatility, percent (None: not known yet, no scaling)


@dataclass(frozen=True)
class Filled:
    fill: Fill
    price: float  # the market now, so a new exit is never priced on the taking side


@dataclass(frozen=True)
class Placed:
    order_id: str
    price: float  # as the exchange holds it (an adopted order may differ from the plan)
    volume: float


@dataclass(frozen=True)
class Rejected:
    order_id: str
    reason: str  # exchange.OrderRejected.reason, or "deferred" for a retry-later failure
    message: str
    now: float


@dataclass(frozen=True)
class Gone:
    """An order left the book without executing (cancelled by us or externally, expired)."""

    order_id: str
    now: float


# actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    order: Order


@dataclass(frozen=True)
class Cancel:
    order_id: str
    reason: str


Event = Tick | Filled | Placed | Rejected | Gone
Action = Place | Cancel


def leg_key(slot: int, leg: str) -> str:
    return f"{slot}{leg}"


def initial_state(config: GridConfig, balances: Balances, now: float) -> GridState:
    legs = {leg_key(k, leg): None for k in range(config.slots) for leg in LEGS}
    return GridState(posture=Posture(since=now), balances=balances, legs=legs)


# planning (pure helpers, also used by the status) -----------------------------------


def vol_scale(config: GridConfig, vol_pct: float | None) -> float:
    """The multiplier of every distance from volatility: ``vol / vol_ref_pct`` above the reference, else 1."""
    if config.vol_ref_pct > 0 and vol_pct is not None and math.isfinite(vol_pct):
        return max(1.0, vol_pct / config.vol_ref_pct)
    return 1.0


def entry_distance_pct(config: GridConfig, posture: Posture, slot: int, leg: str, scale: float = 1.0) -> float:
    """Percent from the market of an entry: the slot's distance times ``scale`` (volatility), then tier 1's skew."""
    base = (config.entry_pct + slot * config.slot_step_pct) * scale
    fav = posture.favoured_leg
    if fav is None:
        return base
    s = min(1.0, max(0.0, posture.strength)) * config.skew
    if leg == fav:
        return base * max(MIN_WITH_TREND_SHARE, 1.0 - s)
    return base * (1.0 + s)


def entry_price(config: GridConfig, posture: Posture, slot: int, leg: str, price: float, scale: float = 1.0) -> float:
    d = entry_distance_pct(config, posture, slot, leg, scale) / 100.0
    side = ENTRY_SIDE[leg]
    target = price * (1 + d) if side == SELL else price * (1 - d)
    return config.rules.round_price(target, side)


def exit_price(config: GridConfig, side: str, entry: float, price: float | None, scale: float = 1.0) -> float:
    """The exit's price: ``exit_pct`` (times ``scale``) from the entry, never on the taking side of the market."""
    x = config.exit_pct * scale / 100.0
    target = entry * (1 + x) if side == SELL else entry * (1 - x)
    return _passive(config, side, target, price)


def _passive(config: GridConfig, side: str, target: float, price: float | None) -> float:
    """``target`` on the pair's tick, moved off the taking side of ``price`` (post-only)."""
    rules = config.rules
    tick = 10.0**-rules.price_decimals
    target = rules.round_price(target, side)
    if price is None:
        return target
    if side == SELL:
        return max(target, rules.round_price(price + tick, SELL))
    return min(target, rules.round_price(price - tick, BUY))


def entry_volume(config: GridConfig, posture: Posture, price: float) -> float:
    """The base volume of an entry at ``price``: ``order_quote`` times the posture's size, on the lot step.

    A smaller size never goes below the pair's minimum order (nor above the full size): the grid then
    trades as small as the exchange allows.
    """
    rules = config.rules
    full = rules.round_volume(config.order_quote / price)
    share = min(1.0, max(0.0, posture.size))
    if share >= 1.0:
        return full
    smallest = rules.round_volume_up(max(rules.ordermin, rules.costmin / price))
    return min(full, max(rules.round_volume(config.order_quote * share / price), smallest))


def suppressed(posture: Posture, leg: str) -> bool:
    """Tier 2 takes the against-trend leg out of the grid (its resting entry goes after the grace)."""
    return posture.tier >= 2 and leg == posture.against_leg


def side_cost(orders: Mapping[str, Order], side: str, *, resting: bool = True) -> float:
    """What the entries of ``side`` put at stake, in the quote asset: their open positions at cost,
    plus (with ``resting``) their resting entries.

    A buy entry's position waits for a sell exit, a sell entry's for a buy exit. Each side is
    counted gross, not net of the other: closing the longs of a balanced book must not leave its
    shorts above the cap.
    """
    exit_side = SELL if side == BUY else BUY
    total = 0.0
    for o in orders.values():
        if o.role == EXIT and o.side == exit_side:
            total += (o.entry_price or o.price) * o.volume
        elif resting and o.role == ENTRY and o.side == side and not o.cancelling:
            total += o.price * o.volume
    return total


def capacity(config: GridConfig, orders: Mapping[str, Order]) -> dict[str, Any]:
    """How full the grid is against its caps: the fuller side's positions (at cost) against the
    inventory cap, the exposure against its cap, the open orders against ``max_open_orders``.

    ``used`` is the largest of the three shares: ``caution`` from ``caution_share``, ``stop`` from
    ``stop_share``. With the defaults a side's slots hold less than the inventory cap, so a fully
    loaded side is ``caution``; ``stop`` means the grid's own caps are nearly reached.
    """
    cap = config.max_open_orders
    n = len(orders)
    long_quote = side_cost(orders, BUY, resting=False)
    short_quote = side_cost(orders, SELL, resting=False)
    inv_cap = config.max_inventory_quote
    shares = {
        "inventory": max(long_quote, short_quote) / inv_cap if inv_cap > 0 else 1.0,  # 0 without a cap
        "exposure": exposure_quote(orders) / config.max_exposure_quote if config.max_exposure_quote > 0 else 1.0,
        "orders": n / cap if cap else 1.0,
    }
    used = max(shares.values())
    band = STOP if used >= config.stop_share else CAUTION if used >= config.caution_share else NORMAL
    return {
        "open_orders": n,
        "max_open_orders": cap,
        "headroom": max(0, cap - n),
        "long_quote": long_quote,
        "short_quote": short_quote,
        "max_inventory_quote": inv_cap if math.isfinite(inv_cap) else None,
        "used": round(used, 4),
        "band": band,
    }


def exposure_quote(orders: Mapping[str, Order]) -> float:
    """What the grid has at stake: resting entries' notional plus the positions waiting for their exits."""
    total = 0.0
    for o in orders.values():
        total += (o.entry_price or o.price) * o.volume if o.role == EXIT else o.price * o.volume
    return total


def reserved(config: GridConfig, orders: Mapping[str, Order]) -> Balances:
    fee = config.rules.maker_fee_pct / 100.0
    quote = sum(o.price * o.volume * (1 + fee) for o in orders.values() if o.side == BUY)
    base = sum(o.volume for o in orders.values() if o.side == SELL)
    return Balances(quote, base)


def kelly(edge: RegimeEdge | None, min_samples: int) -> dict[str, Any] | None:
    """Kelly fraction ``p - (1 - p) / b`` of one regime's cycles; ``None`` below ``min_samples``."""
    if edge is None or edge.wins + edge.losses < min_samples:
        return None
    n = edge.wins + edge.losses
    p = edge.wins / n
    avg_win = edge.win_sum / edge.wins if edge.wins else 0.0
    avg_loss = edge.loss_sum / edge.losses if edge.losses else 0.0
    if edge.losses == 0:
        fraction = 1.0
    elif avg_win == 0:
        fraction = -1.0
    elif avg_loss == 0:
        fraction = p  # only losses of nothing (a cycle that netted 0): b is unbounded
    else:
        fraction = p - (1 - p) / (avg_win / avg_loss)
    return {
        "samples": n,
        "win_rate": round(p, 4),
        "avg_win_pct": round(avg_win * 100, 4),
        "avg_loss_pct": round(avg_loss * 100, 4),
        "kelly_fraction": round(max(-1.0, min(1.0, fraction)), 4),
    }


# the reducer ----------------------------------------------------------------------


class _Draft:
    """A mutable copy of a state for one reduction; the input state is never touched."""

    def __init__(self, state: GridState) -> None:
        self.base = state
        self.orders = dict(state.orders)
        self.legs = dict(state.legs)
        self.blocked = dict(state.blocked)
        self.changes: dict[str, Any] = {}
        self.notes = list(state.notes)
        self.actions: list[Action] = []

    def get(self, name: str) -> Any:
        return self.changes.get(name, getattr(self.base, name))

    def set(self, **changes: Any) -> None:
        self.changes.update(changes)

    def note(self, now: float, kind: str, message: str) -> None:
        self.notes.insert(0, {"ts": now, "kind": kind, "message": message})
        del self.notes[NOTES_KEPT:]

    def new_id(self) -> str:
        seq = self.get("seq") + 1
        self.set(seq=seq)
        return seq

    def done(self) -> tuple[GridState, list[Action]]:
        state = replace(
            self.base, orders=self.orders, legs=self.legs, blocked=self.blocked, notes=tuple(self.notes), **self.changes
        )
        return state, self.actions


def reduce(state: GridState, event: Event, config: GridConfig) -> tuple[GridState, list[Action]]:
    d = _Draft(state)
    if isinstance(event, Tick):
        _on_tick(d, event, config)
    elif isinstance(event, Filled):
        _on_fill(d, event.fill, event.price, config)
    elif isinstance(event, Placed):
        _on_placed(d, event)
    elif isinstance(event, Rejected):
        _on_rejected(d, event, config)
    elif isinstance(event, Gone):
        _on_gone(d, event)
    else:
        raise TypeError(f"not a grid event: {event!r}")
    return d.done()


def _on_tick(d: _Draft, ev: Tick, config: GridConfig) -> None:
    now = ev.now
    hour_ago = now - HOUR
    old, posture = d.base.posture, ev.posture
    # The posture's age counts from the last change of tier, direction or size, whatever the caller says.
    changed = (old.tier, old.direction, old.size) != (posture.tier, posture.direction, posture.size)
    posture = replace(posture, since=now if changed else old.since)
    ev = replace(ev, posture=posture)
    d.set(price=ev.price, regime=ev.regime, posture=posture, balances=ev.balances, vol_pct=ev.vol_pct)
    d.set(fill_times=tuple(t for t in d.base.fill_times if t > hour_ago))
    scale = vol_scale(config, ev.vol_pct)
    _mark_recovery(d, now, config)
    _refresh_entries(d, ev, scale, config)
    _replace_pending_exits(d, ev.price, scale, config)
    _place_entries(d, ev, scale, config)


def _mark_recovery(d: _Draft, now: float, config: GridConfig) -> None:
    for oid, o in list(d.orders.items()):
        stranded = o.entry_at is not None and now - o.entry_at >= config.recovery_after_sec
        if o.role == EXIT and not o.recovery and stranded:
            d.orders[oid] = replace(o, recovery=True)  # it keeps its leg: no averaging down behind it


def _refresh_entries(d: _Draft, ev: Tick, scale: float, config: GridConfig) -> None:
    """Cancel entries that are stale or suppressed by tier 2 after the grace.

    An entry is stale when the market moved its target more than
    ``refresh_pct`` away, or when it was placed under an earlier posture and
    the new posture prices or sizes it differently (a tier 1 skew or a new
    size applies at once).
    """
    posture = ev.posture
    past_grace = ev.now - posture.since >= config.grace_sec
    for o in list(d.orders.values()):
        if o.role != ENTRY or not o.open or o.cancelling:
            continue
        if suppressed(posture, o.leg):
            if past_grace:
                _cancel(d, o, f"tier 2 {posture.direction}: against-trend entry suppressed")
            continue
        target = entry_price(config, posture, o.slot, o.leg, ev.price, scale)
        if abs(o.price - target) / ev.price * 100.0 > config.refresh_pct:
            _cancel(d, o, "stale entry refreshed")
        elif o.placed_at < posture.since and (o.price != target or o.volume != entry_volume(config, posture, o.price)):
            _cancel(d, o, f"replaced for tier {posture.tier} {posture.direction}, size {posture.size:g}")


def _cancel(d: _Draft, o: Order, reason: str) -> None:
    """Ask the exchange to cancel and free the leg; a part that executed comes back as a Filled."""
    d.orders[o.id] = replace(o, cancelling=True)
    _free_leg(d, o)
    d.actions.append(Cancel(o.id, reason))


def _free_leg(d: _Draft, o: Order) -> str:
    """Release the leg ``o`` holds (if it still does) so the next tick may place a new entry there; its key."""
    key = leg_key(o.slot, o.leg)
    if d.legs.get(key) == o.id:
        d.legs[key] = None
    return key


def _replace_pending_exits(d: _Draft, price: float, scale: float, config: GridConfig) -> None:
    """Exits the exchange has not taken yet (refused as post-only, deferred) are placed again, re-priced."""
    for oid, o in list(d.orders.items()):
        if o.role == EXIT and not o.open:
            assert o.entry_price is not None
            fresh = replace(o, price=exit_price(config, o.side, o.entry_price, price, scale))
            d.orders[oid] = fresh
            d.actions.append(Place(fresh))


def _place_entries(d: _Draft, ev: Tick, scale: float, config: GridConfig) -> None:
    posture = ev.posture
    for key, holder in d.legs.items():
        if holder is not None:
            continue
        slot, leg = int(key[:-1]), key[-1]
        if suppressed(posture, leg):
            continue
        side = ENTRY_SIDE[leg]
        price = entry_price(config, posture, slot, leg, ev.price, scale)
        volume = entry_volume(config, posture, price)
        problem = _entry_problem(d, config, side, price, volume)
        if problem:
            kind, message = problem
            _skip(d, ev.now, key, kind, f"slot {slot} {leg} {side} entry not placed: {message}")
            continue
        oid = f"{config.id_prefix}{d.new_id()}-{key}"
        order = Order(
            oid, slot, leg, ENTRY, side, price, volume, ev.now, ev.regime, posture.tier, open=False
        )  # fmt: skip
        d.orders[oid] = order
        d.legs[key] = oid
        d.blocked.pop(key, None)
        d.actions.append(Place(order))


def _entry_problem(d: _Draft, config: GridConfig, side: str, price: float, volume: float) -> tuple[str, str] | None:
    rules = config.rules
    size = rules.size_problem(price, volume)
    if size:
        return "minimum", size
    # Orders being cancelled are gone by the time this one is placed (the Cancel goes first).
    orders = {k: o for k, o in d.orders.items() if not o.cancelling}
    if len(orders) >= config.max_open_orders:
        return "capacity", f"{len(orders)} open orders, the maximum is {config.max_open_orders}"
    at_stake = exposure_quote(orders)
    if at_stake + price * volume > config.max_exposure_quote + 1e-9:
        return "exposure_cap", f"exposure would be {at_stake + price * volume:.2f}, cap {config.max_exposure_quote:g}"
    position = side_cost(orders, side) + price * volume
    if position > config.max_inventory_quote + 1e-9:
        way = "long" if side == BUY else "short"
        cap = config.max_inventory_quote
        return "inventory_cap", f"the {way} side would hold {position:.2f}, the cap is {cap:g}"
    held = reserved(config, orders)
    bal = d.get("balances")
    if side == BUY:
        need = price * volume + rules.fee(price, volume)
        free = bal.quote - held.quote
        if need > free + 1e-9:
            return "unfunded", f"needs {need:.2f} {rules.quote_asset}, {max(0.0, free):.2f} free"
    else:
        free = bal.base - held.base
        if volume > free + 1e-9:
            return "unfunded", f"needs {volume:g} {rules.base_asset}, {max(0.0, free):g} free"
    return None


def _skip(d: _Draft, now: float, key: str, kind: str, message: str) -> None:
    """Count an entry not placed; note it when the leg becomes blocked for this reason, not every cycle."""
    skipped = dict(d.get("skipped"))
    skipped[kind] = skipped.get(kind, 0) + 1
    d.set(skipped=skipped)
    if d.blocked.get(key) != kind:
        d.blocked[key] = kind
        d.note(now, kind, message)


def _on_fill(d: _Draft, fill: Fill, price: float, config: GridConfig) -> None:
    o = d.orders.get(fill.client_id)
    if o is None:
        d.note(fill.ts, "reconciled", f"fill of unknown order {fill.client_id} ignored")
        return
    volume = min(fill.volume, o.volume)
    bal = d.get("balances")
    cost = fill.price * volume
    if fill.side == BUY:
        bal = Balances(bal.quote - cost - fill.fee, bal.base + volume)
    else:
        bal = Balances(bal.quote + cost - fill.fee, bal.base - volume)
    record = {
        "ts": fill.ts, "id": o.id, "slot": o.slot, "leg": o.leg, "role": o.role, "side": fill.side,
        "price": fill.price, "volume": volume, "fee_quote": fill.fee,
    }  # fmt: skip
    d.set(
        price=price,
        balances=bal,
        fees_quote=d.get("fees_quote") + fill.fee,
        fill_times=(*d.get("fill_times"), fill.ts),
        recent_fills=(record, *d.get("recent_fills"))[:FILLS_KEPT],
    )
    del d.orders[o.id]
    d.blocked.pop(o.id, None)
    key = leg_key(o.slot, o.leg)
    holds_leg = d.legs.get(key) == o.id
    if o.role == ENTRY:
        exit_side = BUY if o.side == SELL else SELL
        oid = f"{config.id_prefix}{d.new_id()}-{key}"
        scale = vol_scale(config, d.get("vol_pct"))
        exit_order = Order(
            oid, o.slot, o.leg, EXIT, exit_side, exit_price(config, exit_side, fill.price, price, scale),
            volume, fill.ts, o.regime_at_entry, o.tier_at_entry, open=False,
            entry_price=fill.price, entry_fee=fill.fee, entry_at=fill.ts,
        )  # fmt: skip
        d.orders[oid] = exit_order
        if holds_leg:
            d.legs[key] = oid
        d.actions.append(Place(exit_order))
        return
    _book_cycle(d, o, fill, volume)
    rest = config.rules.round_volume(o.volume - volume)
    if rest > 0:
        # A part executed before the rest was cancelled: the rest of the position keeps an exit, placed
        # again under a new id (an exchange may refuse to reuse the id of an order it has closed).
        oid = f"{config.id_prefix}{d.new_id()}-{key}"
        d.orders[oid] = replace(o, id=oid, volume=rest, entry_fee=o.entry_fee * rest / o.volume, open=False)
        if holds_leg:
            d.legs[key] = oid
        return
    _free_leg(d, o)


def _book_cycle(d: _Draft, exit_order: Order, fill: Fill, volume: float) -> None:
    entry = exit_order.entry_price
    assert entry is not None
    sell, buy = (fill.price, entry) if fill.side == SELL else (entry, fill.price)
    gross = (sell - buy) * volume
    entry_fee = exit_order.entry_fee * (volume / exit_order.volume) if exit_order.volume else 0.0
    fees = entry_fee + fill.fee
    net = gross - fees
    cycle = Cycle(
        exit_order.slot, exit_order.leg, BUY if fill.side == SELL else SELL, entry, fill.price, volume,
        gross, fees, net, exit_order.regime_at_entry, exit_order.entry_at or fill.ts, fill.ts,
    )  # fmt: skip
    edges = dict(d.get("edges"))
    e = edges.get(cycle.regime_at_entry, RegimeEdge())
    ret = net / (entry * volume) if entry * volume else 0.0
    if net > 0:
        e = replace(e, wins=e.wins + 1, win_sum=e.win_sum + ret)
    else:
        e = replace(e, losses=e.losses + 1, loss_sum=e.loss_sum - ret)
    edges[cycle.regime_at_entry] = e
    d.set(
        realized_quote=d.get("realized_quote") + net,
        cycles=d.get("cycles") + 1,
        edges=edges,
        recent_cycles=(cycle, *d.get("recent_cycles"))[:CYCLES_KEPT],
    )


def _on_placed(d: _Draft, ev: Placed) -> None:
    o = d.orders.get(ev.order_id)
    if o is not None:
        d.orders[o.id] = replace(o, open=True, price=ev.price, volume=ev.volume)
        d.blocked.pop(o.id, None)


def _on_rejected(d: _Draft, ev: Rejected, config: GridConfig) -> None:
    o = d.orders.get(ev.order_id)
    if o is None:
        return
    if o.role == EXIT:
        # The position exists whatever the exchange said: keep the exit and place it again next cycle.
        if ev.reason != "post_only" and d.blocked.get(o.id) != ev.reason:  # noted once, not every retry
            d.blocked[o.id] = ev.reason
            d.note(ev.now, "rejected", f"exit {o.id} ({o.side} {o.volume:g} @ {o.price}) not placed: {ev.message}")
        d.orders[o.id] = replace(o, open=False)
        return
    del d.orders[o.id]
    key = _free_leg(d, o)
    kind = "unfunded" if ev.reason == "funds" else "rejected"
    _skip(d, ev.now, key, kind, f"slot {o.slot} {o.leg} {o.side} entry refused by the exchange: {ev.message}")


def _on_gone(d: _Draft, ev: Gone) -> None:
    o = d.orders.get(ev.order_id)
    if o is None:
        return
    if o.cancelling:
        del d.orders[o.id]
        return
    if o.role == EXIT:
        d.note(ev.now, "reconciled", f"exit {o.id} left the book unfilled: placing it again")
        d.orders[o.id] = replace(o, open=False)
        return
    del d.orders[o.id]
    _free_leg(d, o)
    d.note(ev.now, "reconciled", f"entry {o.id} left the book unfilled")


# views ------------------------------------------------------------------------------


def leg_states(state: GridState, config: GridConfig, now: float) -> list[dict[str, Any]]:
    out = []
    for k in range(config.slots):
        row: dict[str, Any] = {"slot": k}
        for leg in LEGS:
            holder = state.legs.get(leg_key(k, leg))
            if holder is not None and holder in state.orders:
                row[leg] = state.orders[holder].role
            elif suppressed(state.posture, leg):
                row[leg] = "suppressed"
            else:
                row[leg] = "idle"
        out.append(row)
    return out


def mark_to_market(state: GridState, price: float) -> float:
    """Gain (negative: loss) of the positions waiting for their exits, at ``price``."""
    total = 0.0
    for o in state.orders.values():
        if o.role == EXIT and o.entry_price is not None:
            held = o.volume if o.side == SELL else -o.volume  # a sell exit holds a long position
            total += held * (price - o.entry_price)
    return total


# persistence ------------------------------------------------------------------------


def to_dict(state: GridState) -> dict[str, Any]:
    return {
        "posture": dict(state.posture.__dict__),
        "price": state.price,
        "regime": state.regime,
        "vol_pct": state.vol_pct,
        "balances": dict(state.balances.__dict__),
        "orders": [dict(o.__dict__) for o in state.orders.values()],
        "legs": dict(state.legs),
        "seq": state.seq,
        "realized_quote": state.realized_quote,
        "fees_quote": state.fees_quote,
        "cycles": state.cycles,
        "edges": {k: dict(e.__dict__) for k, e in state.edges.items()},
        "fill_times": list(state.fill_times),
        "recent_fills": list(state.recent_fills),
        "recent_cycles": [dict(c.__dict__) for c in state.recent_cycles],
        "notes": list(state.notes),
        "skipped": dict(state.skipped),
        "blocked": dict(state.blocked),
    }


def from_dict(data: Mapping[str, Any], config: GridConfig) -> GridState:
    """The state saved by :func:`to_dict`; raises ``KeyError``/``TypeError``/``ValueError`` on a bad record.

    A snapshot taken with fewer slots gains idle legs; legs of slots beyond
    ``config.slots`` are dropped (their orders stay and are worked off).
    """
    orders = {o["id"]: Order(**o) for o in data["orders"]}
    legs: dict[str, str | None] = {leg_key(k, leg): None for k in range(config.slots) for leg in LEGS}
    for key, holder in dict(data["legs"]).items():
        if key in legs and (holder is None or holder in orders):
            legs[key] = holder
    for o in orders.values():
        if not all(math.isfinite(v) for v in (o.price, o.volume)) or o.volume <= 0 or o.price <= 0:
            raise ValueError(f"order {o.id} has a bad price or volume")
    balances = Balances(**data["balances"])
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (balances.quote, balances.base)):
        raise ValueError(f"the balances {balances} are not finite non-negative numbers")
    return GridState(
        posture=Posture(**data["posture"]),
        price=data.get("price"),
        regime=str(data.get("regime", RANGING)),
        vol_pct=float(data["vol_pct"]) if data.get("vol_pct") is not None else None,
        balances=balances,
        orders=orders,
        legs=legs,
        seq=int(data["seq"]),
        realized_quote=float(data["realized_quote"]),
        fees_quote=float(data["fees_quote"]),
        cycles=int(data["cycles"]),
        edges={k: RegimeEdge(**e) for k, e in dict(data.get("edges", {})).items()},
        fill_times=tuple(float(t) for t in data.get("fill_times", ())),
        recent_fills=tuple(data.get("recent_fills", ())),
        recent_cycles=tuple(Cycle(**c) for c in data.get("recent_cycles", ())),
        notes=tuple(data.get("notes", ())),
        skipped=dict(data.get("skipped", {})),
        blocked=dict(data.get("blocked", {})),
    )
