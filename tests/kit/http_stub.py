"""Stub HTTP servers on 127.0.0.1: what the SLO loop reads (an engine's /metrics, Prometheus's query API),
played by a function of the request, so that a test states what is answered and not how http.server works.

Named `http_stub`, not `http`, so that it can never shadow the standard library's `http` package.
"""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Prometheus's text format 0.0.4, as prometheus-client (vLLM's /metrics) labels it.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# How long a stub that does not answer keeps the connection: past any client timeout a test sets, but
# bounded, should stop() never come.
SILENT_FOR_S = 10


@dataclass(frozen=True)
class Request:
    path: str  # with its query string
    headers: Message
    method: str = "GET"  # or HEAD: answered with the GET's headers and no body


@dataclass(frozen=True)
class Reply:
    """An answer: `body` with its type, or (no body) http.server's own error page for `status`."""

    status: int = 200
    body: str | bytes | None = None
    content_type: str = PROMETHEUS_TEXT
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (name, value)


def json_reply(document: object, status: int = 200) -> Reply:
    return Reply(status, json.dumps(document), "application/json")


# A stub's answer to one GET; None keeps the client waiting for an answer that never comes (until the
# server stops), which is how a test plays a server too slow for its client's timeout.
Answer = Callable[[Request], Reply | None]


class _Server(ThreadingHTTPServer):
    # The operator sends its queries (or scrapes) at once: with the default backlog of 5 some would wait
    # for a SYN retry, a second or more, and a test would measure that instead of the code.
    request_queue_size = 64


class StubServer:
    """One stub, serving `answer` in threads of its own (daemon threads: a stuck one never holds pytest)."""

    def __init__(self, answer: Answer):
        self._stopping = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                self._answer("GET")

            def do_HEAD(self):  # noqa: N802
                self._answer("HEAD")

            def _answer(self, method: str) -> None:
                reply = answer(Request(self.path, self.headers, method))
                if reply is None:
                    stub._stopping.wait(SILENT_FOR_S)
                    return
                if reply.body is None:
                    self.send_error(reply.status)
                    return
                body = reply.body.encode() if isinstance(reply.body, str) else reply.body
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Release the silent answers first, so that no handler thread outlives the test by SILENT_FOR_S."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


# What stub_servers() yields: starts a stub answering as told, for as long as the block lasts.
Serve = Callable[[Answer], StubServer]


@contextmanager
def stub_servers() -> Iterator[Serve]:
    """Yield `serve(answer)`, which starts a stub; every stub started is stopped on the way out, test
    failed or not, so that no port or thread outlives the test."""
    started: list[StubServer] = []

    def serve(answer: Answer) -> StubServer:
        started.append(StubServer(answer))
        return started[-1]

    try:
        yield serve
    finally:
        for stub in started:
            stub.stop()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound a moment ago and closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
