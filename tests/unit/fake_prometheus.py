"""A Prometheus stand-in for the unit tests: GET /api/v1/query as the Prometheus HTTP API documents
it (https://prometheus.io/docs/prometheus/latest/querying/api/#instant-queries), answering
{"status": "success", "data": {"resultType": "vector", "result": RESULT}} and recording each query;
any other path is a 404."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class FakePrometheus:
    url: str
    queries: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serve(result: list[dict[str, Any]]) -> Iterator[FakePrometheus]:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path != "/api/v1/query":
                self.send_error(404)
                return
            seen.append(parse_qs(url.query)["query"][0])
            body = json.dumps(
                {"status": "success", "data": {"resultType": "vector", "result": result}}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield FakePrometheus(f"http://127.0.0.1:{srv.server_address[1]}", seen)
    finally:
        srv.shutdown()
        srv.server_close()
