"""HTTP server: dashboard, status, health and the action router (SPEC section 10).

Request handling is a pure function, :func:`handle_request`, from method,
path, headers and body to status, headers and body. The
``BaseHTTPRequestHandler`` is a thin adapter bound to its dependencies by
:func:`make_handler`; the server runs in a daemon thread and
:class:`ApiServer` is the handle that stops it. Handlers only read the
published :class:`StatusBoard` and never wait on the main loop.

Only the operator's own client can drive the control API:

- the ``Host`` header must name this machine (``localhost``, an IP literal,
  or a name in ``HTTP_ALLOWED_HOSTS``), so a DNS-rebound name is refused;
- ``/api/*`` refuses a request whose ``Origin`` is not the page's own, and a
  POST that the browser marks cross-site or same-site (another port);
- ``POST /api/action`` takes ``Content-Type: application/json`` only, which
  a cross-origin form or ``no-cors`` fetch cannot send;
- no response may be framed, and the page runs only its own script and
  style files (no inline code).

The server is bounded: at most ``max_connections`` connections are served
at once (the next ones get an immediate 503), one request (head and body)
must arrive within ``request_timeout_sec`` (else 408), an idle kept-alive
connection is closed after ``idle_timeout_sec``, and a failing ``accept``
(out of file descriptors) backs off instead of spinning. Every answer,
errors included, is JSON except the dashboard's own files, and each
response is written with one ``sendall`` on a ``TCP_NODELAY`` socket.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import ipaddress
import json
import logging
import math
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from errors import MALFORMED, REFUSED, ActionRefused, ConfigError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
JSON_TYPE = "application/json; charset=utf-8"
# Every response, whatever it is: never framed, never content-sniffed, no referrer leaks.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
BASE_CSP = "default-src 'none'; frame-ancestors 'none'"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_ALIASES = {"/index.html": "/"}
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_REQUEST_TIMEOUT_SEC = 10.0
DEFAULT_IDLE_TIMEOUT_SEC = 30.0
LISTEN_BACKLOG = 128
# accept() failures that mean "out of a resource for now": back off rather than retry at once.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_SEC = (0.1, 1.0)
REJECTED_LINGER_SEC = 2.0
MAX_REJECTED_LINGERING = 256


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


# The one place a refused action gets its HTTP status.
REFUSAL_STATUS = {MALFORMED: 400, REFUSED: 409}


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
            raise ActionRefused(MALFORMED, "the body must be a JSON object")
        name = payload.get("action")
        if not isinstance(name, str):
            raise ActionRefused(MALFORMED, "'action' must be a string")
        handler = self._handlers.get(name)
        if handler is None:
            known = ", ".join(self.actions) or "none yet"
            raise ActionRefused(MALFORMED, f"unknown action {name!r} (known: {known})")
        return {"ok": True, **handler(payload)}


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _response(
    status: int, content_type: str, body: bytes, extra: tuple[tuple[str, str], ...] = (), csp: str = BASE_CSP
) -> Response:
    headers = (
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", csp),
        *SECURITY_HEADERS,
        *extra,
    )
    return Response(status, headers, body)


def json_response(status: int, payload: Mapping[str, Any], extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return _response(status, JSON_TYPE, json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(), extra)


def error_response(status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"ok": False, "error": message}, extra)


def encode_response(resp: Response, *, head_only: bool = False, close: bool = False, date: str = "") -> bytes:
    """The whole response as the bytes of one write (status line, headers, body unless ``head_only``)."""
    try:
        reason = HTTPStatus(resp.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {resp.status} {reason}", "Server: regime-grid-bot"]
    if date:
        lines.append(f"Date: {date}")
    lines += [f"{name}: {value}" for name, value in resp.headers]
    lines.append(f"Content-Length: {len(resp.body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


@dataclass(frozen=True)
class ApiContext:
    """What :func:`handle_request` answers from.

    ``files`` maps a path to ``(content type, bytes)`` (the dashboard's page,
    script and style); ``health`` returns a JSON-ready dict with a bool
    ``"ok"`` for ``/healthz``; ``allowed_hosts`` are the names besides
    ``localhost`` and IP literals that the ``Host`` header may carry.
    """

    board: StatusBoard
    router: ActionRouter
    files: Mapping[str, tuple[str, bytes]]
    token: str
    health: Callable[[], dict[str, Any]]
    allowed_hosts: Collection[str] = ()


def _authorised(headers: Mapping[str, str], token: str) -> bool:
    if not token:
        return True
    supplied = headers.get("authorization", "")
    scheme, _, value = supplied.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token.encode())


def host_allowed(host_header: str, allowed_hosts: Collection[str]) -> bool:
    """Whether a ``Host`` header names this machine rather than some (possibly DNS-rebound) name.

    ``localhost``, IPv4 literals and bracketed IPv6 literals always pass (a
    browser sends the literal only when it connects to that very address);
    other names only when listed (case-insensitive). An optional ``:port``
    must be digits.
    """
    host = host_header.strip()
    if host.startswith("["):
        literal, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return True
    name, sep, port = host.rpartition(":") if ":" in host else (host, "", "")
    if sep and not port.isdigit():
        return False
    name = name.lower()
    if not name:
        return False
    if name == "localhost" or name in {h.lower() for h in allowed_hosts}:
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _foreign_origin(method: str, headers: Mapping[str, str]) -> str | None:
    """Why a request looks sent by another site's page (``None``: it does not)."""
    origin = headers.get("origin")
    host = headers.get("host", "")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        return f"requests from origin {origin!r} are not allowed"
    site = headers.get("sec-fetch-site", "").lower()
    if method == "POST" and site in ("cross-site", "same-site"):
        return f"{site} requests are not allowed"
    return None


def _allow(*methods: str) -> tuple[tuple[str, str], ...]:
    return (("Allow", ", ".join(methods)),)


def handle_request(
    ctx: ApiContext,
    method: str,
    path: str,
    headers: Mapping[str, str],
    read_body: Callable[[int], bytes],
) -> Response:
    """Answer one request. ``headers`` keys are lower-case; ``read_body(n)`` reads n bytes.

    HEAD is answered as GET (the adapter leaves out the body).
    """
    route = path.split("?", 1)[0]
    if "host" in headers and not host_allowed(headers["host"], ctx.allowed_hosts):
        return error_response(403, f"Host {headers['host']!r} not allowed (add it to HTTP_ALLOWED_HOSTS)")
    get = "GET" if method == "HEAD" else method
    route = PAGE_ALIASES.get(route, route)
    if route in ctx.files:
        if get != "GET":
            return error_response(405, "use GET", _allow("GET", "HEAD"))
        content_type, body = ctx.files[route]
        return _response(200, content_type, body, csp=PAGE_CSP if content_type.startswith("text/html") else BASE_CSP)
    if route == "/healthz":
        if get != "GET":
            return error_response(405, "use GET", _allow("GET", "HEAD"))
        verdict = ctx.health()
        return json_response(200 if verdict.get("ok") is True else 503, verdict)
    if not route.startswith("/api/"):
        return error_response(404, f"no such path: {route}")
    refusal = _foreign_origin(method, headers)
    if refusal is not None:
        return error_response(403, refusal)
    if not _authorised(headers, ctx.token):
        return error_response(401, "missing or wrong bearer token", (("WWW-Authenticate", "Bearer"),))
    if route == "/api/status":
        if get != "GET":
            return error_response(405, "use GET", _allow("GET", "HEAD"))
        body = ctx.board.status_json()
        if body is None:
            return error_response(503, "starting: no status published yet")
        return _response(200, JSON_TYPE, body)
    if route == "/api/action":
        if method != "POST":
            return error_response(405, "use POST", _allow("POST"))
        return _handle_action(ctx, headers, read_body)
    return error_response(404, f"no such path: {route}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_json_body(raw: bytes) -> Any:
    """The JSON value in ``raw``; ``ValueError`` for anything the parser refuses.

    That includes undecodable bytes, NaN/Infinity and numbers that overflow to
    them, integers beyond Python's digit limit, and nesting too deep to parse.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _handle_action(ctx: ApiContext, headers: Mapping[str, str], read_body: Callable[[int], bytes]) -> Response:
    # Before the body is read: a cross-site form or no-cors fetch can only send "simple" content types.
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        return error_response(415, "send the body as Content-Type: application/json")
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
        payload = parse_json_body(raw)
    except ValueError as exc:
        return error_response(400, f"the body is not JSON: {exc}")
    try:
        return json_response(200, ctx.router.dispatch(payload))
    except ActionRefused as exc:
        return error_response(REFUSAL_STATUS[exc.kind], str(exc))


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with ``TimeoutError`` once ``deadline`` (monotonic) has passed.

    A per-read timeout alone lets a client dribble a byte at a time forever;
    this bounds the whole request.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(None if math.isinf(remaining) else remaining)
        return self._sock.recv_into(buffer)


def make_handler(
    ctx: ApiContext,
    request_timeout_sec: float = DEFAULT_REQUEST_TIMEOUT_SEC,
    idle_timeout_sec: float = DEFAULT_IDLE_TIMEOUT_SEC,
) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to ``ctx`` and the time limits (no module globals)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "regime-grid-bot"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # replaced by one that keeps the request deadline
            self._reader = _DeadlineReader(self.connection)
            self._reader.deadline = time.monotonic() + request_timeout_sec
            self.rfile = io.BufferedReader(self._reader)
            self._served = 0

        def handle_one_request(self) -> None:
            self.close_connection = True
            self.command, self.requestline = None, ""
            if self._served:  # kept alive: wait idle_timeout for the next request, then a fresh deadline
                self._reader.deadline = time.monotonic() + idle_timeout_sec
            try:
                if not self.rfile.peek(1):
                    return  # the client closed
            except TimeoutError:
                return  # nothing sent: drop the connection without an answer
            if self._served:
                self._reader.deadline = time.monotonic() + request_timeout_sec
            self._served += 1
            try:
                self.raw_requestline = self.rfile.readline(65537)
                if len(self.raw_requestline) > 65536:
                    self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                    return
                if not self.parse_request():
                    return
                if self.request_version == "HTTP/0.9":
                    self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
                    return
                self._serve(self.command)
            except TimeoutError:
                log.info("%s: request not complete within %gs (408)", self.address_string(), request_timeout_sec)
                self.close_connection = True
                self._send(error_response(408, f"the request did not arrive within {request_timeout_sec:g}s"))

        def _serve(self, method: str) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            keep = self.close_connection is False
            try:
                resp = handle_request(ctx, method, self.path, headers, self.rfile.read)
            except TimeoutError:
                raise
            except Exception:  # a bug must not kill the server thread
                log.exception("error handling %s %s", method, self.path)
                resp = error_response(500, "internal error")
            # A body we did not read (or a refused one) would be taken for the next request.
            if method not in ("GET", "HEAD") or "content-length" in headers or "transfer-encoding" in headers:
                keep = False
            if resp.status >= 400 and method not in ("GET", "HEAD"):
                detail = resp.body.decode("utf-8", "replace")
                log.info("%s %s %s refused: %d %s", self.address_string(), method, self.path, resp.status, detail)
            self.close_connection = not keep
            self._send(resp, head_only=method == "HEAD")

        def _send(self, resp: Response, head_only: bool = False) -> None:
            data = encode_response(resp, head_only=head_only, close=self.close_connection, date=formatdate(usegmt=True))
            self.log_request(resp.status, len(resp.body))
            try:
                self.connection.settimeout(request_timeout_sec)  # a client that does not read is let go
                self.connection.sendall(data)
            except OSError as exc:
                log.debug("%s: could not send the response: %s", self.address_string(), exc)
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The JSON form of every error the standard parser reports (bad request line, huge headers)."""
            self.close_connection = True
            self._send(error_response(int(code), message or HTTPStatus(code).phrase))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; see :class:`ApiServer`."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self.max_connections = max_connections
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        self.stopping = threading.Event()
        self._rejected: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self._accept_failures = 0
        self._backoff = ACCEPT_BACKOFF_SEC[0]
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            sock, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in ACCEPT_RESOURCE_ERRORS:
                if self._accept_failures == 0:
                    log.warning("cannot accept connections: %s; retrying with backoff until it clears", exc)
                self._accept_failures += 1
                self.stopping.wait(self._backoff)
                self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_SEC[1])
            raise
        if self._accept_failures:
            log.warning("accepting connections again (after %d failed attempts)", self._accept_failures)
            self._accept_failures, self._backoff = 0, ACCEPT_BACKOFF_SEC[0]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each response is one write: send it now
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            full = len(self.open_sockets) >= self.max_connections
            if not full:
                self.open_sockets.add(request)
        if full:
            self._reject(request)
            return
        super().process_request(request, client_address)

    def _reject(self, sock: socket.socket) -> None:
        """Answer 503 from the accept thread without blocking, then let the socket linger briefly.

        Closing with the client's request unread would reset the connection and
        could destroy the 503 before the client reads it.
        """
        resp = error_response(503, f"too many connections (limit {self.max_connections}); try again")
        data = encode_response(resp, close=True, date=formatdate(usegmt=True))
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            _drain(sock)
            sock.send(data)
            sock.shutdown(socket.SHUT_WR)
        self._rejected.append((time.monotonic() + REJECTED_LINGER_SEC, sock))
        log.debug("refused a connection: %d open (limit %d)", len(self.open_sockets), self.max_connections)
        self._close_rejected()

    def _close_rejected(self, everything: bool = False) -> None:
        """Close the refused sockets whose linger is over (the oldest at once beyond the bound)."""
        now = time.monotonic()
        while self._rejected and (
            everything or len(self._rejected) > MAX_REJECTED_LINGERING or self._rejected[0][0] <= now
        ):
            _, sock = self._rejected.popleft()
            with contextlib.suppress(OSError):
                _drain(sock)
            sock.close()

    def service_actions(self) -> None:
        self._close_rejected()

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

    def server_close(self) -> None:
        super().server_close()
        self._close_rejected(everything=True)


def _drain(sock: socket.socket) -> None:
    """Read and drop whatever has already arrived on a non-blocking socket."""
    with contextlib.suppress(BlockingIOError):
        while sock.recv(65536):
            pass


class ApiServer:
    """The HTTP server thread. ``start()`` binds and returns the bound port.

    ``max_connections`` bounds the connections served at once;
    ``request_timeout_sec`` the time one request (head and body) may take to
    arrive; ``idle_timeout_sec`` how long a kept-alive connection may wait
    for its next request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ctx: ApiContext,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        request_timeout_sec: float = DEFAULT_REQUEST_TIMEOUT_SEC,
        idle_timeout_sec: float = DEFAULT_IDLE_TIMEOUT_SEC,
    ) -> None:
        if max_connections < 1 or request_timeout_sec <= 0 or idle_timeout_sec <= 0:
            raise ValueError("max_connections and the timeouts must be positive")
        self.host, self.requested_port, self.ctx = host, port, ctx
        self.max_connections = max_connections
        self.request_timeout_sec = request_timeout_sec
        self.idle_timeout_sec = idle_timeout_sec
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        handler = make_handler(self.ctx, self.request_timeout_sec, self.idle_timeout_sec)

        class Server(_Server):
            address_family = family

        try:
            self._httpd = Server((self.host.strip("[]"), self.requested_port), handler, self.max_connections)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc} "
                "(choose another --port or --host)"
            ) from exc
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.stopping.set()
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
