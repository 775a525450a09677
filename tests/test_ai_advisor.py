"""The LLM panel through the real ``openai`` client against a local OpenAI-compatible server,
the strict parser, the context builder and the worker thread."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
from conftest import StepClock, make_settings, make_sim_bot, run_ticks
from fake_llm import Reply

from ai_advisor import (
    OPERATIONAL_UNAVAILABLE,
    AdvisorFacts,
    AdvisorWorker,
    Job,
    ModelFacts,
    Panel,
    ParseError,
    build_regime_context,
    get_regime_opinion,
    panel_from_settings,
    parse_opinion,
)
from regime.policy import NO_SIGNAL
from vocabulary import PolicySignal, TierState

KIMI, LLAMA70, LLAMA8, LOCAL = "kimi-test", "llama70-test", "llama8-test", "local-test"
CONTEXT = {"pair": "XDGUSD", "price": 0.1}


def full_panel_settings(url: str, **overrides):
    values = {
        "GROQ_API_KEY": "groq-key",
        "GROQ_BASE_URL": url,
        "NVIDIA_API_KEY": "nvidia-key",
        "NVIDIA_BASE_URL": url,
        "AI_REASONING_MODEL": KIMI,
        "AI_LLAMA70B_MODEL": LLAMA70,
        "AI_LLAMA8B_MODEL": LLAMA8,
        "AI_INSTRUCT_TIMEOUT_SEC": 2.0,
        "AI_REASONING_TIMEOUT_SEC": 2.0,
    }
    values.update(overrides)
    return make_settings(**values)


def make_panel(settings, clock: StepClock | None = None) -> Panel:
    return Panel.from_settings(settings, monotonic=clock or StepClock())


def one_panelist(url: str, clock: StepClock | None = None, **overrides) -> Panel:
    settings = make_settings(**{"AI_BASE_URL": url, "AI_MODEL": LOCAL, "AI_INSTRUCT_TIMEOUT_SEC": 2.0, **overrides})
    return make_panel(settings, clock)


# ---------------------------------------------------------------- the panel's order


def test_panel_order_follows_keys_and_preference():
    none = make_settings()
    assert panel_from_settings(none) == []
    groq_only = make_settings(GROQ_API_KEY="g")
    assert [p.name for p in panel_from_settings(groq_only)] == ["llama70b", "llama8b"]  # Kimi is on NVIDIA
    everything = full_panel_settings("http://x/v1", AI_BASE_URL="http://127.0.0.1:11434/v1", AI_MODEL="llama3.1")
    panel = panel_from_settings(everything)
    assert [p.name for p in panel] == ["custom", "kimi", "llama70b", "llama8b"]
    assert [p.kind for p in panel] == ["instruct", "reasoning", "instruct", "instruct"]
    assert [p.timeout_sec for p in panel] == [2.0, 2.0, 2.0, 2.0]
    late_reasoning = full_panel_settings("http://x/v1", AI_REGIME_PREFER_REASONING=False)
    assert [p.name for p in panel_from_settings(late_reasoning)] == ["llama70b", "llama8b", "kimi"]
    defaults = make_settings(GROQ_API_KEY="g", NVIDIA_API_KEY="n")
    assert {p.name: p.timeout_sec for p in panel_from_settings(defaults)} == {
        "kimi": 30.0,
        "llama70b": 15.0,
        "llama8b": 15.0,
    }


# ---------------------------------------------------------------- answers through the real client


def test_valid_opinion_from_an_instruct_model(llm):
    llm.script(LOCAL, Reply.opinion(tier=2, direction="short_bias", conviction=81))
    result = get_regime_opinion(CONTEXT, one_panelist(llm.url, AI_API_KEY="local-key"))
    assert result["error"] is None
    assert (result["recommended_tier"], result["recommended_direction"], result["conviction"]) == (2, "short_bias", 81)
    assert result["rationale"] == "15m trend is clean" and result["watch_for"].startswith("a close back")
    assert result["panelist"] == "custom" and result["model"] == LOCAL and result["latency_sec"] >= 0
    (call,) = llm.calls(LOCAL)
    assert call.headers["authorization"] == "Bearer local-key"
    assert call.body["temperature"] == pytest.approx(0.2) and call.body["max_tokens"] == 600
    system, user = call.body["messages"]
    assert system["role"] == "system" and "recommended_tier" in system["content"]
    assert json.loads(user["content"]) == CONTEXT


def test_prose_around_the_json_object(llm):
    body = json.loads(Reply.opinion(tier=1, direction="long_bias", conviction=64).content)
    prose = f"Sure! Here is my view:\n```json\n{json.dumps(body)}\n```\nGood luck {{not json}}"
    llm.script(LOCAL, Reply(content=prose))
    result = get_regime_opinion(CONTEXT, one_panelist(llm.url))
    assert result["error"] is None and result["recommended_tier"] == 1 and result["conviction"] == 64


def test_reasoning_model_think_blocks_are_stripped_and_no_temperature_is_sent(llm):
    settings = make_settings(NVIDIA_API_KEY="n", NVIDIA_BASE_URL=llm.url, AI_REASONING_MODEL=KIMI)
    answer = Reply.opinion(tier=2, direction="long_bias", conviction=90).content
    llm.script(KIMI, Reply(content=f'<think>maybe {{"recommended_tier": 0}} or not</think>\n{answer}'))
    result = get_regime_opinion(CONTEXT, make_panel(settings))
    assert result["error"] is None and result["panelist"] == "kimi"
    assert (result["recommended_tier"], result["conviction"]) == (2, 90)
    (call,) = llm.calls(KIMI)
    assert "temperature" not in call.body and "max_tokens" not in call.body


def test_empty_content_falls_back_to_reasoning_content(llm):
    settings = make_settings(NVIDIA_API_KEY="n", NVIDIA_BASE_URL=llm.url, AI_REASONING_MODEL=KIMI)
    answer = Reply.opinion(tier=1, direction="short_bias", conviction=55).content
    llm.script(KIMI, Reply(content="", reasoning_content=f"Weighing it up... final: {answer}"))
    result = get_regime_opinion(CONTEXT, make_panel(settings))
    assert result["error"] is None and (result["recommended_tier"], result["recommended_direction"]) == (
        1,
        "short_bias",
    )


def test_only_a_think_block_and_no_reasoning_is_a_parse_error(llm):
    llm.script(LOCAL, Reply(content='<think>the answer is {"recommended_tier": 2}'))  # unclosed: all thinking
    result = get_regime_opinion(CONTEXT, one_panelist(llm.url))
    assert result["error"] == "parse_error: no JSON object in the reply"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"recommended_tier": 2, "conviction": 80,}', "parse_error: invalid JSON"),
        ("I think the market is ranging.", "parse_error: no JSON object in the reply"),
        ("", "parse_error: no JSON object in the reply"),
    ],
)
def test_unusable_replies_are_discarded_as_parse_errors(llm, content, error):
    llm.script(LOCAL, Reply(content=content))
    result = get_regime_opinion(CONTEXT, one_panelist(llm.url))
    assert result["error"].startswith(error)
    assert (result["recommended_tier"], result["recommended_direction"], result["conviction"]) == (0, "symmetric", 0)


def test_no_choices_is_a_parse_error(llm):
    llm.script(LOCAL, Reply(choices=False))
    assert get_regime_opinion(CONTEXT, one_panelist(llm.url))["error"] == "parse_error: the reply has no choices"


def test_out_of_range_fields_are_clamped_through_the_client(llm):
    reply = {"recommended_tier": 7, "recommended_direction": "moon", "conviction": 250, "rationale": "x" * 900}
    llm.script(LOCAL, Reply(content=json.dumps(reply)))
    result = get_regime_opinion(CONTEXT, one_panelist(llm.url))
    assert result["error"] is None
    assert (result["recommended_tier"], result["recommended_direction"], result["conviction"]) == (0, "symmetric", 100)
    assert len(result["rationale"]) == 500 and result["watch_for"] == ""


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"recommended_tier": 2, "recommended_direction": "long_bias", "conviction": 72.6}, (2, "long_bias", 73)),
        ({"recommended_tier": 2, "recommended_direction": "symmetric", "conviction": 60}, (0, "symmetric", 60)),
        ({"recommended_tier": 0, "recommended_direction": "short_bias", "conviction": 60}, (0, "symmetric", 60)),
        ({"recommended_tier": "2", "recommended_direction": "long_bias", "conviction": "80"}, (0, "symmetric", 0)),
        ({"recommended_tier": True, "recommended_direction": "long_bias", "conviction": True}, (0, "symmetric", 0)),
        ({"recommended_tier": 1.0, "recommended_direction": "long_bias", "conviction": -5}, (0, "symmetric", 0)),
        ({"recommended_tier": 1, "recommended_direction": "short_bias"}, (1, "short_bias", 0)),
        ({}, (0, "symmetric", 0)),
    ],
)
def test_parse_clamps_every_field_to_the_contract(fields, expected):
    opinion = parse_opinion(json.dumps({**fields, "rationale": 5, "watch_for": " w " * 200}))
    assert (opinion["recommended_tier"], opinion["recommended_direction"], opinion["conviction"]) == expected
    assert opinion["rationale"] == "" and len(opinion["watch_for"]) == 200


def test_parse_takes_the_first_object_even_with_braces_in_strings():
    first = '{"recommended_tier": 1, "recommended_direction": "long_bias", "rationale": "a } b {"}'
    text = f'x {first} {{"recommended_tier": 2}}'
    assert parse_opinion(text)["rationale"] == "a } b {"
    with pytest.raises(ParseError):
        parse_opinion("[1, 2]")


# ---------------------------------------------------------------- failures, fallback, cool-down


def test_fallback_order_on_429_with_retry_after_and_500(llm):
    clock = StepClock()
    panel = make_panel(full_panel_settings(llm.url), clock)
    llm.script(KIMI, Reply.error(429, "slow down", headers={"Retry-After": "120"}))
    llm.script(LLAMA70, Reply.error(500, "upstream exploded"))
    llm.script(LLAMA8, Reply.opinion(tier=1, direction="long_bias", conviction=66))
    result = get_regime_opinion(CONTEXT, panel)
    assert result["error"] is None and result["panelist"] == "llama8b"
    assert [a["panelist"] for a in result["attempts"]] == ["kimi", "llama70b", "llama8b"]
    assert result["attempts"][0]["error"] == "rate limited (HTTP 429), retry after 120s"
    assert result["attempts"][1]["error"].startswith("HTTP 500")
    # The SDK does not retry by itself: exactly one call per panelist.
    assert [len(llm.calls(m)) for m in (KIMI, LLAMA70, LLAMA8)] == [1, 1, 1]
    # Kimi cools down for exactly Retry-After; the 70B has one failure, under the limit of two.
    health = {p["name"]: p for p in panel.status()}
    assert health["kimi"]["cooldown_remaining_sec"] == 120.0
    assert health["llama70b"]["cooldown_remaining_sec"] == 0.0 and health["llama70b"]["consecutive_failures"] == 1
    assert [p.name for p in panel.ready()] == ["llama70b", "llama8b"]
    clock.t += 120
    assert [p.name for p in panel.ready()] == ["kimi", "llama70b", "llama8b"]


def test_429_without_retry_after_uses_the_configured_cooldown(llm):
    clock = StepClock()
    panel = one_panelist(llm.url, clock, AI_PANELIST_COOLDOWN_SEC=45)
    llm.script(LOCAL, Reply.error(429))
    assert get_regime_opinion(CONTEXT, panel)["error"] == "rate limited (HTTP 429), retry after 45s"
    assert panel.status()[0]["cooldown_remaining_sec"] == 45.0


def test_a_reply_slower_than_the_timeout_fails_over(llm):
    panel = make_panel(full_panel_settings(llm.url, AI_REASONING_TIMEOUT_SEC=1.0))
    llm.script(KIMI, Reply.opinion(hang=True))
    result = get_regime_opinion(CONTEXT, panel)
    assert (result["attempts"][0]["panelist"], result["attempts"][0]["error"]) == ("kimi", "timeout after 1s")
    assert result["error"] is None and result["panelist"] == "llama70b"


def test_repeated_failures_cool_a_panelist_down_and_all_cooling_skips_the_run(llm):
    clock = StepClock()
    panel = one_panelist(llm.url, clock, AI_PANELIST_MAX_FAILURES=2, AI_PANELIST_COOLDOWN_SEC=300)
    llm.script(LOCAL, [Reply.error(500), Reply(content="no json"), Reply.opinion()])
    assert get_regime_opinion(CONTEXT, panel)["error"].startswith("HTTP 500")
    assert not panel.all_cooling()
    assert get_regime_opinion(CONTEXT, panel)["error"].startswith("parse_error")
    assert panel.all_cooling() and panel.next_ready_in() == 300.0
    skipped = get_regime_opinion(CONTEXT, panel)
    assert skipped["error"] == "every panelist is cooling down" and skipped["attempts"] == []
    assert len(llm.calls()) == 2  # nothing was sent while cooling down
    clock.t += 300
    assert get_regime_opinion(CONTEXT, panel)["error"] is None
    assert panel.status()[0]["consecutive_failures"] == 0


def test_all_panelists_failing_is_reported_and_never_raises(llm):
    panel = make_panel(full_panel_settings(llm.url))
    for model in (KIMI, LLAMA70, LLAMA8):
        llm.script(model, Reply.error(503, "overloaded"))
    result = get_regime_opinion(CONTEXT, panel)
    assert result["error"].startswith("all panelists failed: kimi: HTTP 503")
    assert "llama70b: HTTP 503" in result["error"] and "llama8b: HTTP 503" in result["error"]


def test_errors_that_echo_a_key_or_a_bearer_token_are_scrubbed(llm):
    clock = StepClock()
    groq, nvidia = "gsk_groq0123456789abcdef", "nvapi-nvidia0123456789abcdef"
    panel = make_panel(full_panel_settings(llm.url, GROQ_API_KEY=groq, NVIDIA_API_KEY=nvidia), clock)
    llm.script(KIMI, Reply.error(401, f"invalid key {nvidia}"))
    llm.script(LLAMA70, Reply.error(403, f"key {groq} lacks access; got header 'Bearer {groq}'"))
    llm.script(LLAMA8, Reply.error(500, "proxy saw Authorization: Bearer abc.def-ghi_jkl"))
    result = get_regime_opinion(CONTEXT, panel)
    assert [a["error"] for a in result["attempts"]] == [
        "HTTP 401: Error code: 401 - invalid key ***",
        "HTTP 403: Error code: 403 - key *** lacks access; got header 'Bearer ***'",
        "HTTP 500: Error code: 500 - proxy saw Authorization: Bearer ***",
    ]
    text = json.dumps([result, panel.status()])
    assert groq not in text and nvidia not in text and "abc.def" not in text
    assert {r.headers["authorization"] for r in llm.calls()} == {f"Bearer {groq}", f"Bearer {nvidia}"}


def test_unreachable_endpoint_and_odd_clients_never_raise():
    panel = one_panelist("http://127.0.0.1:9/v1")  # nothing listens on the discard port
    assert get_regime_opinion(CONTEXT, panel)["error"].startswith("connection failed")

    class Exploding:
        @property
        def chat(self):
            raise RuntimeError("client bug")

    settings = make_settings(AI_BASE_URL="http://127.0.0.1:9/v1", AI_MODEL=LOCAL)
    odd = Panel.from_settings(settings, client_factory=lambda p: Exploding())
    assert get_regime_opinion(CONTEXT, odd)["error"] == "RuntimeError: client bug"
    # A context that is not JSON-safe is still answered with an error, not an exception.
    assert get_regime_opinion({"price": float("nan")}, odd)["error"].startswith("advisor failure: ValueError")


# ---------------------------------------------------------------- context


def test_context_carries_every_field_the_spec_lists(tmp_path):
    bot = make_sim_bot(tmp_path / "db.sqlite3")
    try:
        run_ticks(bot, 5)
        status = bot.status()
        facts = bot.advisor_facts()
        context = build_regime_context(facts)
        # What the main loop hands the worker (captured now, formatted later) says the same.
        assert bot._advisor_context()() == context
    finally:
        bot.store.close()
    assert set(context) == {
        "pair",
        "now",
        "price",
        "hmm_1m",
        "hmm_15m",
        "consensus",
        "transition_matrix_1m",
        "training",
        "regime_history_30m",
        "mechanical_tier",
        "operational",
    }
    primary = status["hmm"]["primary"]
    assert context["hmm_1m"] == {k: primary[k] for k in ("regime", "confidence", "bias_signal", "probabilities")}
    assert context["transition_matrix_1m"] == primary["transition_matrix"]
    assert context["consensus"]["agreement"] == status["hmm"]["policy"]["agreement"]
    assert context["consensus"]["effective_confidence"] == status["hmm"]["policy"]["effective_confidence"]
    assert context["training"]["quality_tier"] == primary["training_depth"]["quality_tier"]
    assert context["training"]["confidence_modifier"] == status["hmm"]["policy"]["confidence_modifier"]
    assert len(context["regime_history_30m"]) == len(status["regime_history_30m"]) > 0
    mech = status["regime_tier"]["mechanical"]
    assert context["mechanical_tier"]["tier"] == mech["tier"] and context["mechanical_tier"]["since"] == mech["since"]
    # The grid's operational signals, as SPEC section 6 lists them.
    op = context["operational"]
    assert op["available"] is True
    assert op["trend"]["state"] in ("bullish", "bearish", "neutral") and "since" in op["trend"]
    assert op["fills_last_hour"] >= 0 and op["recovery_orders"] >= 0
    assert op["capacity_band"] == status["grid"]["capacity"]["band"] == status["regime_tier"]["capacity_band"]
    assert op["capacity_headroom"] == status["grid"]["capacity"]["headroom"]
    assert set(op["kelly"]) >= {"RANGING", "BULLISH", "BEARISH"}
    # Before the grid has run, they are unknown, not made up.
    assert build_regime_context(replace(facts, operational=None))["operational"] == OPERATIONAL_UNAVAILABLE
    json.dumps(context, allow_nan=False)


def test_context_of_an_untrained_bot_has_no_model_blocks():
    untrained = ModelFacts(1, NO_SIGNAL, False, None, None, 0, 720)
    policy = PolicySignal("primary", None, "RANGING", 0.0, 0.0)
    facts = AdvisorFacts("XDGUSD", 0.0, None, (untrained,), policy, 0.0, (), TierState(0, "symmetric", 0.0), "normal")
    context = build_regime_context(facts)
    assert context["hmm_1m"] is None and context["hmm_15m"] is None and context["regime_history_30m"] == []


# ---------------------------------------------------------------- worker


def test_worker_newest_context_replaces_an_unconsumed_one():
    gate = threading.Event()
    started = threading.Event()
    seen: list[str] = []

    def ask(context):
        seen.append(context["n"])
        started.set()
        gate.wait(5)
        return {"error": None, "n": context["n"]}

    worker = AdvisorWorker(ask)
    worker.start()
    try:
        worker.submit(Job(1.0, {"n": "first"}, 0.1, "periodic"))
        assert started.wait(5)  # the first job is being answered
        worker.submit(Job(2.0, {"n": "second"}, 0.1, "periodic"))
        worker.submit(Job(3.0, {"n": "third"}, 0.1, "tier change"))  # replaces "second", never asked
        assert worker.busy and worker.replaced == 1 and worker.drain() == []
        gate.set()
        done: list = []
        for _ in range(200):
            done += worker.drain()
            if len(done) == 2:
                break
            threading.Event().wait(0.01)
        assert [job.context["n"] for job, _ in done] == ["first", "third"]
        assert seen == ["first", "third"]
    finally:
        gate.set()
        worker.stop()


def test_worker_stop_returns_even_while_a_call_hangs(llm):
    llm.script(LOCAL, Reply.opinion(hang=True))
    panel = one_panelist(llm.url, AI_INSTRUCT_TIMEOUT_SEC=60)
    worker = AdvisorWorker(lambda ctx: get_regime_opinion(ctx, panel))
    worker.start()
    worker.submit(Job(1.0, CONTEXT, 0.1, "periodic"))
    for _ in range(500):
        if llm.calls():
            break
        threading.Event().wait(0.01)
    assert llm.calls() and worker.busy
    worker.stop(timeout=0.2)  # a daemon thread: abandoned, not waited for
    assert worker.drain() == []
