"""The advisor's runtime state: opinions in, operator actions, the override, the status block.

:class:`RegimeAdvisor` is what the bot holds. The main loop calls :meth:`step`
once per cycle (never blocking: the LLM runs on the worker thread); the HTTP
threads call :meth:`apply`, :meth:`revert` and :meth:`dismiss`. One lock
guards the state, and it is never held across I/O to the LLM. The decisions
themselves are the pure functions of ``advisor_policy``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from advisor.policy import (
    AGREE,
    APPLIED,
    DISMISSED,
    EXPIRED,
    NONE,
    PENDING,
    REVERTED,
    AdvisorSchedule,
    Override,
    Rails,
    Scorecard,
    agreement_headline,
    classify_agreement,
    effective_state,
    is_stale,
    one_step,
    opinion_age,
    override_end,
    plan_override,
    refusal_reason,
)
from ai_advisor import AdvisorWorker, Job, Panel, get_regime_opinion
from clock import iso_utc
from config import Settings
from errors import MALFORMED, REFUSED, ActionRefused, RetryLater
from redaction import scrub
from store.interface import Store
from vocabulary import TierState

log = logging.getLogger(__name__)

ErrorSink = Callable[[str, str, float], None]


class RegimeAdvisor:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        record_error: ErrorSink,
        panel: Panel | None = None,
    ) -> None:
        s = settings
        self.pair = s.PAIR
        self.enabled = s.AI_REGIME_ADVISOR_ENABLED
        self.store = store
        self._record_error = record_error
        self._secrets = s.secret_values()  # masked in every error text the advisor keeps or reports
        self.rails = Rails(
            s.AI_OVERRIDE_MIN_CONVICTION, s.AI_OVERRIDE_TTL_SEC, s.AI_OVERRIDE_MAX_TTL_SEC, s.AI_OPINION_MAX_AGE_SEC
        )
        self.schedule = AdvisorSchedule(s.AI_REGIME_INTERVAL_SEC, s.AI_REGIME_DEBOUNCE_SEC)
        self.scorecard = Scorecard(s.AI_SCORECARD_HORIZON_SEC, s.GRID_ENTRY_PCT)
        self.history: deque[dict[str, Any]] = deque(maxlen=s.AI_REGIME_HISTORY_SIZE)
        self.opinion: dict[str, Any] | None = None
        self.dismissed = False
        self.override: Override | None = None
        self.last_run_ts: float | None = None
        self.last_run_reason: str | None = None
        self.last_error: str | None = None
        self.skipped_cooling = 0
        self.panel = (panel or Panel.from_settings(s)) if self.enabled else None
        self.worker = AdvisorWorker(self._ask) if self.panel is not None else None
        self._lock = threading.RLock()

    def _ask(self, context: Mapping[str, Any]) -> dict[str, Any]:
        assert self.panel is not None
        return get_regime_opinion(context, self.panel)

    def start(self) -> None:
        if self.worker:
            self.worker.start()

    def stop(self) -> None:
        if self.worker:
            self.worker.stop()

    # the main loop ------------------------------------------------------------

    def step(
        self,
        now: float,
        *,
        mech: TierState,
        agreement: str,
        capacity_band: str,
        price: float | None,
        ready: bool,
        make_context: Callable[[], Mapping[str, Any] | Callable[[], Mapping[str, Any]]],
    ) -> None:
        """One cycle: end a due override, take finished opinions, score old ones, maybe ask again."""
        if not self.enabled:
            return
        assert self.worker is not None and self.panel is not None
        with self._lock:
            self._end_override_if_due(now, mech, capacity_band)
            for job, result in self.worker.drain():
                self._consume(job, result, now, mech, price)
            for entry in self.scorecard.score_due(now, price):
                self._store_write(
                    "scoring an AI opinion",
                    lambda e=entry: self.store.record_ai_opinion_outcome(
                        self.pair, e["ts"], price_after=e["price_after"], hit=e["hit"]
                    ),
                    now,
                )
            self.schedule.observe(mech, agreement)
            reason = self.schedule.due(now) if ready else None
            if reason and self.panel.all_cooling():
                self.skipped_cooling += 1
                reason = None
            if reason:
                self.schedule.mark_run(now)
                self.last_run_ts, self.last_run_reason = now, reason
        if reason:
            log.info("asking the AI advisor (%s)", reason)
            self.worker.submit(Job(now, make_context(), price, reason))

    def _consume(self, job: Job, result: Mapping[str, Any], now: float, mech: TierState, price: float | None) -> None:
        if result.get("error"):
            self.last_error = scrub(str(result["error"]), self._secrets)
            log.warning("AI advisor run skipped: %s", self.last_error)
            return
        agreement = classify_agreement(
            mech.tier, mech.direction, result["recommended_tier"], result["recommended_direction"]
        )
        opinion = {
            "ts": now,
            "asked_at": job.ts,
            "recommended_tier": result["recommended_tier"],
            "recommended_direction": result["recommended_direction"],
            "conviction": result["conviction"],
            "rationale": result["rationale"],
            "watch_for": result["watch_for"],
            "panelist": result["panelist"],
            "model": result.get("model"),
            "latency_sec": result.get("latency_sec"),
            "mechanical_tier": mech.tier,
            "mechanical_direction": mech.direction,
            "agreement_when_received": agreement,
            "price": price,
        }
        if self.history and self.history[0]["action"] == PENDING:
            self.history[0]["action"] = NONE  # superseded without an operator decision
        self.history.appendleft(
            {
                "ts": now,
                "mechanical_tier": mech.tier,
                "ai_tier": opinion["recommended_tier"],
                "ai_direction": opinion["recommended_direction"],
                "conviction": opinion["conviction"],
                "agreement": agreement,
                "action": NONE if agreement == AGREE else PENDING,
                "panelist": opinion["panelist"],
            }
        )
        self.opinion, self.dismissed, self.last_error = opinion, False, None
        log.info(
            "AI opinion from %s: tier %d %s, conviction %d (%s; mechanical tier %d %s)",
            opinion["panelist"],
            opinion["recommended_tier"],
            opinion["recommended_direction"],
            opinion["conviction"],
            agreement,
            mech.tier,
            mech.direction,
        )
        row = {
            "pair": self.pair,
            "ts": now,
            "panelist": opinion["panelist"],
            "model": opinion["model"],
            "mechanical_tier": mech.tier,
            "mechanical_direction": mech.direction,
            "ai_tier": opinion["recommended_tier"],
            "ai_direction": opinion["recommended_direction"],
            "conviction": opinion["conviction"],
            "agreement": agreement,
            "rationale": opinion["rationale"],
            "watch_for": opinion["watch_for"],
            "latency_sec": opinion["latency_sec"],
            "price": price,
        }
        self._store_write("recording an AI opinion", lambda: self.store.record_ai_opinion(row), now)
        self.scorecard.add(
            ts=now,
            price=price,
            direction=opinion["recommended_direction"],
            panelist=opinion["panelist"],
            agreement=agreement,
        )

    def _store_write(self, what: str, write: Callable[[], None], now: float) -> None:
        try:
            write()
        except RetryLater as exc:  # the opinion still counts; only its audit row is lost
            self._record_error("store", scrub(f"{what}: {exc}", self._secrets), now)

    def _end_override_if_due(self, now: float, mech: TierState, capacity_band: str) -> None:
        if self.override is None:
            return
        reason = override_end(self.override, mech, capacity_band=capacity_band, now=now)
        if reason is None:
            return
        log.info(
            "AI override tier %d %s ended (%s); back to the mechanical tier %d %s",
            self.override.tier,
            self.override.direction,
            reason,
            mech.tier,
            mech.direction,
        )
        self._mark(self.override.opinion_ts, EXPIRED if reason == "expired" else REVERTED)
        self.override = None

    def _mark(self, opinion_ts: float, action: str) -> None:
        for entry in self.history:
            if entry["ts"] == opinion_ts:
                entry["action"] = action
                return

    def effective(self, mech: TierState) -> tuple[TierState, str]:
        """The tier the rest of the loop uses and its source."""
        with self._lock:
            return effective_state(mech, self.override)

    # operator actions (HTTP threads) -------------------------------------------

    def apply(
        self,
        payload: Mapping[str, Any],
        now: float,
        *,
        mech: TierState,
        capacity_band: str,
        directional_enabled: bool,
    ) -> dict[str, Any]:
        """``ai_regime_override``: apply the current opinion (one tier at most, bounded TTL)."""
        ttl = _validate(payload, {"ttl_sec"})
        self._require_enabled()
        with self._lock:
            self._end_override_if_due(now, mech, capacity_band)
            plan = plan_override(
                self.opinion,
                mech,
                now=now,
                ttl_sec=ttl,
                dismissed=self.dismissed,
                capacity_band=capacity_band,
                directional_enabled=directional_enabled,
                rails=self.rails,
            )
            assert self.opinion is not None
            replaced = self.override
            self.override = Override(
                tier=plan.tier,
                direction=plan.direction,
                applied_at=now,
                expires_at=now + plan.ttl_sec,
                source_conviction=int(self.opinion["conviction"]),
                opinion_ts=float(self.opinion["ts"]),
            )
            if replaced is not None and replaced.opinion_ts != self.override.opinion_ts:
                self._mark(replaced.opinion_ts, REVERTED)
            self._mark(self.override.opinion_ts, APPLIED)
            message = plan.message(self.opinion["recommended_tier"], mech)
            log.warning("operator action: %s (mechanical tier %d %s)", message, mech.tier, mech.direction)
            return {
                "message": message,
                "clamped": plan.tier_clamped,
                "ttl_clamped": plan.ttl_clamped,
                "replaced_override": replaced is not None,
                "override": self._override_block(now),
            }

    def revert(self, payload: Mapping[str, Any], now: float, *, mech: TierState) -> dict[str, Any]:
        """``ai_regime_revert``: end the active override at once."""
        _validate(payload, set())
        self._require_enabled()
        with self._lock:
            if self.override is None:
                raise ActionRefused(REFUSED, "no override is active")
            ended = self.override
            self.override = None
            self._mark(ended.opinion_ts, REVERTED)
        message = f"override tier {ended.tier} {ended.direction} reverted; mechanical tier {mech.tier} {mech.direction}"
        log.warning("operator action: %s", message)
        return {"message": message, "effective": {"tier": mech.tier, "direction": mech.direction}}

    def dismiss(self, payload: Mapping[str, Any], now: float, *, mech: TierState) -> dict[str, Any]:
        """``ai_regime_dismiss``: hide the current disagreement until the next opinion."""
        _validate(payload, set())
        self._require_enabled()
        with self._lock:
            opinion = self.opinion
            if opinion is None:
                raise ActionRefused(REFUSED, "there is no current opinion to dismiss")
            agreement = self._agreement(opinion, mech)
            if agreement == AGREE:
                raise ActionRefused(REFUSED, "the current opinion agrees with the mechanical tier: nothing to dismiss")
            if self.dismissed:
                raise ActionRefused(REFUSED, "the current opinion is already dismissed")
            if self.override is not None and self.override.opinion_ts == opinion["ts"]:
                raise ActionRefused(REFUSED, "the current opinion is applied as an override: use ai_regime_revert")
            self.dismissed = True
            self._mark(opinion["ts"], DISMISSED)
        log.info("operator action: AI opinion of %s dismissed", iso_utc(opinion["ts"]))
        return {"message": f"opinion dismissed ({agreement}); it stays hidden until the next opinion"}

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise ActionRefused(REFUSED, "the AI advisor is disabled (AI_REGIME_ADVISOR_ENABLED=false)")

    @staticmethod
    def _agreement(opinion: Mapping[str, Any], mech: TierState) -> str:
        return classify_agreement(
            mech.tier, mech.direction, opinion["recommended_tier"], opinion["recommended_direction"]
        )

    # status and persistence ---------------------------------------------------

    def status_block(
        self, now: float, *, mech: TierState, capacity_band: str, directional_enabled: bool, ready: bool
    ) -> dict[str, Any]:
        """The ``ai_regime_advisor`` block of SPEC section 12 (plus panel, scorecard and timing details)."""
        with self._lock:
            opinion = None
            if self.opinion is not None:
                o = self.opinion
                blocked = refusal_reason(
                    o,
                    mech,
                    now=now,
                    dismissed=self.dismissed,
                    capacity_band=capacity_band,
                    directional_enabled=directional_enabled,
                    rails=self.rails,
                )
                agreement = self._agreement(o, mech)
                preview = None
                if agreement != AGREE:
                    tier, direction, clamped = one_step(mech, o["recommended_tier"], o["recommended_direction"])
                    preview = {"tier": tier, "direction": direction, "clamped": clamped}
                opinion = {
                    **{k: o[k] for k in ("ts", "recommended_tier", "recommended_direction", "conviction")},
                    **{k: o[k] for k in ("rationale", "watch_for", "panelist", "model", "latency_sec")},
                    "age_sec": round(opinion_age(o, now), 1),
                    # stale: too old to apply (AI_OPINION_MAX_AGE_SEC); stale_in_sec counts down to it
                    "stale": is_stale(o, now, self.rails),
                    "stale_in_sec": round(max(0.0, o["ts"] + self.rails.max_opinion_age_sec - now), 1),
                    "agreement": agreement,
                    "headline": agreement_headline(
                        mech.tier, mech.direction, o["recommended_tier"], o["recommended_direction"]
                    ),
                    "agreement_when_received": o["agreement_when_received"],
                    "applicable": blocked is None,
                    "blocked_reason": blocked,
                    "apply_preview": preview,
                }
            next_run = None
            if self.enabled and ready and self.panel is not None:
                next_run = round(max(self.schedule.next_run_in(now), _finite(self.panel.next_ready_in())), 1)
            return {
                "enabled": self.enabled,
                "panel": self.panel.status() if self.panel else [],
                "last_run_ts": self.last_run_ts,
                "last_run_age_sec": None if self.last_run_ts is None else round(now - self.last_run_ts, 1),
                "last_run_reason": self.last_run_reason,
                "next_run_in_sec": next_run,
                "in_flight": bool(self.worker and self.worker.busy),
                "last_error": self.last_error,
                "skipped_all_cooling": self.skipped_cooling,
                "conviction_floor": self.rails.min_conviction,
                "default_ttl_sec": self.rails.default_ttl_sec,
                "max_ttl_sec": self.rails.max_ttl_sec,
                "opinion_max_age_sec": self.rails.max_opinion_age_sec,
                "opinion": opinion,
                "dismissed": self.dismissed,
                "override": self._override_block(now),
                "history": [dict(e) for e in self.history],
                "scorecard": self.scorecard.status(),
            }

    def _override_block(self, now: float) -> dict[str, Any]:
        o = self.override
        if o is None:
            return {
                "active": False,
                "tier": None,
                "direction": None,
                "applied_at": None,
                "expires_at": None,
                "remaining_sec": None,
                "source_conviction": None,
            }
        return {
            "active": True,
            "tier": o.tier,
            "direction": o.direction,
            "applied_at": o.applied_at,
            "expires_at": o.expires_at,
            "remaining_sec": round(o.remaining(now), 1),
            "source_conviction": o.source_conviction,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "override": self.override.to_dict() if self.override else None,
                "scorecard": self.scorecard.to_dict(),
            }

    def restore(self, data: Mapping[str, Any] | None, now: float) -> None:
        """Restore the override while unexpired (and the advisor enabled) and the scorecard.

        A malformed record raises ``ValueError`` (the snapshot cannot be trusted). An override that
        would outlive ``applied_at`` + ``AI_OVERRIDE_MAX_TTL_SEC`` is cut to that, and the cut logged
        and reported: the rail holds whatever the snapshot says.
        """
        if data is None:
            return
        if not isinstance(data, Mapping):
            raise ValueError("advisor: not an object")
        with self._lock:
            try:
                self.scorecard.load(data.get("scorecard") or {})
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"advisor.scorecard: malformed ({exc})") from None
            raw = data.get("override")
            if not raw:
                return
            try:
                override = Override.from_dict(raw)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"advisor.override: malformed ({exc})") from None
            longest = override.applied_at + self.rails.max_ttl_sec
            if override.expires_at > longest:
                message = (
                    f"the saved AI override would expire at {iso_utc(override.expires_at)}, beyond "
                    f"AI_OVERRIDE_MAX_TTL_SEC={self.rails.max_ttl_sec:g} after it was applied; "
                    f"cut to {iso_utc(longest)}"
                )
                log.warning("%s", message)
                self._record_error("snapshot", message, now)
                override = replace(override, expires_at=longest)
            if now >= override.expires_at:
                log.info("the saved AI override expired at %s; cleared", iso_utc(override.expires_at))
            elif not self.enabled:
                log.warning("the saved AI override is cleared: the AI advisor is disabled")
            else:
                self.override = override
                log.warning(
                    "AI override restored: tier %d %s until %s",
                    override.tier,
                    override.direction,
                    iso_utc(override.expires_at),
                )


def _validate(payload: Mapping[str, Any], allowed: set[str]) -> float | None:
    """Check an action body's fields (malformed: unknown fields or wrong types); return ``ttl_sec``."""
    unknown = sorted(set(payload) - allowed - {"action"})
    if unknown:
        raise ActionRefused(MALFORMED, f"unknown field(s) {', '.join(map(repr, unknown))} for {payload.get('action')}")
    ttl = payload.get("ttl_sec")
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ActionRefused(MALFORMED, f"'ttl_sec' must be a number of seconds, got {ttl!r}")
    return float(ttl)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
