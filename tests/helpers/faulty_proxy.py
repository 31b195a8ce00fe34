"""An HTTP proxy on 127.0.0.1 in front of moto's S3 server that fails requests on purpose: the
storage that hiccups. Requests go through unchanged unless a fault is on:

    down()          every request answered by closing the connection (an endpoint that is gone)
    up()            back to normal
    flaky(p, seed)  each request fails with probability p (seeded): a 503 SlowDown or a dropped
                    connection, alternately, as S3 and load balancers do

`requests` and `failed` count what passed through, for a test to show that faults did happen."""

from __future__ import annotations

import contextlib
import http.client
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from helpers.servers import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.is_down = False
        self.probability = 0.0
        self.random = random.Random(0)
        self.lock = threading.Lock()
        self.requests = 0
        self.failed = 0

    def down(self) -> None:
        self.is_down = True

    def up(self) -> None:
        self.is_down, self.probability = False, 0.0

    def flaky(self, probability: float, seed: int = 0) -> None:
        self.probability, self.random = probability, random.Random(seed)

    def fault(self) -> str | None:
        """None, "drop" or "503" for the next request."""
        with self.lock:
            self.requests += 1
            if self.is_down:
                self.failed += 1
                return "drop"
            if self.probability and self.random.random() < self.probability:
                self.failed += 1
                return "503" if self.failed % 2 else "drop"
            return None


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy.fault()
            if fault == "drop":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            if fault == "503":
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN)
                return
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            # a HEAD's length is the object's, not the (empty) body's
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def faulty_proxy(upstream: str) -> Iterator[tuple[str, FaultyProxy]]:
    """(the proxy's endpoint URL, its controls), for as long as the block runs."""
    proxy = FaultyProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", proxy
    finally:
        server.shutdown()
        server.server_close()
