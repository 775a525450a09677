import dataclasses
import math
import re
import shutil
import subprocess

import pytest
from conftest import ROOT
from dotenv import dotenv_values

from config import KEYS, Settings, describe, is_loopback, load_settings
from errors import ConfigError

NUMERIC_KEYS = [f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float")]
FLOAT_KEYS = [f.name for f in dataclasses.fields(Settings) if f.type == "float"]
TOKEN = "0123456789abcdef"  # 16 characters: long enough off loopback


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
    assert load(environ={"HTTP_HOST": "0.0.0.0", "API_TOKEN": TOKEN}).HTTP_HOST == "0.0.0.0"
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


# ---------------------------------------------------------------- settings that refuse nonsense


def test_a_named_env_file_must_exist_but_the_default_may_be_absent(tmp_path):
    missing = tmp_path / "prod.env"
    with pytest.raises(ConfigError, match=re.escape(f"--env-file {missing} does not exist")):
        load_settings({}, environ={}, env_file=missing, env_file_required=True)
    with pytest.raises(ConfigError, match=re.escape(f"--env-file {tmp_path} is not a file")):
        load_settings({}, environ={}, env_file=tmp_path, env_file_required=True)
    assert load_settings({}, environ={}, env_file=missing) == Settings()  # the default .env: optional
    missing.write_text("HTTP_PORT=9000\n")
    assert load_settings({}, environ={}, env_file=missing, env_file_required=True).HTTP_PORT == 9000


def test_bot_py_stops_on_a_missing_env_file_and_starts_without_the_default_one(tmp_path, bot_process):
    p = bot_process(["--env-file", "nowhere.env"])
    assert p.proc.wait(30) == 2
    assert "bot.py: --env-file nowhere.env does not exist" in p.output
    # No .env in the working folder and none named: the settings load (and --live then asks for its keys).
    assert not (tmp_path / ".env").exists()
    p = bot_process(["--live"])
    assert p.proc.wait(30) == 2
    assert "--live needs KRAKEN_API_KEY and KRAKEN_API_SECRET" in p.output
    assert "env-file" not in p.output


@pytest.mark.parametrize("token", [" ", "\t", f" {TOKEN}", f"{TOKEN} ", f"{TOKEN}\n"])
def test_api_token_with_surrounding_whitespace_is_refused_not_trimmed(token):
    with pytest.raises(ConfigError) as err:
        load(environ={"API_TOKEN": token})
    msg = str(err.value)
    assert "API_TOKEN='***' is invalid: has leading or trailing whitespace" in msg
    assert TOKEN not in msg


def test_api_token_whitespace_in_a_quoted_dotenv_value_is_refused(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('API_TOKEN="   "\n')
    with pytest.raises(ConfigError, match="API_TOKEN='\\*\\*\\*' is invalid: has leading or trailing whitespace"):
        load(env_file=env_file)


def test_off_loopback_the_token_must_be_long_enough():
    with pytest.raises(ConfigError) as err:
        load(environ={"HTTP_HOST": "10.0.0.5", "API_TOKEN": TOKEN[:15]})
    assert "API_TOKEN is 15 characters: off loopback (HTTP_HOST='10.0.0.5') it needs at least 16" in str(err.value)
    assert TOKEN[:15] not in str(err.value)
    assert load(environ={"HTTP_HOST": "10.0.0.5", "API_TOKEN": TOKEN}).API_TOKEN == TOKEN
    # Loopback: no token, or a short one, is the operator's choice.
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert load(environ={"HTTP_HOST": host}).API_TOKEN == ""
        assert load(environ={"HTTP_HOST": host, "API_TOKEN": "short"}).API_TOKEN == "short"


def _digits(text: str, zero: str) -> str:
    return text.translate({ord(d): chr(ord(zero) + int(d)) for d in "0123456789"})


# Zeros of the Arabic-Indic, fullwidth, Persian and Devanagari digits
@pytest.mark.parametrize("zero", ["\u0660", "\uff10", "\u06f0", "\u0966"])
def test_every_numeric_setting_refuses_non_ascii_digits(zero):
    defaults = Settings()
    for key in NUMERIC_KEYS:
        ascii_text = str(getattr(defaults, key))
        assert load(environ={key: ascii_text}) == defaults, key  # the ASCII spelling is fine
        with pytest.raises(ConfigError, match=re.escape(f"{key}=")):
            load(environ={key: _digits(ascii_text, zero)})
    # 300 in superscripts, Arabic-Indic and fullwidth digits
    for text in ("\u00b3\u2070\u2070", "\u0663\u0660\u0660", "\uff13\uff10\uff10"):
        with pytest.raises(ConfigError, match=re.escape(f"HTTP_PORT={text!r} is invalid: expected an integer")):
            load(environ={"HTTP_PORT": text})


def test_every_numeric_setting_has_a_finite_range_and_floats_refuse_nan_and_inf():
    for key in NUMERIC_KEYS:
        meta = Settings.__dataclass_fields__[key].metadata
        assert meta["lo"] is not None and meta["hi"] is not None, key
        assert math.isfinite(meta["lo"]) and math.isfinite(meta["hi"]) and meta["lo"] <= meta["hi"], key
        with pytest.raises(ConfigError):
            load(environ={key: repr(meta["hi"] * 10 + 1)})
    for key in FLOAT_KEYS:
        for bad in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"):
            with pytest.raises(ConfigError, match=re.escape(f"{key}={bad!r} is invalid")):
                load(environ={key: bad})
    assert math.isinf(load(environ={"SIM_SPEED": "max"}).SIM_SPEED)  # the one word for "no waiting"


def test_dotenv_variants_are_git_ignored_but_the_example_is_not(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")

    def ignored(name: str) -> bool:
        (tmp_path / name).write_text("X=1\n")
        done = subprocess.run([git, "-C", str(tmp_path), "check-ignore", "-q", name], check=False)
        assert done.returncode in (0, 1), done
        return done.returncode == 0

    assert all(ignored(n) for n in (".env", ".env.local", ".env.prod", ".env.production.bak"))
    assert not ignored(".env.example")
    assert not ignored("config.py")


def test_redacted_masks_credentials_inside_urls():
    s = load(
        environ={
            "AI_BASE_URL": "https://alice:pa55word@llm.example/v1?key=abc123&mode=fast",
            "AI_MODEL": "m",
            "SUPABASE_URL": "https://proj.supabase.co?apikey=sb-secret-value",
            "SUPABASE_KEY": "service-role-key",
            "KRAKEN_API_URL": "https://user@api.kraken.com",
        }
    )
    red = s.redacted()
    assert red["AI_BASE_URL"] == "https://***@llm.example/v1?key=***&mode=fast"
    assert red["SUPABASE_URL"] == "https://proj.supabase.co?apikey=***"
    assert red["KRAKEN_API_URL"] == "https://***@api.kraken.com"
    assert red["SUPABASE_KEY"] == "***"
    text = repr(red)
    for secret in ("pa55word", "abc123", "sb-secret-value", "service-role-key", "alice"):
        assert secret not in text
    assert set(s.secret_values()) == {"service-role-key"}
    assert red["GROQ_BASE_URL"] == "https://api.groq.com/openai/v1"  # a URL without credentials is unchanged


def test_a_refused_url_is_shown_without_its_credentials():
    with pytest.raises(ConfigError) as err:
        load(environ={"AI_BASE_URL": "ftp://bob:hunter2hunter2@host/v1", "AI_MODEL": "m"})
    assert "AI_BASE_URL='ftp://***@host/v1' is invalid" in str(err.value)
    assert "hunter2" not in str(err.value)
