"""The HTTP endpoints a cluster scrapes and probes: /metrics on one port, /healthz and /readyz on another."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client


class ProbeServer:
    """/healthz: the process serves. /readyz: 200, or 503 with what `not_ready()` says keeps the controller from
    doing its job (None when nothing does)."""

    def __init__(self, port: int, not_ready: Callable[[], str | None], host: str = "0.0.0.0") -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._reply(200, b"ok")
                elif self.path == "/readyz":
                    reason = not_ready()
                    self._reply(200 if reason is None else 503, b"ok" if reason is None else reason.encode())
                else:
                    self._reply(404, b"not found")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="probes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Callable[[], None]:
    """Serve /metrics from the default registry; returns a function that stops it."""
    server, thread = prometheus_client.start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
