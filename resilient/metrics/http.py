"""The /metrics HTTP server, bounded: a fixed pool of worker threads, each connection with a deadline.

prometheus-client's own server starts a thread per connection, so idle connections alone grow the
supervisor without bound. Here at most `workers` connections are served at once and `queued` more
wait; beyond that a connection is closed at once, and a connection that sends nothing for
`timeout_s` is dropped, so a scraper always gets through once the slow or idle ones are gone.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

WORKERS = 4
QUEUED = 16
TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Requests are not logged."""


class PooledWSGIServer(WSGIServer):
    """A WSGI server whose connections are handled by a fixed thread pool (see the module docstring)."""

    workers, queued, timeout_s = WORKERS, QUEUED, TIMEOUT_S

    def server_activate(self) -> None:
        super().server_activate()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="metrics-http")
        self._slots = threading.BoundedSemaphore(self.workers + self.queued)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # over the bound: closed at once, nothing kept
            self.shutdown_request(request)
            return
        request.settimeout(self.timeout_s)
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except (OSError, ValueError):  # a timed-out, reset or garbled connection: nothing to report
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A broken connection is the client's business, not the supervisor's stderr."""

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(registry: CollectorRegistry, address: str, port: int) -> PooledWSGIServer:
    """Serve `registry` on address:port (0: any free port) from a daemon thread; `shutdown()` and
    `server_close()` stop it."""

    class Server(PooledWSGIServer):
        pass

    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    Server.address_family = family
    server = make_server(sockaddr[0], port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server
