"""A tiny HTTP/1.1 backend on loopback that reports exactly what it received (method, raw request
target, every header line in order, body digest) and answers with a status and headers chosen by
the test. Used to check that the tokengo chain is transparent: query strings, repeated headers,
non-JSON bodies, response status codes and response headers must survive the trip.

Request:  any method, any path. Query parameter `status=NNN` picks the response status.
Response: JSON {"method", "target", "headers": [[name, value], ...], "body_len", "body_sha256",
          "content_type"}, with Content-Type `application/x-tokengo-echo+json`,
          `X-Echo-Multi: first` and `X-Echo-Multi: second` (two field lines), `X-Echo-Single`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ECHO_CONTENT_TYPE = "application/x-tokengo-echo+json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tokengo-echo/1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(1024)  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        status = int(query.get("status", ["200"])[0])
        payload = json.dumps(
            {
                "method": self.command,
                "target": self.path,  # the raw request target, as sent on the wire
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "content_type": self.headers.get("Content-Type"),
            }
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", ECHO_CONTENT_TYPE)
        self.send_header("X-Echo-Multi", "first")
        self.send_header("X-Echo-Multi", "second")
        self.send_header("X-Echo-Single", "kept")
        if self.command == "HEAD" or status in (204, 304):
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class EchoBackend:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = ThreadingHTTPServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="echo-backend", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
