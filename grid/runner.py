"""One grid at work: the pure engine, an exchange, and the bookkeeping around them.

Each :meth:`GridRunner.step` shows the exchange the new candles (the paper
exchange fills against them; the live one reports what Kraken filled), feeds
the fills to the engine, then one :class:`grid_engine.Tick` with the effective
posture, carrying every action out at once and feeding the outcome back.

Reconciliation (:meth:`GridRunner.reconcile`, at start and every few minutes)
compares the engine's orders with the exchange's open orders. An order that
left the book is resolved by looking it up (filled → a fill, else gone). An
order on the exchange the engine does not know (placed just before a crash,
before the snapshot recorded it) is adopted when the engine places the same
order id again, which it does because ids come from the snapshot's counter;
one that is still unclaimed after the next step is cancelled. No order is
ever placed twice.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from candles import Candle
from errors import BadData, RetryLater
from grid.engine import (
    ENTRY_SIDE,
    EXIT,
    NOTES_KEPT,
    Cancel,
    Event,
    Filled,
    Gone,
    GridConfig,
    GridState,
    Place,
    Placed,
    Posture,
    Rejected,
    Tick,
    capacity,
    entry_distance_pct,
    exposure_quote,
    from_dict,
    initial_state,
    leg_states,
    mark_to_market,
    reduce,
    reserved,
    to_dict,
    vol_scale,
)
from grid.exchange import Exchange, Fill, OpenOrder, OrderRejected, OrderRequest
from grid.signals import (
    TrendState,
    VolState,
    hourly_vol_pct,
    operational_signals,
    trend_from_dict,
    trend_to_dict,
    update_trend,
    update_vol,
    vol_from_dict,
    vol_to_dict,
)
from vocabulary import NORMAL

log = logging.getLogger(__name__)

OPEN_ORDERS_SHOWN = 40
VOL_MIN_SAMPLES = 60  # an hour of 1m closes before the volatility counts


@dataclass(frozen=True)
class RunnerSettings:
    trend_fast: int = 20
    trend_slow: int = 60
    trend_band_pct: float = 0.1
    kelly_min_samples: int = 20
    reconcile_every_sec: float = 300.0
    vol_halflife_min: float = 60.0


@dataclass
class EquityTrack:
    """Equity in the quote asset, marked at each step's price: start, peak and the deepest drawdown.

    Besides the drawdown of the whole equity it follows what the grid adds beyond
    holding its starting inventory: ``equity - start_base * price`` (the starting base
    valued at the current price), its peak and deepest fall in the quote currency, and
    the largest position the grid itself took on, ``|base - start_base| * price``.
    """

    start: float | None = None
    peak: float = 0.0
    last: float = 0.0
    max_drawdown_pct: float = 0.0
    start_price: float | None = None
    start_base: float = 0.0
    excess_peak: float | None = None  # peak of equity - start_base * price
    grid_max_drawdown: float = 0.0  # deepest fall below that peak, in the quote currency
    inventory_peak: float = 0.0  # largest |base - start_base| * price

    def mark(self, equity: float, price: float, base: float) -> None:
        if self.start is None:
            self.start = self.peak = equity
            self.start_price, self.start_base = price, base
        self.last = equity
        self.peak = max(self.peak, equity)
        if self.peak > 0:
            self.max_drawdown_pct = max(self.max_drawdown_pct, (self.peak - equity) / self.peak * 100.0)
        position = base - self.start_base
        excess = equity - self.start_base * price
        if self.excess_peak is None or excess > self.excess_peak:
            self.excess_peak = excess
        self.grid_max_drawdown = max(self.grid_max_drawdown, self.excess_peak - excess)
        self.inventory_peak = max(self.inventory_peak, abs(position) * price)


class GridRunner:
    def __init__(
        self,
        config: GridConfig,
        make_exchange: Callable[[float], Exchange],
        *,
        settings: RunnerSettings = RunnerSettings(),
        kind: str = "paper",
        record_fill: Callable[[dict[str, Any]], None] | None = None,
        record_error: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.config, self.settings, self.kind = config, settings, kind
        self._make_exchange = make_exchange
        self.exchange: Exchange | None = None
        self.state: GridState | None = None
        self.trend = TrendState()
        self.vol = VolState()
        self.equity = EquityTrack()
        self.last_candle_time: int | None = None
        self._record_fill = record_fill
        self.record_error = record_error or (lambda source, message, now: None)
        self._price: float | None = None
        self._adoptable: dict[str, OpenOrder] = {}
        self._last_reconcile_at: float | None = None
        self.changed = False  # set by any step that changed the state (the bot saves the snapshot)

    # the cycle --------------------------------------------------------------------

    def step(self, now: float, candles: Sequence[Candle], price: float, regime: str, posture: Posture) -> None:
        """New closed 1m candles (oldest first, possibly none), the current price and posture."""
        self._price = price
        fresh = newer_than(candles, self.last_candle_time)
        try:
            if self.exchange is None:
                self.exchange = self._make_exchange(price)
            if self.state is None:
                self.state = initial_state(self.config, self.exchange.balances(), now)
            for fill in self._poll(now, fresh):
                self._apply(Filled(fill, price), now)
            if self._last_reconcile_at is None or now - self._last_reconcile_at >= self.settings.reconcile_every_sec:
                self.reconcile(now)
            balances = self.exchange.balances()
        except (RetryLater, BadData) as exc:
            self.record_error(f"grid {self.kind}", str(exc), now)
            log.warning("grid step skipped: %s", exc)
            return
        for c in fresh:
            s = self.settings
            self.trend = update_trend(
                self.trend, c.time + 60, c.close, fast=s.trend_fast, slow=s.trend_slow, band_pct=s.trend_band_pct
            )
            self.vol = update_vol(self.vol, c.close, halflife_min=s.vol_halflife_min)
        if fresh:
            self.last_candle_time = fresh[-1].time
        self._apply(Tick(now, price, regime, posture, balances, self.vol_pct), now)
        self._cancel_unclaimed(now)
        bal = self.state.balances
        self.equity.mark(bal.quote + bal.base * price, price, bal.base)

    def _poll(self, now: float, fresh: list[Candle]) -> list[Fill]:
        assert self.exchange is not None
        if self.exchange.fills_from_candles:
            return [f for c in fresh for f in self.exchange.poll_fills(now, c)]
        return self.exchange.poll_fills(now, fresh[-1] if fresh else None)

    def _apply(self, event: Event, now: float) -> None:
        """Reduce ``event`` and carry out the actions, feeding each outcome back, until nothing is left."""
        queue: deque[Event] = deque([event])
        while queue:
            ev = queue.popleft()
            assert self.state is not None
            before = self.state
            self.state, actions = reduce(self.state, ev, self.config)
            if actions or not isinstance(ev, Tick):
                self.changed = True
            if isinstance(ev, Filled):
                self._log_fill(before, ev.fill)
            for action in actions:
                queue.extend(self._execute(action, now))

    def _execute(self, action: Place | Cancel, now: float) -> list[Event]:
        assert self.exchange is not None
        if isinstance(action, Cancel):
            try:
                partial = self.exchange.cancel(action.order_id, now)
            except (RetryLater, BadData) as exc:
                # Unknown outcome: the reconciliation finds the order (open, filled or gone) later.
                self.record_error(f"grid {self.kind}", f"cancel {action.order_id}: {exc}", now)
                return []
            events: list[Event] = [Filled(partial, self._price or partial.price)] if partial else []
            return [*events, Gone(action.order_id, now)]
        o = action.order
        adopted = self._adoptable.pop(o.id, None)
        if adopted is not None:
            log.info("reconciled: adopting order %s found open on the exchange", o.id)
            self.exchange.adopt(adopted)
            return [Placed(o.id, adopted.price, adopted.volume)]
        try:
            self.exchange.place(OrderRequest(o.id, o.side, o.price, o.volume), now)
        except OrderRejected as exc:
            return [Rejected(o.id, exc.reason, str(exc), now)]
        except (RetryLater, BadData) as exc:
            return [Rejected(o.id, "deferred", str(exc), now)]
        return [Placed(o.id, o.price, o.volume)]

    def _log_fill(self, before: GridState, fill: Fill) -> None:
        order = before.orders.get(fill.client_id)
        if order is None or self._record_fill is None:
            return
        cycle_net = None
        if order.role == EXIT and self.state is not None and self.state.recent_cycles:
            cycle_net = self.state.recent_cycles[0].net_quote
        row = {
            "pair": self.config.rules.pair, "order_id": order.id, "ts": fill.ts, "exchange": self.kind,
            "slot": order.slot, "leg": order.leg, "role": order.role, "side": fill.side, "price": fill.price,
            "volume": fill.volume, "fee": fill.fee, "regime_at_entry": order.regime_at_entry,
            "tier_at_entry": order.tier_at_entry, "cycle_net": cycle_net,
        }  # fmt: skip
        try:
            self._record_fill(row)
        except RetryLater as exc:  # the fill is in the state and the snapshot; only the audit row is lost
            self.record_error("store", str(exc), fill.ts)

    # reconciliation -----------------------------------------------------------------

    def reconcile(self, now: float) -> None:
        """Match the engine's orders with the exchange's (see the module docstring)."""
        assert self.exchange is not None and self.state is not None
        self._last_reconcile_at = now
        on_exchange = self.exchange.open_orders()
        mine = self.state.orders
        # First what the exchange holds that the grid does not: a fill found below may make the
        # grid place one of these very orders again, and it must be adopted, not sent twice.
        for oid, order in on_exchange.items():
            if oid not in mine:
                self._adoptable[oid] = order
        missing = [oid for oid, o in mine.items() if o.open and oid not in on_exchange]
        found = self.exchange.lookup(missing) if missing else {}
        for oid in missing:
            info = found.get(oid)
            if isinstance(info, Fill):
                log.warning("reconciled: order %s filled while unobserved", oid)
                self._apply(Filled(info, self._price or info.price), now)
            else:
                log.warning("reconciled: order %s is no longer on the exchange", oid)
                self._apply(Gone(oid, now), now)
        for oid, order in on_exchange.items():
            known = mine.get(oid)
            if known is None:
                continue
            if known.cancelling:
                # Its cancel failed (retry later) and nothing else would send it again: send it now.
                for event in self._execute(Cancel(oid, "cancel retried"), now):
                    self._apply(event, now)
            elif not known.open:
                self._apply(Placed(oid, order.price, order.volume), now)

    def _cancel_unclaimed(self, now: float) -> None:
        assert self.exchange is not None
        for oid in list(self._adoptable):
            del self._adoptable[oid]
            log.warning("reconciled: cancelling order %s that the grid does not hold", oid)
            try:
                partial = self.exchange.cancel(oid, now)
            except (RetryLater, BadData) as exc:
                self.record_error(f"grid {self.kind}", f"cancel {oid}: {exc}", now)
                continue
            state = self.state
            assert state is not None
            note = f"cancelled order {oid} found on the exchange but unknown to the grid"
            if partial is not None:
                note += f" ({partial.volume:g} had executed at {partial.price})"
            notes = ({"ts": now, "kind": "reconciled", "message": note}, *state.notes)[:NOTES_KEPT]
            self.state = replace(state, notes=notes)

    # views --------------------------------------------------------------------------

    @property
    def capacity_band(self) -> str:
        if self.state is None:
            return NORMAL
        return capacity(self.config, self.state.orders)["band"]

    @property
    def vol_pct(self) -> float | None:
        """Recent hourly volatility, percent (``None`` until an hour of closes was seen)."""
        return hourly_vol_pct(self.vol, min_samples=VOL_MIN_SAMPLES)

    def operational(self, now: float) -> dict[str, Any] | None:
        if self.state is None:
            return None
        return operational_signals(
            self.state, self.config, self.trend, now, kelly_min_samples=self.settings.kelly_min_samples
        )

    def summary(self, price: float) -> dict[str, Any]:
        """The replay report's figures for this grid, marked at ``price``."""
        assert self.state is not None
        st, eq = self.state, self.equity
        end = st.balances.quote + st.balances.base * price
        start = eq.start if eq.start is not None else end
        open_entry_fees = sum(o.entry_fee for o in st.orders.values() if o.role == EXIT)
        drift = eq.start_base * (price - eq.start_price) if eq.start_price is not None else 0.0
        return {
            "net_pnl_usd": round(end - start, 6),
            "max_drawdown_pct": round(eq.max_drawdown_pct, 4),
            "cycles": st.cycles,
            "fees_usd": round(st.fees_quote, 6),
            "realized_pnl_usd": round(st.realized_quote, 6),
            "open_positions_mtm_usd": round(mark_to_market(st, price), 6),
            "open_entry_fees_usd": round(open_entry_fees, 6),
            "start_inventory_drift_usd": round(drift, 6),  # the starting base holding's change in value
            "grid_max_drawdown_usd": round(eq.grid_max_drawdown, 6),
            "inventory_peak_usd": round(eq.inventory_peak, 6),
            "start_equity_usd": round(start, 6),
            "end_equity_usd": round(end, 6),
            "end_inventory": {"quote": round(st.balances.quote, 6), "base": round(st.balances.base, 8)},
            "open_orders": len(st.orders),
            "entries_skipped": dict(st.skipped),
        }

    def status_block(self, now: float) -> dict[str, Any] | None:
        if self.state is None:
            return None
        st, cfg, rules = self.state, self.config, self.config.rules
        price = self._price if self._price is not None else st.price
        held = reserved(cfg, st.orders)
        bal = st.balances
        equity = bal.quote + bal.base * price if price is not None else None
        signals = self.operational(now) or {}
        orders = sorted(st.orders.values(), key=lambda o: o.placed_at, reverse=True)[:OPEN_ORDERS_SHOWN]
        p = st.posture
        return {
            "exchange": self.kind,
            "pair": rules.pair,
            "base_asset": rules.base_asset,
            "quote_asset": rules.quote_asset,
            "price_decimals": rules.price_decimals,
            "posture": {
                "tier": p.tier,
                "direction": p.direction,
                "source": p.source,
                "strength": round(p.strength, 4),
                "size": p.size,
                "since": p.since,
                "suppressed_side": ENTRY_SIDE.get(p.against_leg or "") if p.tier >= 2 else None,
            },
            "balances": {
                "quote": bal.quote,
                "base": bal.base,
                "quote_reserved": held.quote,
                "base_reserved": held.base,
                "quote_free": bal.quote - held.quote,
                "base_free": bal.base - held.base,
                "price": price,
                "equity_quote": equity,
            },
            "pnl": {
                "start_equity_quote": self.equity.start,
                "net_quote": None if equity is None or self.equity.start is None else equity - self.equity.start,
                "realized_quote": st.realized_quote,
                "fees_quote": st.fees_quote,
                "cycles": st.cycles,
                "max_drawdown_pct": round(self.equity.max_drawdown_pct, 4),
            },
            "capacity": capacity(cfg, st.orders),
            "distances": {
                "vol_pct": None if self.vol_pct is None else round(self.vol_pct, 4),
                "vol_ref_pct": cfg.vol_ref_pct,
                "scale": round(vol_scale(cfg, self.vol_pct), 4),
                "entry_pct": [
                    round(entry_distance_pct(cfg, p, k, "B", vol_scale(cfg, self.vol_pct)), 4) for k in range(cfg.slots)
                ],
                "exit_pct": round(cfg.exit_pct * vol_scale(cfg, self.vol_pct), 4),
            },
            "exposure": {"quote": exposure_quote(st.orders), "cap_quote": cfg.max_exposure_quote},
            "signals": {
                "fills_last_hour": signals.get("fills_last_hour"),
                "recovery_orders": signals.get("recovery_orders"),
                "trend": signals.get("trend"),
                "kelly": signals.get("kelly"),
                "kelly_min_samples": self.settings.kelly_min_samples,
            },
            "slots": leg_states(st, cfg, now),
            "open_orders": [
                {
                    "id": o.id,
                    "slot": o.slot,
                    "leg": o.leg,
                    "role": o.role,
                    "side": o.side,
                    "price": o.price,
                    "volume": o.volume,
                    "placed_at": o.placed_at,
                    "regime_at_entry": o.regime_at_entry,
                    "tier_at_entry": o.tier_at_entry,
                    "recovery": o.recovery,
                    "open": o.open,
                }
                for o in orders
            ],
            "recent_fills": list(st.recent_fills),
            "recent_cycles": [dict(c.__dict__) for c in st.recent_cycles],
            "notes": list(st.notes),
            "entries_skipped": dict(st.skipped),
        }

    # persistence --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any] | None:
        if self.state is None:
            return None
        book = getattr(self.exchange, "book", None)
        eq = self.equity
        return {
            "engine": to_dict(self.state),
            "paper_book": book.to_dict() if book is not None else None,
            "trend": trend_to_dict(self.trend),
            "vol": vol_to_dict(self.vol),
            "equity": eq.__dict__.copy(),
            "last_candle_time": self.last_candle_time,
        }

    def restore(self, data: dict[str, Any], price: float | None) -> None:
        """The state of :meth:`snapshot`; raises KeyError, TypeError or ValueError on a bad record."""
        state = from_dict(data["engine"], self.config)
        trend = trend_from_dict(data.get("trend") or {})
        vol = vol_from_dict(data.get("vol") or {})
        eq = data.get("equity") or {}
        exchange = self._make_exchange(price or state.price or 1.0)
        book = getattr(exchange, "book", None)
        if book is not None and data.get("paper_book") is not None:
            book.restore(data["paper_book"])
        self.state, self.trend, self.vol, self.exchange = state, trend, vol, exchange
        self.equity = EquityTrack(
            start=eq.get("start"),
            peak=float(eq.get("peak", 0.0)),
            last=float(eq.get("last", 0.0)),
            max_drawdown_pct=float(eq.get("max_drawdown_pct", 0.0)),
            start_price=eq.get("start_price"),
            start_base=float(eq.get("start_base", 0.0)),
            excess_peak=eq.get("excess_peak"),
            grid_max_drawdown=float(eq.get("grid_max_drawdown", 0.0)),
            inventory_peak=float(eq.get("inventory_peak", 0.0)),
        )
        last = data.get("last_candle_time")
        self.last_candle_time = int(last) if last is not None else None


def newer_than(candles: Sequence[Candle], time: int | None) -> list[Candle]:
    """The candles after ``time``, oldest first; scans from the newest end (the usual case is one)."""
    fresh = []
    for c in reversed(candles):
        if time is not None and c.time <= time:
            break
        fresh.append(c)
    fresh.reverse()
    return fresh
