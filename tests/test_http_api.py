import contextlib
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
FILES = {"/": ("text/html; charset=utf-8", PAGE), "/dashboard.js": ("text/javascript; charset=utf-8", b"'use strict';")}


def make_ctx(token="", handlers=None, allowed_hosts=()):
    board = StatusBoard()
    return ApiContext(board, ActionRouter(handlers), FILES, token, lambda: heartbeat(board), allowed_hosts)


def heartbeat(board):
    """A stand-in health verdict (the real one is tested in test_health): ok once the loop has beaten."""
    beaten = board.last_cycle_age() is not None
    return {"ok": beaten, "reasons": [] if beaten else ["starting: no cycle has completed yet"]}


def call(ctx, method, path, body=b"", headers=None):
    h = {k.lower(): v for k, v in (headers or {}).items()}
    if method == "POST" and "content-length" not in h and body is not None:
        h["content-length"] = str(len(body))
    if method == "POST":
        h.setdefault("content-type", "application/json")
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
        raise ActionRefused("refused", "refused by a rail")

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
    as_json = {"content-type": "application/json"}
    resp = handle_request(ctx, "POST", "/api/action", as_json, lambda n: b"")
    assert resp.status == 411
    resp = handle_request(ctx, "POST", "/api/action", {**as_json, "content-length": "-3"}, lambda n: b"")
    assert resp.status == 400
    resp = handle_request(ctx, "POST", "/api/action", {**as_json, "transfer-encoding": "chunked"}, lambda n: b"")
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
        f"http://127.0.0.1:{port}/api/action",
        data=b"x" * 20000,
        method="POST",
        headers={"Authorization": "Bearer tok", "Content-Type": "application/json"},
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


# ---------------------------------------------------------------- only the operator's own client


def never_read(n):
    raise AssertionError("the body must not be read")


def test_the_control_api_takes_json_bodies_only():
    seen = []
    ctx = make_ctx(handlers={"ai_regime_override": lambda p: seen.append(p) or {}})
    body = b'{"action":"ai_regime_override"}'
    for content_type in (
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
    ):
        headers = {"content-length": str(len(body))}
        if content_type is not None:
            headers["content-type"] = content_type
        resp = handle_request(ctx, "POST", "/api/action", headers, never_read)
        assert resp.status == 415 and b"application/json" in resp.body, content_type
    assert seen == []  # refused before the body was read: nothing changed
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON ;charset=UTF-8"):
        assert call(ctx, "POST", "/api/action", body, {"Content-Type": content_type})[0] == 200
    assert len(seen) == 3


def test_requests_from_another_origin_are_refused():
    seen = []
    ctx = make_ctx(handlers={"ping": lambda p: seen.append(p) or {}})
    ctx.board.publish({"n": 1})
    own = {"Host": "127.0.0.1:8080"}
    body = b'{"action":"ping"}'
    refused = [
        {"Origin": "http://127.0.0.1:9999"},  # another port on this machine: same site, other origin
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # sandboxed frames, data: and file: pages
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ]
    for extra in refused:
        status, headers, payload = call(ctx, "POST", "/api/action", body, {**own, **extra})
        assert status == 403 and payload["ok"] is False, extra
        assert headers["X-Frame-Options"] == "DENY"
    assert seen == []
    assert call(ctx, "GET", "/api/status", headers={**own, "Origin": "http://evil.example"})[0] == 403
    allowed = [{}, {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}]
    for extra in allowed:
        assert call(ctx, "POST", "/api/action", body, {**own, **extra})[0] == 200, extra
    assert call(ctx, "GET", "/api/status", headers={**own, "Origin": "http://127.0.0.1:8080"})[0] == 200
    assert len(seen) == len(allowed)
    # The page itself and /healthz may be opened from anywhere (they change nothing).
    assert call(ctx, "GET", "/", headers={**own, "Origin": "http://evil.example"})[0] == 200


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:8080", "localhost", "LocalHost:80", "[::1]:8080", "[::1]", "10.1.2.3:8080",
     "bot.example.com", "BOT.example.com:443"],
)  # fmt: skip
def test_hosts_that_name_this_machine(host):
    ctx = make_ctx(allowed_hosts=("bot.example.com",))
    assert call(ctx, "GET", "/healthz", headers={"Host": host})[0] == 503  # allowed: the health verdict answers


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example", "bot.example.com.evil",
     "", ":8080", "[::1", "[::1]x", "[nonsense]:80", "::1", "127.0.0.1:http", "1.2.3.4.5"],
)  # fmt: skip
def test_other_hosts_are_refused_everywhere(host):
    ctx = make_ctx(allowed_hosts=("bot.example.com",))
    ctx.board.publish({"n": 1})
    for method, path in (("GET", "/"), ("GET", "/healthz"), ("GET", "/api/status"), ("POST", "/api/action")):
        status, headers, payload = call(ctx, method, path, b"{}", {"Host": host})
        assert status == 403 and "not allowed" in payload["error"], (method, path)
        assert headers["X-Frame-Options"] == "DENY"


def test_allowed_host_names_come_from_the_settings():
    from config import allowed_hosts, load_settings

    settings = load_settings(environ={"HTTP_ALLOWED_HOSTS": " Bot.Example.com, dash.lan ,"}, env_file=None)
    assert allowed_hosts(settings.HTTP_ALLOWED_HOSTS) == ("bot.example.com", "dash.lan")
    assert allowed_hosts("") == ()
    for bad in ("http://bot.example.com", "bot.example.com:8080", "bot/x", "a..b"):
        with pytest.raises(ConfigError, match="HTTP_ALLOWED_HOSTS"):
            load_settings(environ={"HTTP_ALLOWED_HOSTS": bad}, env_file=None)


def test_every_response_forbids_framing_and_sniffing():
    ctx = make_ctx(token="tok")
    answers = [
        call(ctx, "GET", "/"),
        call(ctx, "GET", "/dashboard.js"),
        call(ctx, "GET", "/healthz"),
        call(ctx, "GET", "/api/status"),  # 401
        call(ctx, "GET", "/nothing"),  # 404
        call(ctx, "PATCH", "/"),  # 405
        call(ctx, "GET", "/", headers={"Host": "evil.example"}),  # 403
        call(ctx, "POST", "/api/action", b"{", {"Authorization": "Bearer tok"}),  # 400
    ]
    for status, headers, _ in answers:
        assert headers["X-Frame-Options"] == "DENY", status
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], status
        assert headers["X-Content-Type-Options"] == "nosniff", status
    assert {status for status, _, _ in answers} == {200, 401, 404, 405, 403, 503, 400}


def test_json_the_parser_refuses_is_a_400_and_reaches_no_handler():
    seen = []
    ctx = make_ctx(handlers={"ping": lambda p: seen.append(p) or {}})
    bodies = {
        "deep nesting": b'{"action":"ping","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        "huge integer": b'{"action":"ping","n":' + b"9" * 5000 + b"}",
        "NaN": b'{"action":"ping","n":NaN}',
        "Infinity": b'{"action":"ping","n":Infinity}',
        "-Infinity": b'{"action":"ping","n":-Infinity}',
        "float overflow": b'{"action":"ping","n":1e999}',
    }
    for name, body in bodies.items():
        assert len(body) <= MAX_BODY_BYTES
        status, _, payload = call(ctx, "POST", "/api/action", body)
        assert status == 400 and "not JSON" in payload["error"], (name, payload)
    assert seen == []
    assert call(ctx, "POST", "/api/action", b'{"action":"ping","n":1.5e300}')[0] == 200


def test_healthz_answers_with_the_health_verdict():
    verdict = {"ok": False, "reasons": ["cycles are failing: 3 in a row"]}
    board = StatusBoard()
    ctx = ApiContext(board, ActionRouter(), FILES, "tok", lambda: verdict)
    status, _, payload = call(ctx, "GET", "/healthz")
    assert (status, payload) == (503, verdict)  # no token needed
    assert call(ctx, "HEAD", "/healthz")[0] == 503
    verdict = {"ok": True, "reasons": []}
    assert call(ctx, "GET", "/healthz")[:3:2] == (200, verdict)
    assert call(ctx, "HEAD", "/healthz")[0] == 200


def test_unknown_methods_get_a_json_405_with_allow():
    ctx = make_ctx()
    ctx.board.publish({"n": 1})
    for method in ("PATCH", "OPTIONS", "PUT", "DELETE", "TRACE", "BREW"):
        for path, allow in (("/", "GET, HEAD"), ("/api/status", "GET, HEAD"), ("/api/action", "POST")):
            status, headers, payload = call(ctx, method, path)
            assert (status, headers["Allow"], payload["ok"]) == (405, allow, False), (method, path)
    assert call(ctx, "HEAD", "/api/status")[0] == 200


def test_the_dashboard_files_run_under_a_policy_without_inline_code():
    import re

    import dashboard

    ctx = ApiContext(StatusBoard(), ActionRouter(), dashboard.assets(), "", lambda: {"ok": True})
    page = handle_request(ctx, "GET", "/", {}, never_read)
    csp = dict(page.headers)["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    html = page.body.decode()
    assert '<script src="/dashboard.js"></script>' in html and '<link rel="stylesheet" href="/dashboard.css">' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html) and "javascript:" not in html
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        resp = handle_request(ctx, "GET", path, {}, never_read)
        assert resp.status == 200 and dict(resp.headers)["Content-Type"].startswith(kind)
        assert dict(resp.headers)["X-Content-Type-Options"] == "nosniff" and len(resp.body) > 1000
    js = handle_request(ctx, "GET", "/dashboard.js", {}, never_read).body.decode()
    assert not re.search(r"setAttribute\(\s*['\"](style|on[a-z]+)['\"]", js)
    assert "innerHTML" not in js and "cssText" not in js and "eval(" not in js


# ---------------------------------------------------------------- a bounded server on real sockets


@contextlib.contextmanager
def serving(ctx=None, **limits):
    ctx = ctx or make_ctx()
    if ctx.board.status_json() is None:
        ctx.board.publish({"n": 1, "pad": "x" * 6000})
    server = ApiServer("127.0.0.1", 0, ctx, **limits)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def read_response(sock, head_only=False):
    """(status, lower-case headers, body) of one response on ``sock``; (None, {}, b"") when closed at once."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            assert buf == b"", buf
            return None, {}, b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length
    return int(lines[0].split()[1]), headers, body


def exchange(port, data, head_only=False):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return read_response(sock, head_only)


def assert_json_error(answer, status):
    code, headers, body = answer
    assert code == status, (code, body)
    assert headers["content-type"].startswith("application/json")
    assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert json.loads(body)["ok"] is False
    return json.loads(body)["error"]


def test_requests_the_parser_refuses_get_json_errors(caplog):
    with serving() as server:
        port = server.port
        assert_json_error(exchange(port, b"GARBAGE\r\n\r\n"), 400)
        assert_json_error(exchange(port, b"GET / HTTP/1.1 extra\r\n\r\n"), 400)
        assert_json_error(exchange(port, b"GET /\r\n\r\n"), 400)  # HTTP/0.9
        assert_json_error(exchange(port, b"GET / HTTP/2.0\r\n\r\n"), 505)
        assert_json_error(exchange(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"), 414)
        assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"), 431)
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(120))
        assert_json_error(exchange(port, b"GET / HTTP/1.1\r\n" + many + b"\r\n"), 431)
        code, headers, _ = exchange(port, b"PATCH /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert_json_error((code, headers, _), 405) and headers["allow"] == "GET, HEAD"
        assert "not allowed" in assert_json_error(exchange(port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"), 403)
    assert "Traceback" not in caplog.text


def test_head_answers_like_get_without_the_body():
    with serving() as server, socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for path in ("/", "/api/status", "/healthz"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            got = read_response(sock)
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = read_response(sock, head_only=True)
            assert head[0] == got[0] and head[2] == b""
            same = ("content-type", "content-length", "content-security-policy", "x-frame-options")
            assert {k: head[1][k] for k in same} == {k: got[1][k] for k in same}
        # Had HEAD sent a body, this answer would start with its bytes.
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_each_keep_alive_response_is_written_whole():
    """One write per response on a TCP_NODELAY socket: no response waits on Nagle and a delayed ACK.

    A response written in two pieces arrives with only its head ready (the body held back
    for the client's ACK); written whole, it is all there as soon as the socket turns readable.
    """
    import select

    with serving() as server, socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        expected = server.ctx.board.status_json()
        for _ in range(20):
            sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert select.select([sock], [], [], 5)[0]
            data = sock.recv(1 << 20)
            assert data.endswith(b"\r\n\r\n" + expected) and data.startswith(b"HTTP/1.1 200 OK\r\n")


def test_slow_or_silent_clients_are_let_go(caplog, capfd):
    import logging
    import select

    with (
        caplog.at_level(logging.INFO, logger="http_api"),
        serving(request_timeout_sec=0.3, idle_timeout_sec=0.3) as server,
    ):
        port = server.port
        # A body shorter than its Content-Length.
        head = b"POST /api/action HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        assert "0.3s" in assert_json_error(exchange(port, head + b'Content-Length: 100\r\n\r\n{"act'), 408)
        # Headers dribbled a line at a time, each well within a per-read timeout: the whole request is bounded.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /api/status HTTP/1.1\r\n")
            sent = 0
            while not select.select([sock], [], [], 0.02)[0]:
                sock.sendall(b"X-Drip: %d\r\n" % sent)
                sent += 1
                assert sent < 500, "the dribbled request was never cut off"
            assert_json_error(read_response(sock), 408)
        # A connection that sends nothing, and a kept-alive one that goes idle, are closed without an answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            assert silent.recv(100) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(idle)[0] == 503
            assert idle.recv(100) == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text + capfd.readouterr().err
    assert sum("408" in r.message for r in caplog.records) == 2


def test_connections_beyond_the_cap_get_an_immediate_503(caplog):
    import select

    before = set(threading.enumerate())  # other tests' servers may still be winding down

    def handler_threads():
        return [t for t in threading.enumerate() if "process_request_thread" in t.name and t not in before]

    with serving(max_connections=8, request_timeout_sec=1.0) as server:
        port = server.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        try:
            answered = []
            while len(answered) < 12:
                ready, _, _ = select.select([s for s in held if s not in answered], [], [], 5)
                assert ready, f"only {len(answered)} connections were refused"
                for sock in ready:
                    code, headers, body = read_response(sock)
                    assert code == 503 and headers["connection"] == "close" and b"limit 8" in body
                    answered.append(sock)
            assert len(handler_threads()) == 8  # no thread per refused connection
            # A client now is refused at once rather than left hanging ...
            assert_json_error(exchange(port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), 503)
            # ... and once the idle ones reach their deadline, they are dropped and status answers.
            for sock in held:
                if sock not in answered:
                    assert sock.recv(100) == b""
            code, _, body = exchange(port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (code, body) == (200, server.ctx.board.status_json())
        finally:
            for sock in held:
                sock.close()


EMFILE_SERVER = """
import logging, resource, sys
from http_api import ActionRouter, ApiContext, ApiServer, StatusBoard

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
board = StatusBoard()
board.publish({"n": 1})
ctx = ApiContext(board, ActionRouter(), {}, "", lambda: {"ok": True})
server = ApiServer("127.0.0.1", 0, ctx, max_connections=1000, request_timeout_sec=float(sys.argv[1]))
port = server.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(port, flush=True)
sys.stdin.read()  # serve until the test closes stdin
server.stop()
"""


def cpu_seconds(pid):
    import os
    from pathlib import Path

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_file_descriptors_the_server_backs_off_and_recovers():
    """With RLIMIT_NOFILE low, held connections exhaust the server's descriptors: accept() fails with
    EMFILE. The failure is logged once, the accept loop waits instead of spinning, and once the held
    connections reach their deadline the server accepts again and /api/status answers."""
    import queue
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, "1.5", "32"],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    seen = []

    def wait_for(fragment):
        while not any(fragment in line for line in seen):
            seen.append(lines.get(timeout=10))

    held = []
    try:
        port = int(proc.stdout.readline())
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]  # > 32 descriptors
        wait_for("cannot accept connections")
        assert "Too many open files" in seen[-1]
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        # Hold until the server drops the connections it accepted (their request deadline).
        assert select.select(held, [], [], 10)[0]
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        assert t1 - t0 > 0.5
        assert cpu1 - cpu0 < 0.5 * (t1 - t0), f"{cpu1 - cpu0:.2f}s of CPU in {t1 - t0:.2f}s: the accept loop spun"
        for sock in held:
            sock.close()
        wait_for("accepting connections again")
        code, _, body = exchange(port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (code, body) == (200, b'{"n":1}')
    finally:
        for sock in held:
            sock.close()
        proc.stdin.close()
        proc.wait(timeout=10)
        reader.join(timeout=5)
    while not lines.empty():
        seen.append(lines.get())
    assert proc.returncode == 0, seen
    assert sum("cannot accept connections" in line for line in seen) == 1, seen
    assert sum("accepting connections again" in line for line in seen) == 1, seen
    assert not any("Traceback" in line or line.startswith("ERROR") for line in seen), seen
