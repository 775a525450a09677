import json
import math
import socket
import threading
import urllib.error
import urllib.request

import pytest

from errors import ConfigError
from http_api import (
    MAX_BODY_BYTES,
    ActionRefused,
    ActionRouter,
    ApiContext,
    ApiServer,
    StatusBoard,
    handle_request,
)

PAGE = b"<!doctype html><title>dash</title>"


class FakeMonotonic:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_ctx(token="", handlers=None, monotonic=None):
    board = StatusBoard(monotonic or FakeMonotonic())
    return ApiContext(board, ActionRouter(handlers), PAGE, token, 45.0)


def call(ctx, method, path, body=b"", headers=None):
    h = {k.lower(): v for k, v in (headers or {}).items()}
    if method == "POST" and "content-length" not in h and body is not None:
        h["content-length"] = str(len(body))
    resp = handle_request(ctx, method, path, h, lambda n: body[:n])
    payload = (
        json.loads(resp.body) if dict(resp.headers).get("Content-Type", "").startswith("application/json") else None
    )
    return resp.status, dict(resp.headers), payload


def test_dashboard_page_is_served_with_a_strict_policy():
    status, headers, _ = call(make_ctx(), "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    resp = handle_request(make_ctx(), "GET", "/", {}, lambda n: b"")
    assert resp.body == PAGE


def test_status_before_and_after_publication():
    ctx = make_ctx()
    assert call(ctx, "GET", "/api/status")[0] == 503
    ctx.board.publish({"mode": "sim", "price": 0.08})
    status, headers, payload = call(ctx, "GET", "/api/status")
    assert status == 200 and payload == {"mode": "sim", "price": 0.08}
    assert headers["Cache-Control"] == "no-store"


def test_publishing_a_non_json_status_keeps_the_previous_one():
    board = StatusBoard()
    board.publish({"a": 1})
    with pytest.raises(ValueError):
        board.publish({"a": math.inf})
    assert json.loads(board.status_json()) == {"a": 1}


def test_healthz_follows_the_main_loop_heartbeat():
    clock = FakeMonotonic()
    ctx = make_ctx(monotonic=clock)
    status, _, payload = call(ctx, "GET", "/healthz")
    assert status == 503 and payload["last_cycle_age_sec"] is None
    ctx.board.beat()
    clock.t += 44.0
    assert call(ctx, "GET", "/healthz")[0] == 200
    clock.t += 2.0
    status, _, payload = call(ctx, "GET", "/healthz")
    assert status == 503 and payload["last_cycle_age_sec"] == 46.0


def test_bearer_token_guards_every_api_path():
    ctx = make_ctx(token="s3cret")
    ctx.board.publish({"ok": 1})
    status, headers, payload = call(ctx, "GET", "/api/status")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and payload["ok"] is False
    assert call(ctx, "GET", "/api/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(ctx, "GET", "/api/status", headers={"Authorization": "Basic s3cret"})[0] == 401
    assert call(ctx, "GET", "/api/status", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert call(ctx, "POST", "/api/action", b'{"action":"x"}')[0] == 401
    assert call(ctx, "GET", "/api/nothing")[0] == 401  # no probing of paths without the token
    assert call(ctx, "GET", "/")[0] == 200 and call(ctx, "GET", "/healthz")[0] == 503  # not under /api/


def test_action_router_dispatch_and_errors():
    seen = []

    def ping(payload):
        seen.append(payload)
        return {"pong": payload.get("n")}

    def refuse(payload):
        raise ActionRefused(409, "refused by a rail")

    ctx = make_ctx(handlers={"ping": ping, "refuse": refuse})
    status, _, payload = call(ctx, "POST", "/api/action", b'{"action":"ping","n":3}')
    assert (status, payload) == (200, {"ok": True, "pong": 3})
    assert seen == [{"action": "ping", "n": 3}]
    status, _, payload = call(ctx, "POST", "/api/action", b'{"action":"refuse"}')
    assert (status, payload) == (409, {"ok": False, "error": "refused by a rail"})
    cases = [
        (b"not json", 400, "not JSON"),
        (b"[1,2]", 400, "JSON object"),
        (b'{"action": 5}', 400, "'action' must be a string"),
        (b'{"nothing": 1}', 400, "'action' must be a string"),
        (b'{"action": "launch"}', 400, "unknown action 'launch' (known: ping, refuse)"),
        (b"\xff\xfe", 400, "not JSON"),
    ]
    before = len(seen)
    for body, code, fragment in cases:
        status, _, payload = call(ctx, "POST", "/api/action", body)
        assert status == code and fragment in payload["error"], (body, payload)
    assert len(seen) == before  # a refused request reached no handler


def test_unknown_actions_are_rejected_when_none_are_registered():
    status, _, payload = call(make_ctx(), "POST", "/api/action", b'{"action":"ai_regime_override"}')
    assert status == 400 and "known: none yet" in payload["error"]


def test_body_size_and_length_rules():
    ctx = make_ctx(handlers={"ping": lambda p: {}})
    big = b'{"action":"ping","pad":"' + b"x" * MAX_BODY_BYTES + b'"}'
    status, _, payload = call(ctx, "POST", "/api/action", big)
    assert status == 413 and str(MAX_BODY_BYTES) in payload["error"]
    resp = handle_request(ctx, "POST", "/api/action", {}, lambda n: b"")
    assert resp.status == 411
    resp = handle_request(ctx, "POST", "/api/action", {"content-length": "-3"}, lambda n: b"")
    assert resp.status == 400
    resp = handle_request(ctx, "POST", "/api/action", {"transfer-encoding": "chunked"}, lambda n: b"")
    assert resp.status == 411


def test_methods_and_unknown_paths():
    ctx = make_ctx()
    assert call(ctx, "POST", "/api/status", b"{}")[0] == 405
    assert call(ctx, "GET", "/api/action")[0] == 405
    assert call(ctx, "DELETE", "/")[0] == 405
    assert call(ctx, "GET", "/etc/passwd")[0] == 404
    assert call(ctx, "GET", "/api/status?x=1")[0] == 503  # query strings are ignored


def _get(port, path, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_real_server_serves_concurrent_readers_and_stops():
    ctx = make_ctx(token="tok")
    ctx.board.publish({"n": 1})
    server = ApiServer("127.0.0.1", 0, ctx)
    port = server.start()
    results = []

    def reader():
        for _ in range(20):
            results.append(_get(port, "/api/status", {"Authorization": "Bearer tok"}))

    threads = [threading.Thread(target=reader) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 100 and all(r == (200, b'{"n":1}') for r in results)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/action", data=b"x" * 20000, method="POST", headers={"Authorization": "Bearer tok"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 413
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_port_in_use_is_a_clear_error():
    first = ApiServer("127.0.0.1", 0, make_ctx())
    port = first.start()
    try:
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}"):
            ApiServer("127.0.0.1", port, make_ctx()).start()
    finally:
        first.stop()


def test_stop_also_ends_kept_alive_connections():
    import http.client

    ctx = make_ctx()
    ctx.board.publish({"n": 1})
    server = ApiServer("127.0.0.1", 0, ctx)
    port = server.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/api/status")
    assert conn.getresponse().read() == b'{"n":1}'
    server.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/api/status")
        conn.getresponse().read()


def test_a_client_that_resets_its_connection_is_logged_quietly(capfd, caplog):
    import logging
    import struct
    import time

    server = ApiServer("127.0.0.1", 0, make_ctx())
    port = server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="http_api"):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /api/st")  # half a request line, then a reset (RST, not FIN)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any("went away" in r.message for r in caplog.records):
                time.sleep(0.01)
        assert any("went away" in r.message for r in caplog.records)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "Traceback" not in capfd.readouterr().err
    finally:
        server.stop()
