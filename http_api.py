"""HTTP server: dashboard, status, health and the action router (SPEC section 10).

Request handling is a pure function, :func:`handle_request`, from method,
path, headers and body to status, headers and body. The
``BaseHTTPRequestHandler`` is a thin adapter bound to its dependencies by
:func:`make_handler`; the server runs in a daemon thread and
:class:`ApiServer` is the handle that stops it. Handlers only read the
published :class:`StatusBoard` and never wait on the main loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from errors import ActionRefused, ConfigError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


class StatusBoard:
    """The latest published status, shared between the main loop and the server.

    The main loop publishes a finished dict (never mutated afterwards) and its
    JSON encoding is made right then, so a reader only copies bytes.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None
        self._json: bytes | None = None
        self._monotonic = monotonic
        self._last_beat: float | None = None

    def publish(self, status: dict[str, Any]) -> None:
        """Make ``status`` the current one; raises ``ValueError`` (keeping the old) if it is not JSON-safe."""
        body = json.dumps(status, separators=(",", ":"), allow_nan=False).encode()
        with self._lock:
            self._status, self._json = status, body

    def status(self) -> dict[str, Any] | None:
        with self._lock:
            return self._status

    def status_json(self) -> bytes | None:
        with self._lock:
            return self._json

    def beat(self) -> None:
        """Mark that the main loop completed a cycle."""
        with self._lock:
            self._last_beat = self._monotonic()

    def last_cycle_age(self) -> float | None:
        with self._lock:
            return None if self._last_beat is None else self._monotonic() - self._last_beat


ActionHandler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class ActionRouter:
    """Maps ``{"action": NAME}`` to the public bot method registered for NAME."""

    def __init__(self, handlers: Mapping[str, ActionHandler] | None = None) -> None:
        self._handlers: dict[str, ActionHandler] = dict(handlers or {})

    def register(self, name: str, handler: ActionHandler) -> None:
        self._handlers[name] = handler

    @property
    def actions(self) -> list[str]:
        return sorted(self._handlers)

    def dispatch(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise ActionRefused(400, "the body must be a JSON object")
        name = payload.get("action")
        if not isinstance(name, str):
            raise ActionRefused(400, "'action' must be a string")
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(self.actions) or "none yet"
            raise ActionRefused(400, f"unknown action {name!r} (known: {known})")
        return {"ok": True, **handler(payload)}


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def json_response(status: int, payload: Mapping[str, Any], extra: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, (("Content-Type", JSON_TYPE), ("Cache-Control", "no-store"), *extra), body)


def error_response(status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"ok": False, "error": message}, extra)


@dataclass(frozen=True)
class ApiContext:
    board: StatusBoard
    router: ActionRouter
    page: bytes
    token: str
    healthz_max_age_sec: float


def _authorised(headers: Mapping[str, str], token: str) -> bool:
    if not token:
        return True
    supplied = headers.get("authorization", "")
    scheme, _, value = supplied.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token.encode())


def handle_request(
    ctx: ApiContext,
    method: str,
    path: str,
    headers: Mapping[str, str],
    read_body: Callable[[int], bytes],
) -> Response:
    """Answer one request. ``headers`` keys are lower-case; ``read_body(n)`` reads n bytes."""
    route = path.split("?", 1)[0]
    if route in ("/", "/index.html"):
        if method != "GET":
            return error_response(405, "use GET", (("Allow", "GET"),))
        return Response(
            200,
            (
                ("Content-Type", HTML_TYPE),
                ("Cache-Control", "no-store"),
                ("Content-Security-Policy", PAGE_CSP),
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"),
            ),
            ctx.page,
        )
    if route == "/healthz":
        age = ctx.board.last_cycle_age()
        healthy = age is not None and age <= ctx.healthz_max_age_sec
        payload = {
            "ok": healthy,
            "last_cycle_age_sec": None if age is None else round(age, 3),
            "max_age_sec": ctx.healthz_max_age_sec,
        }
        return json_response(200 if healthy else 503, payload)
    if not route.startswith("/api/"):
        return error_response(404, f"no such path: {route}")
    if not _authorised(headers, ctx.token):
        return error_response(401, "missing or wrong bearer token", (("WWW-Authenticate", "Bearer"),))
    if route == "/api/status":
        if method != "GET":
            return error_response(405, "use GET", (("Allow", "GET"),))
        body = ctx.board.status_json()
        if body is None:
            return error_response(503, "starting: no status published yet")
        return Response(200, (("Content-Type", JSON_TYPE), ("Cache-Control", "no-store")), body)
    if route == "/api/action":
        if method != "POST":
            return error_response(405, "use POST", (("Allow", "POST"),))
        return _handle_action(ctx, headers, read_body)
    return error_response(404, f"no such path: {route}")


def _handle_action(ctx: ApiContext, headers: Mapping[str, str], read_body: Callable[[int], bytes]) -> Response:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return error_response(411, "send the body with a Content-Length")
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        return error_response(411, "a Content-Length header is required")
    if length < 0:
        return error_response(400, "bad Content-Length")
    if length > MAX_BODY_BYTES:
        return error_response(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    raw = read_body(length)
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error_response(400, f"the body is not JSON: {exc}")
    try:
        return json_response(200, ctx.router.dispatch(payload))
    except ActionRefused as exc:
        return error_response(exc.status, str(exc))


def make_handler(ctx: ApiContext) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``ctx`` (no module globals)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "regime-grid-bot"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = 15

        def _serve(self, method: str) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                resp = handle_request(ctx, method, self.path, headers, self.rfile.read)
            except Exception:  # a bug must not kill the server thread
                log.exception("error handling %s %s", method, self.path)
                resp = error_response(500, "internal error")
            if method != "GET":
                self.close_connection = True  # a refused request may leave its body unread
            self.send_response(resp.status)
            for name, value in resp.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(resp.body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(resp.body)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


class ApiServer:
    """The HTTP server thread. ``start()`` binds and returns the bound port."""

    def __init__(self, host: str, port: int, ctx: ApiContext) -> None:
        self.host, self.requested_port, self.ctx = host, port, ctx
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                self.open_sockets: set[socket.socket] = set()
                self.sockets_lock = threading.Lock()

            def process_request(self, request: Any, client_address: Any) -> None:
                with self.sockets_lock:
                    self.open_sockets.add(request)
                super().process_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A browser that goes away mid-request is routine; anything else is a bug worth a trace.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    log.debug("client %s went away", client_address)
                else:
                    log.exception("error while serving %s", client_address)

            def shutdown_request(self, request: Any) -> None:
                with self.sockets_lock:
                    self.open_sockets.discard(request)
                super().shutdown_request(request)

        try:
            self._httpd = Server((self.host.strip("[]"), self.requested_port), make_handler(self.ctx))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc} "
                "(choose another --port or --host)"
            ) from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            # Kept-alive connections would otherwise go on being served by their threads.
            with self._httpd.sockets_lock:
                for sock in list(self._httpd.open_sockets):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
