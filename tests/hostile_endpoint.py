"""An OpenAI-shaped chat endpoint on 127.0.0.1 that misbehaves the way a hostile visitor's
would: it trickles one byte a second, stays silent, streams a word a second for ever, or sends
megabytes. Used by the hostile-visitor suite (tests/test_hostile_runs.py) and the soak
(benchmarks/soak.py --hostile)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time


def sse(content: str) -> bytes:
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "hostile",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


class HostileEndpoint:
    """An OpenAI-shaped chat endpoint on 127.0.0.1 that misbehaves, written on raw sockets so
    that nothing buffers or times out on its side:

    * ``bytes``: 200 and headers, then the body one byte every ``delay_s`` (a second);
    * ``silent``: reads the request and never answers;
    * ``words``: a complete chunk (one word) every ``delay_s``, for ever;
    * ``huge``: ``size`` characters in 1,000-character chunks, as fast as the socket takes them;
    * ``giant``: one chunk of ``size`` characters on a single line.

    Records when each connection was closed by the client (``closed_at``) and how many bytes
    it managed to send (``sent``).
    """

    def __init__(self, mode: str, delay_s: float = 1.0, size: int = 10 * 2**20):
        self.mode, self.delay_s, self.size = mode, delay_s, size
        self._giant = sse("y" * size) if mode == "giant" else b""  # made now: not counted as the client's memory
        self.requests: list[float] = []  # when each request had arrived
        self.closed_at: list[float] = []
        self.sent = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._open = True
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._open:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(time.monotonic())

    def _client_gone(self, conn: socket.socket, wait_s: float) -> bool:
        """Wait up to ``wait_s``; True when the client has closed (or cut) the connection."""
        readable, _, _ = select.select([conn], [], [], wait_s)
        if readable:
            try:
                return conn.recv(1) == b""
            except OSError:
                return True
        return False

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._read_request(conn)
            if self.mode == "silent":
                while not self._client_gone(conn, 0.05):
                    pass
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            if self.mode == "bytes":
                body = sse("Water it less.")
                for i in range(10**9):
                    if self._client_gone(conn, self.delay_s):
                        return
                    self.sent += conn.send(body[i % len(body):i % len(body) + 1])
            elif self.mode == "words":
                for i in range(10**9):
                    self.sent += conn.send(sse(f"w{i} "))
                    if self._client_gone(conn, self.delay_s):
                        return
            elif self.mode == "huge":
                piece = sse("x" * 1000)
                for _ in range(self.size // 1000):
                    conn.sendall(piece)
                    self.sent += len(piece)
                conn.sendall(b"data: [DONE]\n\n")
            elif self.mode == "giant":
                view = memoryview(self._giant)
                while view:
                    n = conn.send(view[:65536])
                    self.sent += n
                    view = view[n:]
        except OSError:
            pass
        finally:
            self.closed_at.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._open = False
        self._sock.close()
