"""The stack's health probe says "not up" for every reply that is not a 2xx, a reply that is not HTTP included.

A probe of a loopback port that nobody listens on yet can connect to itself and read its own request back
(TCP simultaneous open, ports in the ephemeral range). The echo server here gives the probe exactly that reply.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from components.stack.health import http_ok


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.request.recv(65536))  # the request line comes back where a status line belongs


def _status(code: int) -> type[socketserver.BaseRequestHandler]:
    class Reply(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    return Reply


@contextmanager
def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/health"
        finally:
            server.shutdown()
            thread.join()


def test_a_reply_that_is_not_http_is_not_up() -> None:
    with _serve(_Echo) as url:
        assert http_ok(url, timeout_s=5) is False


def test_status_decides_up_or_not() -> None:
    with _serve(_status(200)) as ok, _serve(_status(503)) as unavailable:
        assert http_ok(ok, timeout_s=5) is True
        assert http_ok(unavailable, timeout_s=5) is False


def test_nobody_listening_is_not_up() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        assert http_ok(f"http://127.0.0.1:{port}/health", timeout_s=5) is False
