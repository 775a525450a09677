"""The AI regime advisor's adapter: an LLM panel behind OpenAI-compatible endpoints (SPEC section 6).

* :func:`panel_from_settings` lists the panelists in preference order, each
  only when its provider key (or endpoint) is configured.
* :func:`get_regime_opinion` asks one panelist after another until one gives a
  usable answer. It never raises: every failure becomes the ``error`` field.
* :func:`parse_opinion` is the strict, pure parser of the output contract.
* :func:`build_regime_context` turns the loop's :class:`AdvisorFacts` into the prompt's facts.
* :class:`AdvisorWorker` runs the calls on a daemon thread so the main loop
  never waits: a one-slot input queue where the newest context wins, and an
  output queue of finished opinions.

This module does network I/O and nothing else; what an opinion *means* for the
tier (agreement, rails) lives in ``advisor_policy``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import openai

from clock import iso_utc
from config import Settings
from redaction import scrub
from retry import parse_retry_after
from vocabulary import DIRECTIONS, SYMMETRIC, TIERS, PolicySignal, RegimeSignal, TierState

log = logging.getLogger(__name__)

RATIONALE_MAX = 500
WATCH_FOR_MAX = 200
MAX_RETRY_AFTER_SEC = 3600.0
INSTRUCT_TEMPERATURE = 0.2
INSTRUCT_MAX_TOKENS = 600

SYSTEM_PROMPT = """\
You are the second opinion of a grid trading bot on one crypto pair. The bot runs a grid of
buy and sell limit orders and chooses a posture ("tier") from two hidden Markov models:
tier 0 = symmetric grid (ranging market), tier 1 = grid skewed toward the trend,
tier 2 = one-sided grid that only enters with the trend. A wrong directional tier loses money
in a range; a symmetric tier gives up edge in a clean trend. You receive the models' state,
their recent history, the mechanical tier the bot computed, and operational signals
(fields reported as unavailable are unknown, not zero).

Judge whether the mechanical tier fits the market. Answer with ONE JSON object and nothing
else, exactly these fields:
{"recommended_tier": 0|1|2,
 "recommended_direction": "symmetric"|"long_bias"|"short_bias",
 "conviction": integer 0-100 (how sure you are; 50 means a coin flip with a lean),
 "rationale": "at most 500 characters",
 "watch_for": "at most 200 characters: what would change your mind"}
Tier 0 is always "symmetric"; tiers 1 and 2 need "long_bias" or "short_bias".
"""

OPERATIONAL_UNAVAILABLE = {
    "available": False,
    "note": "no grid engine is running: trend, fills in the last hour, recovery orders, "
    "capacity headroom and Kelly edge are unknown",
}

_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_OPEN_THINK = re.compile(r"<think>.*", re.IGNORECASE | re.DOTALL)


# ------------------------------------------------------------------ the panel


@dataclass(frozen=True)
class Panelist:
    name: str
    model: str
    base_url: str
    api_key: str
    kind: str  # "reasoning" | "instruct"
    timeout_sec: float


def panel_from_settings(s: Settings) -> list[Panelist]:
    """The configured panelists, in the order they are asked.

    An explicit ``AI_BASE_URL`` endpoint comes first (the operator chose it);
    then Kimi, the Llama 70B and the Llama 8B, each only when its provider has
    a key. With ``AI_REGIME_PREFER_REASONING=false`` the reasoning model is
    asked last instead of first.
    """
    timeouts = {"reasoning": s.AI_REASONING_TIMEOUT_SEC, "instruct": s.AI_INSTRUCT_TIMEOUT_SEC}
    providers = {"groq": (s.GROQ_BASE_URL, s.GROQ_API_KEY), "nvidia": (s.NVIDIA_BASE_URL, s.NVIDIA_API_KEY)}
    panel: list[Panelist] = []
    if s.AI_BASE_URL and s.AI_MODEL:
        kind = s.AI_MODEL_KIND
        panel.append(Panelist("custom", s.AI_MODEL, s.AI_BASE_URL, s.AI_API_KEY, kind, timeouts[kind]))

    def hosted(name: str, model: str, provider: str, kind: str) -> list[Panelist]:
        url, key = providers[provider]
        return [Panelist(name, model, url, key, kind, timeouts[kind])] if key and model else []

    kimi = hosted("kimi", s.AI_REASONING_MODEL, s.AI_REASONING_PROVIDER, "reasoning")
    llamas = hosted("llama70b", s.AI_LLAMA70B_MODEL, s.AI_LLAMA70B_PROVIDER, "instruct") + hosted(
        "llama8b", s.AI_LLAMA8B_MODEL, s.AI_LLAMA8B_PROVIDER, "instruct"
    )
    panel += kimi + llamas if s.AI_REGIME_PREFER_REASONING else llamas + kimi
    return panel


@dataclass
class PanelistHealth:
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    last_error: str | None = None
    calls: int = 0
    answers: int = 0


class Panel:
    """Panelists with their health: who may be asked now, who is cooling down.

    Times are wall-clock monotonic seconds (rate limits are wall time, also in
    simulation). Shared by the worker thread and the scheduler, hence the lock.
    """

    def __init__(
        self,
        panelists: list[Panelist],
        *,
        max_failures: int,
        cooldown_sec: float,
        monotonic: Callable[[], float] = time.monotonic,
        client_factory: Callable[[Panelist], Any] | None = None,
    ) -> None:
        self.panelists = list(panelists)
        self.max_failures = max_failures
        self.cooldown_sec = cooldown_sec
        self.monotonic = monotonic
        self._client_factory = client_factory or _openai_client
        self._clients: dict[str, Any] = {}
        self._health = {p.name: PanelistHealth() for p in self.panelists}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, s: Settings, **kwargs: Any) -> Panel:
        limits = {"max_failures": s.AI_PANELIST_MAX_FAILURES, "cooldown_sec": s.AI_PANELIST_COOLDOWN_SEC}
        return cls(panel_from_settings(s), **limits, **kwargs)

    def client(self, p: Panelist) -> Any:
        if p.name not in self._clients:
            self._clients[p.name] = self._client_factory(p)
        return self._clients[p.name]

    def cooldown_remaining(self, p: Panelist) -> float:
        with self._lock:
            return max(0.0, self._health[p.name].cooldown_until - self.monotonic())

    def ready(self) -> list[Panelist]:
        """Panelists not cooling down, in preference order."""
        return [p for p in self.panelists if self.cooldown_remaining(p) == 0.0]

    def all_cooling(self) -> bool:
        return not self.ready()

    def next_ready_in(self) -> float:
        """Seconds until some panelist may be asked again (0 when one may now)."""
        waits = [self.cooldown_remaining(p) for p in self.panelists]
        return min(waits) if waits else math.inf

    def record_answer(self, p: Panelist) -> None:
        with self._lock:
            h = self._health[p.name]
            h.calls += 1
            h.answers += 1
            h.consecutive_failures = 0
            h.last_error = None

    def record_failure(self, p: Panelist, error: str, retry_after: float | None = None) -> None:
        """Count a failure; cool down after ``max_failures`` in a row, or at once on a rate limit."""
        with self._lock:
            h = self._health[p.name]
            h.calls += 1
            h.consecutive_failures += 1
            h.last_error = error
            if retry_after is not None:
                h.cooldown_until = self.monotonic() + retry_after
            elif h.consecutive_failures >= self.max_failures:
                h.cooldown_until = self.monotonic() + self.cooldown_sec
            else:
                return
        log.warning("AI panelist %s cools down for %.0fs after: %s", p.name, self.cooldown_remaining(p), error)

    def status(self) -> list[dict[str, Any]]:
        now = self.monotonic()
        with self._lock:
            return [
                {
                    "name": p.name,
                    "model": p.model,
                    "kind": p.kind,
                    "cooldown_remaining_sec": round(max(0.0, self._health[p.name].cooldown_until - now), 1),
                    "consecutive_failures": self._health[p.name].consecutive_failures,
                    "last_error": self._health[p.name].last_error,
                    "calls": self._health[p.name].calls,
                    "answers": self._health[p.name].answers,
                }
                for p in self.panelists
            ]


def _openai_client(p: Panelist) -> openai.OpenAI:
    # Retries are ours (the next panelist), not the SDK's: max_retries=0.
    # A local Ollama needs no key, but the SDK insists on one.
    return openai.OpenAI(base_url=p.base_url, api_key=p.api_key or "unused", timeout=p.timeout_sec, max_retries=0)


# ------------------------------------------------------------------ one opinion


class ParseError(ValueError):
    """The reply holds no usable JSON object."""


def empty_opinion() -> dict[str, Any]:
    return {
        "recommended_tier": 0,
        "recommended_direction": SYMMETRIC,
        "conviction": 0,
        "rationale": "",
        "watch_for": "",
    }


def parse_opinion(text: str) -> dict[str, Any]:
    """The output contract of SPEC section 6, from a reply's text.

    The first ``{...}`` object is parsed; anything else in the reply is
    ignored. Raises :class:`ParseError` when there is no object or it is not
    valid JSON. Fields out of range become the safe defaults.
    """
    start = text.find("{")
    if start < 0:
        raise ParseError("no JSON object in the reply")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise ParseError(f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(obj, dict):  # pragma: no cover - raw_decode at "{" always yields a dict
        raise ParseError("the reply's JSON is not an object")

    opinion = empty_opinion()
    tier = obj.get("recommended_tier")
    if type(tier) is int and tier in TIERS:
        opinion["recommended_tier"] = tier
    direction = obj.get("recommended_direction")
    if isinstance(direction, str) and direction in DIRECTIONS:
        opinion["recommended_direction"] = direction
    if opinion["recommended_tier"] == 0:
        opinion["recommended_direction"] = SYMMETRIC
    elif opinion["recommended_direction"] == SYMMETRIC:
        opinion["recommended_tier"] = 0
    conviction = obj.get("conviction")
    if isinstance(conviction, (int, float)) and not isinstance(conviction, bool) and math.isfinite(conviction):
        opinion["conviction"] = int(min(100, max(0, round(conviction))))
    for key, limit in (("rationale", RATIONALE_MAX), ("watch_for", WATCH_FOR_MAX)):
        value = obj.get(key)
        if isinstance(value, str):
            opinion[key] = value.strip()[:limit]
    return opinion


def reply_text(message: Any) -> str:
    """The answer part of a chat message: ``<think>`` blocks stripped, reasoning as the fallback."""
    content = _OPEN_THINK.sub("", _THINK.sub("", message.content or "")).strip()
    if content:
        return content
    extra = getattr(message, "model_extra", None) or {}
    for key in ("reasoning_content", "reasoning"):
        value = getattr(message, key, None) or extra.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def get_regime_opinion(context: Mapping[str, Any], panel: Panel) -> dict[str, Any]:
    """Ask the ready panelists in order until one answers usably. Never raises.

    Returns the contract fields plus ``panelist``, ``model``, ``latency_sec``
    (of the answering call), ``error`` (``None`` on success) and ``attempts``.
    """
    result: dict[str, Any] = {**empty_opinion(), "panelist": None, "model": None, "latency_sec": None}
    attempts: list[dict[str, Any]] = []
    try:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps(context, separators=(",", ":"), allow_nan=False, default=str)},
        ]
        ready = panel.ready()
        if not ready:
            return {**result, "error": "every panelist is cooling down", "attempts": attempts}
        for p in ready:
            started = panel.monotonic()
            error, retry_after = None, None
            try:
                opinion = parse_opinion(reply_text(_ask(panel.client(p), p, messages)))
            except ParseError as exc:
                error = f"parse_error: {exc}"
            except openai.RateLimitError as exc:
                retry_after = _retry_after(exc.response.headers.get("retry-after"), panel.cooldown_sec)
                error = f"rate limited (HTTP 429), retry after {retry_after:.0f}s"
            except openai.APITimeoutError:
                error = f"timeout after {p.timeout_sec:g}s"
            except openai.APIStatusError as exc:
                error = f"HTTP {exc.status_code}: {_short(exc.message)}"
            except openai.APIConnectionError as exc:
                error = f"connection failed: {_short(str(exc.__cause__ or exc))}"
            except Exception as exc:  # a panelist's odd reply must not end the run
                error = f"{type(exc).__name__}: {_short(str(exc))}"
            latency = round(panel.monotonic() - started, 3)
            if error is not None:  # a provider may echo the key it was sent (or a URL with credentials)
                error = scrub(error, (p.api_key,))
            attempts.append({"panelist": p.name, "error": error, "latency_sec": latency})
            if error is None:
                panel.record_answer(p)
                return {**result, **opinion, "panelist": p.name, "model": p.model, "latency_sec": latency,
                        "error": None, "attempts": attempts}  # fmt: skip
            panel.record_failure(p, error, retry_after)
            log.info("AI panelist %s failed: %s", p.name, error)
        summary = "; ".join(f"{a['panelist']}: {a['error']}" for a in attempts)
        error = attempts[0]["error"] if len(attempts) == 1 else f"all panelists failed: {summary}"
        return {**result, "error": error, "attempts": attempts}
    except Exception as exc:  # pragma: no cover - defensive: the contract is "never raises"
        keys = [p.api_key for p in panel.panelists]
        error = scrub(f"advisor failure: {type(exc).__name__}: {exc}", keys)
        log.error("get_regime_opinion failed: %s", error)
        return {**result, "error": error, "attempts": attempts}


def _ask(client: Any, p: Panelist, messages: list[dict[str, str]]) -> Any:
    kwargs: dict[str, Any] = {"model": p.model, "messages": messages}
    if p.kind == "instruct":  # reasoning models reject or ignore sampling settings
        kwargs.update(temperature=INSTRUCT_TEMPERATURE, max_tokens=INSTRUCT_MAX_TOKENS)
    response = client.chat.completions.create(**kwargs)
    if not response.choices:
        raise ParseError("the reply has no choices")
    return response.choices[0].message


def _retry_after(header: str | None, default: float) -> float:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), within [1, 3600]."""
    seconds = parse_retry_after(header, time.time())
    if seconds is None:
        seconds = default
    return min(MAX_RETRY_AFTER_SEC, max(1.0, seconds))


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------ the context


@dataclass(frozen=True)
class ModelFacts:
    """One model as the panel sees it, captured by the main loop."""

    interval_min: int
    signal: RegimeSignal
    trained: bool
    transition_matrix: list[list[float]] | None
    quality_tier: str | None  # of the training depth
    candles: int  # trained on
    target_candles: int


@dataclass(frozen=True)
class AdvisorFacts:
    """What the panel judges (SPEC section 6): the loop captures it, the worker formats it.

    Only immutable values and copies, so formatting on another thread is safe.
    """

    pair: str
    now: float
    price: float | None
    models: tuple[ModelFacts, ...]  # primary first
    policy: PolicySignal
    confidence_modifier: float  # of the training depth
    history: tuple[Mapping[str, Any], ...]  # the last 30 minutes: ts, regime, conf
    mechanical: TierState
    capacity_band: str
    operational: Mapping[str, Any] | None = None  # the grid engine's signals; None without a grid engine


def _r(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def signal_view(signal: RegimeSignal) -> dict[str, Any]:
    """One model's signal, named and rounded as both the panel and the status payload show it."""
    probs = signal.probabilities
    return {
        "regime": signal.regime,
        "confidence": _r(signal.confidence),
        "bias_signal": _r(signal.bias_signal),
        "probabilities": None
        if probs is None
        else {"bearish": _r(probs[0]), "ranging": _r(probs[1]), "bullish": _r(probs[2])},
    }


def matrix_view(matrix: list[list[float]] | None) -> list[list[float]] | None:
    """A transition matrix rounded as both the panel and the status payload show it."""
    return None if matrix is None else [[_r(v, 5) for v in row] for row in matrix]


def _opinion_of(model: ModelFacts | None) -> dict[str, Any] | None:
    return signal_view(model.signal) if model is not None and model.trained else None


def build_regime_context(facts: AdvisorFacts) -> dict[str, Any]:
    """The facts the panel judges, rounded as the status payload shows them (SPEC section 6).

    Without a grid engine the operational signals are reported as unavailable
    rather than invented.
    """
    primary = facts.models[0]
    policy, modifier, mech = facts.policy, facts.confidence_modifier, facts.mechanical
    return {
        "pair": facts.pair,
        "now": iso_utc(facts.now),
        "price": facts.price,
        "hmm_1m": _opinion_of(primary),
        "hmm_15m": _opinion_of(facts.models[1] if len(facts.models) > 1 else None),
        "consensus": {
            "rule": policy.rule,
            "active": policy.source == "consensus",
            "agreement": policy.agreement,
            "effective_regime": policy.regime,
            "raw_confidence": _r(policy.confidence),
            "effective_confidence": _r(policy.confidence * modifier),
            "effective_bias": _r(policy.bias_signal),
        },
        "transition_matrix_1m": matrix_view(primary.transition_matrix),
        "training": {
            "quality_tier": primary.quality_tier,
            "confidence_modifier": modifier,
            "candles": primary.candles,
            "target_candles": primary.target_candles,
        },
        "regime_history_30m": [{"ts": e["ts"], "regime": e["regime"], "conf": e["conf"]} for e in facts.history],
        "mechanical_tier": {
            "tier": mech.tier,
            "direction": mech.direction,
            "since": mech.since,
            "capacity_band": facts.capacity_band,
        },
        "operational": dict(facts.operational) if facts.operational is not None else OPERATIONAL_UNAVAILABLE,
    }


# ------------------------------------------------------------------ the worker


@dataclass(frozen=True)
class Job:
    """One advisor run: its context and when (bot clock) it was taken.

    ``context`` is the mapping itself or a function that formats it from values
    captured at ``ts``; the worker calls it, keeping that work off the main loop.
    """

    ts: float
    context: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    price: float | None
    reason: str

    def facts(self) -> Mapping[str, Any]:
        return self.context() if callable(self.context) else self.context


class AdvisorWorker:
    """One daemon thread that turns jobs into opinions without ever blocking the caller.

    ``submit`` replaces an unconsumed job (the newest context wins);
    ``drain`` returns finished ``(job, opinion)`` pairs. ``ask`` is the call
    made per job (``get_regime_opinion`` bound to a panel).
    """

    def __init__(self, ask: Callable[[Mapping[str, Any]], dict[str, Any]], name: str = "ai-advisor") -> None:
        self._ask = ask
        self._inbox: queue.Queue[Job | None] = queue.Queue(maxsize=1)
        self._outbox: queue.Queue[tuple[Job, dict[str, Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.replaced = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; an older one not yet picked up is dropped. Never blocks."""
        while True:
            try:
                self._inbox.put_nowait(job)
                return
            except queue.Full:
                try:
                    self._inbox.get_nowait()
                    self.replaced += 1
                except queue.Empty:
                    pass

    def drain(self) -> list[tuple[Job, dict[str, Any]]]:
        done = []
        while True:
            try:
                done.append(self._outbox.get_nowait())
            except queue.Empty:
                return done

    @property
    def busy(self) -> bool:
        """A job is queued or being answered."""
        return self._busy.is_set() or not self._inbox.empty()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end; a call in flight is abandoned (the thread is a daemon)."""
        self._stop.set()
        self.submit(None)  # type: ignore[arg-type]  # wake the thread
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._inbox.get()
            if job is None or self._stop.is_set():
                continue
            self._busy.set()
            try:
                opinion = self._ask(job.facts())
            except Exception as exc:  # a context that cannot be formatted skips this run
                opinion = {**empty_opinion(), "error": f"{type(exc).__name__}: {exc}"}
            if not self._stop.is_set():
                self._outbox.put((job, opinion))
            self._busy.clear()
