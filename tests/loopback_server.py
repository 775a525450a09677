"""A test HTTP server on 127.0.0.1 in a daemon thread, for the fake Kraken and PostgREST servers.

It binds a free port on the first start and the same port on later ones, so
a fake can go down and come back (an outage). Stopping also closes the
kept-alive connections idling in their handler threads, so a client sees the
outage at once. A client that goes away mid-request is logged at debug level.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # comes back on the same port while old connections sit in TIME_WAIT

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self.name = name
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("%s: error while serving %s", self.name, client_address, exc_info=True)


class LoopbackServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self.handler, self.name = handler, name
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def drop_connections(self) -> int:
        """Close every open connection and go on serving, as a server or proxy does with idle
        keep-alive connections; returns how many there were."""
        return 0 if self._server is None else _close_connections(self._server)

    def start(self) -> str:
        """Serve (again); the first start picks a free port, later ones reuse it."""
        if self._server is None:
            self._server = _Server(self.port, self.handler, self.name)
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        _close_connections(server)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


def _close_connections(server: _Server) -> int:
    with server.sockets_lock:
        open_sockets = list(server.open_sockets)
    for sock in open_sockets:  # ends keep-alive connections idling in their threads
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    return len(open_sockets)
