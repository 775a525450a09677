"""Operator actions end to end: ``POST /api/action`` on a real ``python bot.py --market sim``
whose advisor asks the local OpenAI-compatible server of ``fake_llm``.

The mechanical tier is held at 0 by a day-long dwell, so the scripted opinion
(tier 2 long, conviction 80) is always an ``ai_upgrade`` that applies as tier 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from fake_llm import FakeLLM, Reply

TOKEN = "op-token-123"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(Reply.opinion(tier=2, direction="long_bias", conviction=80, rationale="clean uptrend")) as fake:
        yield fake


def advisor_env(llm: FakeLLM, **extra: str) -> dict[str, str]:
    return {
        "AI_REGIME_ADVISOR_ENABLED": "true",
        "AI_BASE_URL": llm.url,
        "AI_MODEL": "local-test",
        "AI_REGIME_INTERVAL_SEC": "1800",
        "REGIME_MIN_DWELL_SEC": "86400",
        **extra,
    }


def start(bot_process, tmp_path, llm, *, token: str = "", db: str = "actions.sqlite3"):
    env = advisor_env(llm, **({"API_TOKEN": token} if token else {}))
    bot = bot_process(["--market", "sim", "--speed", "20", "--port", "0", "--db", str(tmp_path / db)], env=env)
    bot.wait_ready()
    return bot


def post(bot, payload, headers=None) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    code, _, raw = bot.request("POST", "/api/action", body, {**JSON, **(headers or {})})
    return code, json.loads(raw)


def advisor(bot, headers=None) -> dict:
    code, status = bot.get_json("/api/status", headers)
    assert code == 200
    return status["ai_regime_advisor"] | {"_effective": status["regime_tier"]["effective"]}


def decisions(block: dict) -> tuple:
    """The state an action may change: override, dismissal, and what became of each opinion."""
    return (block["override"]["active"], block["dismissed"], [e["action"] for e in block["history"]])


def test_each_action_and_every_bad_input_over_http(tmp_path, bot_process, llm):
    bot = start(bot_process, tmp_path, llm)
    status = bot.wait_status(lambda s: (s["ai_regime_advisor"]["opinion"] or {}).get("agreement") == "ai_upgrade")
    assert status["regime_tier"]["mechanical"]["tier"] == 0
    before = decisions(advisor(bot))
    assert before == (False, False, ["pending"])

    bad = [
        (b"{not json", 400, "JSON"),
        (b'"just a string"', 400, "must be a JSON object"),
        ({"action": 5}, 400, "'action' must be a string"),
        ({"action": "ai_regime_explode"}, 400, "unknown action 'ai_regime_explode'"),
        ({"action": "ai_regime_override", "ttl_sec": "soon"}, 400, "'ttl_sec' must be a number"),
        ({"action": "ai_regime_override", "ttl_sec": [60]}, 400, "'ttl_sec' must be a number"),
        ({"action": "ai_regime_override", "tier": 2}, 400, "unknown field(s) 'tier'"),
        ({"action": "ai_regime_revert"}, 409, "no override is active"),
        (json.dumps({"action": "ai_regime_override", "pad": "x" * 17_000}).encode(), 413, "the limit is 16384"),
    ]
    for payload, code, fragment in bad:
        got, body = post(bot, payload)
        assert (got, body["ok"]) == (code, False), (payload[:60], got, body)
        assert fragment in body["error"], body
        assert decisions(advisor(bot)) == before, payload[:60]

    code, body = post(bot, {"action": "ai_regime_override"})
    assert code == 200 and body["ok"] is True and body["clamped"] is True and body["saved"] is True
    assert "recommended tier 2" in body["message"]
    block = advisor(bot)  # the published status shows the action at once, not a cycle later
    assert block["override"]["active"] is True and block["override"]["tier"] == 1
    assert block["_effective"] == {"tier": 1, "direction": "long_bias", "source": "ai_override"}
    assert block["history"][0]["action"] == "applied"
    code, status = bot.get_json("/api/status")
    assert status["regime_tier"]["mechanical"]["tier"] == 0  # still computed and shown

    code, body = post(bot, {"action": "ai_regime_override", "ttl_sec": 120})
    assert code == 200 and body["replaced_override"] is True
    block = advisor(bot)
    assert block["override"]["expires_at"] - block["override"]["applied_at"] == 120

    code, body = post(bot, {"action": "ai_regime_dismiss"})
    assert code == 409 and "use ai_regime_revert" in body["error"]
    code, body = post(bot, {"action": "ai_regime_revert"})
    assert code == 200 and body["ok"] is True
    block = advisor(bot)
    assert block["override"]["active"] is False and block["_effective"]["source"] == "mechanical"
    assert block["history"][0]["action"] == "reverted"
    assert post(bot, {"action": "ai_regime_revert"})[0] == 409

    code, body = post(bot, {"action": "ai_regime_dismiss"})
    assert code == 200 and body["ok"] is True
    block = advisor(bot)
    assert block["dismissed"] is True and block["history"][0]["action"] == "dismissed"
    code, body = post(bot, {"action": "ai_regime_override"})
    assert code == 409 and "dismissed" in body["error"]
    assert bot.terminate() == 0


def test_actions_need_the_token_when_one_is_set(tmp_path, bot_process, llm):
    bot = start(bot_process, tmp_path, llm, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bot.wait_status(lambda s: s["ai_regime_advisor"]["opinion"] is not None, headers=auth)
    before = decisions(advisor(bot, auth))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        code, body = post(bot, {"action": "ai_regime_override"}, headers)
        assert code == 401 and body["ok"] is False
        assert decisions(advisor(bot, auth)) == before
    code, body = post(bot, {"action": "ai_regime_override"}, auth)
    assert code == 200 and advisor(bot, auth)["override"]["active"] is True
    assert bot.terminate() == 0


def test_an_applied_override_survives_kill_9(tmp_path, bot_process, llm):
    bot = start(bot_process, tmp_path, llm)
    bot.wait_status(lambda s: s["ai_regime_advisor"]["opinion"] is not None)
    code, body = post(bot, {"action": "ai_regime_override", "ttl_sec": 3600})
    assert code == 200 and body["saved"] is True
    expires_at = body["override"]["expires_at"]
    bot.kill()  # right after the action: only the action's own save can have kept it

    again = start(bot_process, tmp_path, llm)
    block = advisor(again)
    assert block["override"]["active"] is True and block["override"]["expires_at"] == expires_at
    assert block["_effective"]["source"] == "ai_override"
    assert "AI override restored: tier 1 long_bias" in again.output
    assert again.terminate() == 0


def test_an_opinion_past_its_age_limit_is_refused_409_with_its_age(tmp_path, bot_process, llm):
    # 30 s is 1.5 wall seconds at --speed 20; the long debounce keeps a fresh opinion from arriving meanwhile
    env = advisor_env(llm, AI_OPINION_MAX_AGE_SEC="30", AI_REGIME_DEBOUNCE_SEC="3600")
    bot = bot_process(["--market", "sim", "--speed", "20", "--port", "0", "--db", str(tmp_path / "a.sqlite3")], env=env)
    bot.wait_ready()
    status = bot.wait_status(lambda s: (s["ai_regime_advisor"]["opinion"] or {}).get("stale") is True)
    block = status["ai_regime_advisor"]
    assert block["opinion_max_age_sec"] == 30 and block["opinion"]["applicable"] is False
    assert block["opinion"]["age_sec"] > 30 and block["opinion"]["stale_in_sec"] == 0
    assert block["opinion"]["headline"] == "AI disagrees: it would raise the tier"
    before = decisions(advisor(bot))
    code, body = post(bot, {"action": "ai_regime_override"})
    assert code == 409 and body["ok"] is False
    assert re.fullmatch(r"the opinion is [0-9.]+ s old \(limit 30 s\); wait for a fresh one", body["error"]), body
    assert decisions(advisor(bot)) == before  # refused: nothing changed
