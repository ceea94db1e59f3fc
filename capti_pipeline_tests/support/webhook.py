"""A local HTTP receiver for webhook notifications, and a loopback port nothing listens on."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


def start_receiver(received: list[dict]) -> HTTPServer:
    """Serve POSTs on a free loopback port in a thread; each JSON body is appended to `received`.
    Call `shutdown()` on the returned server when done."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
