import math
import re

import pytest
from conftest import ROOT
from dotenv import dotenv_values

from config import KEYS, Settings, describe, is_loopback, load_settings
from errors import ConfigError


def load(overrides=None, environ=None, env_file=None):
    return load_settings(overrides or {}, environ=environ or {}, env_file=env_file)


def test_defaults_match_the_spec():
    s = load()
    assert s == Settings()
    assert (s.HTTP_HOST, s.HTTP_PORT, s.DB_PATH) == ("127.0.0.1", 8080, "data/bot.sqlite3")
    assert s.KRAKEN_API_URL == "https://api.kraken.com"
    assert (s.HMM_OHLCV_SYNC_INTERVAL_SEC, s.HMM_SECONDARY_SYNC_INTERVAL_SEC, s.OHLCV_RETENTION_DAYS) == (60, 300, 14)
    assert (s.HMM_RECENT_CANDLES, s.HMM_SECONDARY_RECENT_CANDLES, s.HMM_CONFIDENCE_THRESHOLD) == (100, 50, 0.15)
    assert s.HMM_RETRAIN_INTERVAL_SEC == 86400
    assert (s.REGIME_TIER1_CONFIDENCE, s.REGIME_TIER2_CONFIDENCE) == (0.20, 0.50)
    assert (s.REGIME_TIER1_BIAS_FLOOR, s.REGIME_TIER2_BIAS_FLOOR) == (0.10, 0.25)
    assert (s.REGIME_HYSTERESIS, s.REGIME_MIN_DWELL_SEC) == (0.05, 300)


def test_precedence_flags_over_environment_over_dotenv_over_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("HMM_TRAINING_CANDLES=3000\nREGIME_MIN_DWELL_SEC=120\nHTTP_PORT=9000\n")
    s = load({"HTTP_PORT": "9100"}, {"REGIME_MIN_DWELL_SEC": "60", "HTTP_PORT": "9050"}, env_file)
    assert s.HMM_TRAINING_CANDLES == 3000  # .env
    assert s.REGIME_MIN_DWELL_SEC == 60  # environment beats .env
    assert s.HTTP_PORT == 9100  # flag beats both
    assert s.HMM_SECONDARY_TRAINING_CANDLES == 1440  # default


def test_bad_value_names_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load(environ={"HMM_TRAINING_CANDLES": "lots"})
    msg = str(err.value)
    assert "HMM_TRAINING_CANDLES='lots'" in msg
    assert "an integer from 50 to 200000" in msg


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load(environ={"REGIME_TIER1_CONFIDENCE": "1.5", "REGIME_DIRECTIONAL_ENABLED": "maybe", "LOG_LEVEL": "loud"})
    msg = str(err.value)
    assert "REGIME_TIER1_CONFIDENCE='1.5'" in msg and "a number from 0 to 1" in msg
    assert "REGIME_DIRECTIONAL_ENABLED='maybe'" in msg and "true or false" in msg
    assert "LOG_LEVEL='loud'" in msg and "DEBUG, INFO, WARNING, ERROR" in msg


def test_a_bad_value_never_falls_back_to_the_default():
    for bad in ("", "nan", "inf", "-1", "1e9"):
        with pytest.raises(ConfigError):
            load(environ={"LOOP_INTERVAL_SEC": bad})


def test_typo_in_dotenv_is_an_error_with_a_suggestion(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("HMM_TRAINING_CANDELS=3000\n")
    with pytest.raises(
        ConfigError, match=r"HMM_TRAINING_CANDELS .* is not a setting \(did you mean HMM_TRAINING_CANDLES\?\)"
    ):
        load(env_file=env_file)


def test_unknown_prefixed_environment_variable_is_warned(caplog):
    load(environ={"HMM_TRAINING_CANDELS": "3000", "UNRELATED_THING": "x"})
    assert "HMM_TRAINING_CANDELS is not a setting (did you mean HMM_TRAINING_CANDLES?)" in caplog.text
    assert "UNRELATED_THING" not in caplog.text


def test_parsing_of_types():
    s = load(
        environ={
            "HMM_DEEP_DECAY_ENABLED": "yes",
            "SIM_SPEED": "max",
            "LOG_LEVEL": "debug",
            "HMM_TRAINING_CANDLES": "4_000",
        }
    )
    assert s.HMM_DEEP_DECAY_ENABLED is True
    assert math.isinf(s.SIM_SPEED)
    assert s.LOG_LEVEL == "DEBUG"
    assert s.HMM_TRAINING_CANDLES == 4000
    with pytest.raises(ConfigError):
        load(environ={"HMM_TRAINING_CANDLES": "4000.5"})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"REGIME_TIER2_CONFIDENCE": "0.2"}, "REGIME_TIER2_CONFIDENCE=0.2 must be above REGIME_TIER1_CONFIDENCE=0.2"),
        ({"REGIME_TIER2_BIAS_FLOOR": "0.05"}, "REGIME_TIER2_BIAS_FLOOR=0.05 must be at least"),
        ({"REGIME_HYSTERESIS": "0.2"}, "REGIME_HYSTERESIS=0.2 must be below"),
        ({"HMM_TRAINING_CANDLES": "400"}, "HMM_TRAINING_CANDLES=400 must be at least HMM_MIN_TRAIN_SAMPLES=500"),
        ({"HMM_SECONDARY_TRAINING_CANDLES": "100"}, "HMM_SECONDARY_TRAINING_CANDLES=100 must be at least"),
        ({"CONSENSUS_1M_WEIGHT": "0", "CONSENSUS_15M_WEIGHT": "0"}, "cannot both be 0"),
        ({"KRAKEN_API_URL": "ftp://x"}, "KRAKEN_API_URL='ftp://x' is invalid"),
        ({"PAIR": "XDG/USD"}, "PAIR='XDG/USD' is invalid"),
    ],
)
def test_cross_field_checks(env, fragment):
    with pytest.raises(ConfigError) as err:
        load(environ=env)
    assert fragment in str(err.value)


def test_non_loopback_bind_requires_a_token():
    with pytest.raises(ConfigError, match=re.escape("HTTP_HOST='0.0.0.0' is not a loopback address: set API_TOKEN")):
        load(environ={"HTTP_HOST": "0.0.0.0"})
    assert load(environ={"HTTP_HOST": "0.0.0.0", "API_TOKEN": "t0ken"}).HTTP_HOST == "0.0.0.0"
    assert load(environ={"HTTP_HOST": "::1"}).HTTP_HOST == "::1"
    assert [
        is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]", "10.0.0.1", "example.com")
    ] == [
        True,
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_secrets_are_redacted_and_values_json_safe():
    s = load(environ={"API_TOKEN": "hunter2", "SIM_SPEED": "max"})
    red = s.redacted()
    assert red["API_TOKEN"] == "***"
    assert red["SIM_SPEED"] == "max"
    assert "hunter2" not in repr(red)
    assert load().redacted()["API_TOKEN"] == ""


def test_env_example_lists_every_key_with_a_comment_and_the_default():
    path = ROOT / ".env.example"
    values = dotenv_values(path)
    assert set(values) == set(KEYS)
    assert load(env_file=path) == Settings()  # the example is exactly the defaults
    lines = path.read_text().splitlines()
    for key in KEYS:
        i = next(n for n, line in enumerate(lines) if re.match(rf"{key}=", line))
        assert lines[i - 1].startswith("# ") and describe(key) in lines[i - 1]
