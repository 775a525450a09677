"""Secrets kept out of error texts: the pure scrubber, and the adapters that use it against servers that echo keys."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from loopback_server import LoopbackServer

from errors import BadData, ConfigError
from kraken.private_client import KrakenPrivateClient, NonceSource, result_of
from redaction import mask_url, scrub
from store.supabase import SupabaseStore

KEY = "sk-live-0a1b2c3d4e5f6a7b8c9d"
SECRET = base64.b64encode(b"kraken-private-secret-bytes-0123456789").decode()


# ---------------------------------------------------------------- the pure functions


def test_scrub_masks_each_secret_value_and_its_url_encoded_form():
    text = f"key {KEY} rejected; body nonce=1&key={KEY}; secret {SECRET} (url form {SECRET.replace('=', '%3D')})"
    assert scrub(text, [KEY, SECRET, ""]) == "key *** rejected; body nonce=1&key=***; secret *** (url form ***)"


def test_scrub_masks_the_longest_secret_first_and_ignores_trivially_short_ones():
    assert scrub("token abcdefgh-and-more", ["abcdefgh", "abcdefgh-and-more"]) == "token ***"
    assert scrub("a b c", ["a", "", "b"]) == "a b c"  # a one-letter "secret" would mangle every text


def test_scrub_masks_bearer_tokens_and_url_credentials_it_was_not_told_about():
    text = (
        "401 from https://bob:hunter2@llm.example/v1/chat?api_key=zzz&model=m "
        "(Authorization: Bearer eyJhbGciOi.J9.abc-_/+=) and BEARER other"
    )
    assert scrub(text, []) == (
        "401 from https://***@llm.example/v1/chat?api_key=***&model=m (Authorization: Bearer ***) and BEARER ***"
    )
    assert scrub("nothing secret here: pair=XDGUSD&interval=1", [KEY]) == "nothing secret here: pair=XDGUSD&interval=1"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://user:pass@host/v1", "https://***@host/v1"),
        ("http://token@127.0.0.1:11434/v1", "http://***@127.0.0.1:11434/v1"),
        ("https://host/v1?key=abc", "https://host/v1?key=***"),
        ("https://host/v1?a=1&access_token=t&b=2", "https://host/v1?a=1&access_token=***&b=2"),
        ("https://host/v1?Password=p#frag", "https://host/v1?Password=***#frag"),
        ("https://api.kraken.com", "https://api.kraken.com"),
        ("", ""),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


# ---------------------------------------------------------------- adapters against servers that echo the key


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with an error quoting the credentials it was sent, as careless services do."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/rest/v1/"):  # PostgREST
            status = 401
            body = {"code": "PGRST301", "message": f"bad key {self.headers.get('apikey')}", "details": None}
        else:  # Kraken's private API answers 200 with an error array
            status = 200
            body = {"error": [f"EAPI:Invalid key {self.headers.get('API-Key')} for secret {SECRET}"], "result": {}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()


@pytest.fixture
def echo() -> Iterator[LoopbackServer]:
    server = LoopbackServer(EchoHandler, "echo")
    server.start()
    yield server
    server.stop()


def test_supabase_errors_do_not_repeat_the_key(echo):
    store = SupabaseStore(echo.url, KEY, timeout=2.0)
    try:
        with pytest.raises(ConfigError) as err:
            store.load_state("k")
    finally:
        store.close()
    assert "Supabase answered 401 PGRST301: bad key ***" in str(err.value)
    assert KEY not in str(err.value)


def test_kraken_private_errors_do_not_repeat_the_key_or_the_secret(echo):
    client = KrakenPrivateClient(echo.url, KEY, SECRET, nonce=NonceSource(), sleep=lambda s: None)
    with pytest.raises(BadData) as err:
        client.balance()
    assert str(err.value) == "Kraken: EAPI:Invalid key *** for secret ***"
    payload = {"error": [f"EGeneral:Invalid arguments {KEY}"]}
    with pytest.raises(BadData, match=r"^Kraken: EGeneral:Invalid arguments \*\*\*$"):
        result_of(payload, "Balance", (KEY,))
