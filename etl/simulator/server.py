"""The HTTP/1.1 server on loopback: keep-alive connections, and replies written on the wire.

Answers come from :class:`~etl.simulator.api.GreenApi`; this module only puts them on the
socket, including the ones meant to fail: ``truncate`` (half the body with a matching
Content-Length, then close) and ``reset`` (half the body of a normal-looking answer, then a
TCP reset).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast

from etl.simulator.api import GreenApi, redact
from etl.simulator.replies import Reply, reason

# The package's name rather than this module's: one logger for the whole simulator.
_log = logging.getLogger("etl.simulator")

#: Request bodies up to this size are read (a POST's) or dropped; a larger one closes the
#: connection.
_MAX_DISCARD_BODY: Final = 1 << 20


class Server(ThreadingHTTPServer):
    """Serves ``api``; tracks open connections so that :meth:`close_connections` can end them."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], api: GreenApi) -> None:
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        _log.debug("simulator: connection %s ended: %s", client_address, type(exc).__name__)

    def close_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chatsync-sim"
    sys_version = ""

    def _srv(self) -> Server:
        return cast(Server, self.server)

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        srv = self._srv()
        with srv.connections_lock:
            srv.connections.add(self.connection)

    def finish(self) -> None:
        srv = self._srv()
        with srv.connections_lock:
            srv.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("simulator %s: %s", self.client_address[0], redact(format % args))

    def _discard_body(self) -> None:
        """Read and drop a request body so the keep-alive connection stays in sync."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 < length <= _MAX_DISCARD_BODY:
            self.rfile.read(length)
        elif length or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True

    def do_GET(self) -> None:
        self._discard_body()
        reply = self._srv().api.handle_get(self.path)
        self._write(reply, head=False)

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_DISCARD_BODY:
            self.close_connection = True
            self._write(Reply(400, b"bad request data", "text/plain"), head=False)
            return
        body = self.rfile.read(length) if length else b""
        reply = self._srv().api.handle_post(self.path, body)
        self._write(reply, head=False)

    def _not_found(self) -> None:
        self._discard_body()
        reply = self._srv().api.handle_other(self.path)
        self._write(reply, head=self.command == "HEAD")

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_found

    def _write(self, reply: Reply, *, head: bool) -> None:
        body = reply.body
        declared = len(body)
        close = self.close_connection
        if reply.mode == "truncate":
            body = body[: len(body) // 2]
            declared = len(body)
            close = True
        elif reply.mode == "reset":
            body = body[: len(body) // 2]
            close = True
        lines = [
            f"HTTP/1.1 {reply.status} {reason(reply.status)}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {declared}",
        ]
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        if close and reply.mode != "reset":  # a reset should look like a normal answer
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.close_connection = close
        self.log_request(reply.status, declared)
        try:
            if reply.mode == "reset":
                self.wfile.write(head_bytes + body)
                time.sleep(0.02)  # let the client start reading the body
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()  # really closed (RST) once rfile closes in finish()
            else:
                self.wfile.write(head_bytes if head else head_bytes + body)
                self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        self._srv().api.notify_answered(reply)
